"""Random strategies: unbiasedness in mixed models, reproducibility, and tangent memory. (Mean and variance
against theory for every strategy and distribution: strategies/test_base.py, over tests/support/strategies.py.)

Theory (issue 2; ``n`` = number of scalars the segment differentiates, ``k`` = tangents per call):
``E||g^ - g||^2 / ||g||^2`` is ``(n+1)/k`` (Gaussian), ``(n-1)/k`` (Rademacher), ``n/k - 1`` (orthogonal).

How draws are made cheaply: the loss sums ``M`` independent copies of the model, one parameter copy
each, through the *same* segment. Every segment call draws its own tangents, so the gradient of copy
``m`` is an independent draw of the estimator for the same exact gradient ``g``: one ``mixed_grad``
call gives ``M`` draws. (If calls shared tangents, the draws would be dependent and the
unbiasedness test below would see the mean error of a single draw, ~``N`` times too large.)

False-failure rates. Seeds are fixed, so each test is deterministic; the rates below are the chance
that a correct implementation fails for a seed chosen at random. Every assertion is set at or below
1e-5 (issue 2 asks for below 1e-4):

* variance: ``z = (mean(r) - rho) / (s_r / sqrt(N))`` with ``r_i = ||g^_i - g||^2/||g||^2`` and the
  sample standard deviation ``s_r``; ``|z| <= 5`` has a two-sided normal tail of 5.7e-7. ``r`` is skewed
  (a product of chi-square variables); the first Edgeworth correction to that tail at N >= 1000 draws
  is of order ``skew/(6 sqrt N) (z^2-1) phi(z)``, about 2e-6 for skewness 10 at N = 1000, so the rate
  stays below 1e-5.
* unbiasedness, all directions: ``T = N ||mean(g^) - g||^2 / tr(S)`` (``S`` the sample covariance of
  one draw). By the CLT, ``N ||mean - g||^2`` is a Gaussian quadratic form ``sum_i l_i chi2_1`` with
  ``sum_i l_i = tr(Cov)``, and for thresholds above 1.54 the tail of such a form is largest when all
  weight sits on one term (Szekely & Bakirov 2003), so ``P(T > t) <= P(chi2_1 > t)``.
  ``t = chi2.isf(1e-6, 1) = 23.9``; a trace estimated 20% low (far beyond its ~5% sampling error at
  N >= 1000) would still leave the rate below 1e-5.
* unbiasedness along ``g`` (catches a wrong scale such as a missing 1/k or sqrt(n)):
  ``u_i = <g^_i, g> / ||g||^2`` has mean 1; ``|z| <= 5`` on its mean as above.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch
from conftest import BackwardOnly
from scipy import stats

import madfunc as mf

DT = torch.float64
Z_MAX = 5.0  # two-sided normal tail 5.7e-7
T_MAX = float(stats.chi2.isf(1e-6, 1))  # 23.9
M_PER_CALL = 500


# Many tiny draws: one intra-op thread (see conftest.one_thread; with 2 threads torch.linalg.qr of the
# 15 x 5 orthogonal-tangent matrix alone takes ~8 ms instead of ~7 us on this CPU).
pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


# A small segment: n = 4*3 + 3 = 15 differentiated scalars (its input is data, not differentiated).
LAYER = mf.fwd(lambda p, x: torch.tanh(x @ p["w"] + p["b"]), name="layer")
PARAMS = {"w": _rand(0, 4, 3) * 0.7, "b": _rand(1, 3) * 0.3}
N_SCALARS = 15
X = _rand(2, 6, 4)
C = _rand(3, 6, 3)


def _loss_of_copies(copies, x):
    return sum((LAYER(p, x) * C).sum() for p in copies)


def _flat(tree) -> torch.Tensor:
    return torch.cat([leaf.reshape(-1) for leaf in optree.tree_leaves(tree)])


def _exact_gradient() -> torch.Tensor:
    plain = lambda p, x: (torch.tanh(x @ p["w"] + p["b"]) * C).sum()  # noqa: E731
    return _flat(torch.func.grad(plain)(PARAMS, X))


def _draws(strategy: mf.Random, n_draws: int, seed: int) -> torch.Tensor:
    """``n_draws`` independent estimates of the segment's gradient, as rows of an (N, n) matrix."""
    torch.manual_seed(seed)
    rows = []
    grad = mf.mixed_grad(_loss_of_copies, {"layer": strategy})
    for _ in range(n_draws // M_PER_CALL):
        copies = [dict(PARAMS) for _ in range(M_PER_CALL)]
        rows.extend(_flat(g) for g in grad(copies, X))
    return torch.stack(rows)


def _assert_unbiased(draws: torch.Tensor, g: torch.Tensor) -> None:
    n_draws = draws.shape[0]
    mean = draws.mean(0)
    trace = float(draws.var(0, unbiased=True).sum())
    t_stat = n_draws * float(((mean - g) ** 2).sum()) / trace
    assert t_stat <= T_MAX, f"mean of draws is off: T = {t_stat:.2f} > {T_MAX:.1f}"
    u = draws @ g / g.dot(g)
    z = (float(u.mean()) - 1.0) / (float(u.std()) / math.sqrt(n_draws))
    assert abs(z) <= Z_MAX, f"mean projection on g is {float(u.mean()):.4f}, z = {z:.2f}"


def test_orthogonal_with_k_equal_n_is_exact() -> None:
    g = torch.func.grad(lambda p, x: (torch.tanh(x @ p["w"] + p["b"]) * C).sum())(PARAMS, X)
    for seed in range(3):
        torch.manual_seed(seed)
        got = mf.mixed_grad(
            lambda p, x: _loss_of_copies([p], x), {"layer": mf.Random(k=N_SCALARS, distribution="orthogonal")}
        )(PARAMS, X)
        for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(g), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -- one Random segment inside an otherwise exact model ------------------------------------------------------
A = mf.rev(lambda p, x: torch.sin(x @ p), name="a_rev")
R = mf.fwd(lambda p, h: torch.tanh(h @ p["w"] + p["b"]), name="r_random")
E = mf.fwd(lambda p, h: torch.sigmoid(h @ p), name="e_exact")
MIXED_PARAMS = {
    "a": _rand(10, 4, 3) * 0.6,
    "r": {"w": _rand(11, 3, 3) * 0.6, "b": _rand(12, 3) * 0.2},
    "e": _rand(13, 3, 2) * 0.6,
    "head": _rand(14, 2),
}


def _chain(p, x, a, r, e):
    h = r(p["r"], a(p["a"], x))
    return ((e(p["e"], h) @ p["head"]) ** 2).sum()


def test_random_segment_in_a_mixed_model() -> None:
    """x -> a (reverse) -> r (Random) -> e (Exact) -> head (glue).

    Downstream of the random segment (e, head), every draw is exact: their cotangents never pass
    through it. Upstream (a), the gradient comes through r's estimated input cotangent (Rev2Fwd):
    unbiased, and so is r's own.
    """
    plain = (
        lambda p, x: torch.sin(x @ p),
        lambda p, h: torch.tanh(h @ p["w"] + p["b"]),
        lambda p, h: torch.sigmoid(h @ p),
    )
    g = torch.func.grad(lambda p, x: _chain(p, x, *plain))(MIXED_PARAMS, X)
    grad = mf.mixed_grad(
        lambda copies, x: sum(_chain(p, x, A, R, E) for p in copies),
        {"r_random": mf.Random(k=2, distribution="rademacher")},
    )
    torch.manual_seed(5)
    draws = []
    for _ in range(2):
        draws.extend(grad([dict(MIXED_PARAMS) for _ in range(M_PER_CALL)], X))
    for draw in draws:
        torch.testing.assert_close(draw["e"], g["e"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(draw["head"], g["head"], rtol=1e-10, atol=1e-12)
    for key in ("r", "a"):
        stacked = torch.stack([_flat(d[key]) for d in draws])
        assert float(stacked.std(0).max()) > 1e-3  # really random
        _assert_unbiased(stacked, _flat(g[key]))


# -- reproducibility --------------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "orthogonal"])
def test_manual_seed_reproduces_bit_identical_gradients(distribution: str) -> None:
    strategy = mf.Random(k=3, distribution=distribution)
    grad = mf.mixed_grad(lambda copies, x: _loss_of_copies(copies, x), {"layer": strategy})

    def run(seed):
        torch.manual_seed(seed)
        return _flat(grad([PARAMS, PARAMS], X))

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # Two calls of the segment in one transform call draw different tangents.
    assert not torch.allclose(first[:N_SCALARS], first[N_SCALARS:])


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "orthogonal"])
def test_manual_seed_reproduces_under_use_plan(distribution: str) -> None:
    def run(seed):
        torch.manual_seed(seed)
        p = {k: v.clone().requires_grad_() for k, v in PARAMS.items()}
        with mf.use_plan({"layer": mf.Random(k=2, distribution=distribution)}):
            loss = _loss_of_copies([p], X)
        torch.randn(100)  # RNG use between forward and backward must not change the tangents
        loss.backward()
        return torch.cat([p["w"].grad.reshape(-1), p["b"].grad])

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


# -- tangents are regenerated, not stored --------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy",
    [mf.Random(k=6, distribution=d) for d in ("gaussian", "rademacher", "orthogonal")] + [mf.Exact()],
    ids=repr,
)
def test_only_output_tangents_are_saved_for_backward(strategy: mf.Strategy) -> None:
    """A segment with n = 44 differentiated scalars and an 8-element output keeps (tangents x 8) numbers
    for backward and nothing else: not the k x 44 input tangents, not its internal activations."""
    seg = mf.fwd(lambda w, x: torch.tanh(torch.sin(x @ w) * 2), name="wide")
    w = _rand(20, 11, 4).requires_grad_()
    x = _rand(21, 2, 11)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with mf.use_plan({"wide": strategy}):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = seg(w, x)
    tangents = strategy.k if isinstance(strategy, mf.Random) else 44
    assert [tuple(t.shape) for t in saved] == [(tangents, 2, 4)]
    out.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


# -- Random through the double-vjp fallback (issue 8) --------------------------------------------------------
# Two routes into the fallback: an op without a forward rule (double vjp of cdist's backward, which is
# differentiable for more than 25 rows) and a custom Function with only a backward.
FALLBACK_BODIES = {
    "cdist": lambda w, x: torch.cdist(torch.cat([x @ w] * 5), x[:, :3] + 1.0),
    "backward_only_function": lambda w, x: torch.tanh(BackwardOnly.apply(x @ w)),
}


@pytest.mark.parametrize("body", FALLBACK_BODIES)
def test_random_through_the_fallback_is_unbiased(body: str) -> None:
    """Same two unbiasedness statistics as above (false-failure rate <= 1e-5 each), n = 12: the fallback's
    tangents J v are exact, so the estimate (1/k) sum (J v . ybar) v is unbiased."""
    fn = FALLBACK_BODIES[body]
    seg = mf.fwd(fn, name="op")
    w = _rand(10, 4, 3)
    cot = _rand(11, *fn(w, X).shape)

    def loss_of_copies(copies, x):
        return sum((seg(p, x) * cot).sum() for p in copies)

    g = torch.func.grad(lambda w, x: (fn(w, x) * cot).sum())(w, X).reshape(-1)
    grad = mf.mixed_grad(loss_of_copies, {"op": mf.Random(k=4, distribution="rademacher")})
    torch.manual_seed(99)
    draws = torch.stack([d.reshape(-1) for _ in range(2) for d in grad([w] * M_PER_CALL, X)])
    _assert_unbiased(draws, g)
