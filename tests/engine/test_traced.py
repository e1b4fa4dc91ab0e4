"""``mixed_grad(..., traceable=True)``: forward segments as plain torch code (``madfunc/engine/traced.py``).

Checked eagerly against ``torch.func.grad`` in float64 (Exact), against the estimator's formula with the
tangents drawn again from the same seed (Random), statistically (Random, eagerly and compiled), and under
``torch.compile(fullgraph=True)``: one graph, no recompiles, the same values as eager for Exact.

False-failure rates: the statistical tests reuse ``strategies/test_random._assert_unbiased`` (each assertion at
or below 1e-5, derivation there) and a variance test with the same ``|z| <= 5`` bound (5.7e-7 two-sided).
The formula and Exact tests are deterministic identities checked to float64 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from strategies.test_random import N_SCALARS, PARAMS, Z_MAX, C, X, _assert_unbiased, _exact_gradient, _flat

import madfunc as mf

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]
DT = torch.float64


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


STEM = mf.fwd(lambda p, x: torch.tanh(x @ p["w1"] + p["b1"]), name="stem")
BODY = mf.rev(lambda p, h: torch.sin(h @ p["w2"]), name="body")
HEAD = mf.fwd(lambda p, h: {"out": h @ p["w3"], "idx": h.argmax(-1)}, name="head")
P = {"w1": _rand(0, 4, 5), "b1": _rand(1, 5), "w2": _rand(2, 5, 5), "w3": _rand(3, 5, 2), "unused": _rand(4, 3)}
XS, YS = _rand(5, 6, 4), _rand(6, 6, 2)


def _model(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = STEM(p, x)  # every parameter passes through each segment; each reads only its own
    h = h + BODY(p, h)  # a residual around a reverse segment: HEAD's input needs a gradient (Rev2Fwd)
    out = HEAD(p, h)
    return ((out["out"] - y) ** 2).sum() + 0.0 * out["idx"].sum()


def _close(a: dict, b: dict) -> None:
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize("argnums", [0, (0, 1)])
def test_exact_matches_torch_func_grad(argnums) -> None:
    ref = torch.func.grad(_model, argnums)(P, XS, YS)
    got = mf.mixed_grad(_model, {"body": "rev"}, argnums, traceable=True)(P, XS, YS)
    if argnums == 0:
        ref, got = (ref,), (got,)
    _close(got[0], ref[0])
    assert torch.equal(got[0]["unused"], torch.zeros(3, dtype=DT))  # read by no segment: exactly zero
    if argnums != 0:
        torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)


def test_complex_outputs_carry_their_gradient() -> None:
    spectrum = mf.fwd(lambda p, x: torch.fft.rfft(torch.tanh(x @ p["w1"]), dim=-1), name="spectrum")

    def model(p, x):
        return spectrum(p, x).abs().pow(2).sum()

    _close(mf.mixed_grad(model, traceable=True)(P, XS), torch.func.grad(model)(P, XS))


def test_closure_tensors_are_differentiated_by_reverse_mode() -> None:
    """As documented: a tensor the body reads from a closure is not seeded; backprop reaches it through y."""

    def model(p, x):
        inner = mf.fwd(lambda b, h: torch.tanh(h @ p["w1"] + b), name="inner")  # p["w1"] from the closure
        return inner(p["b1"], x).pow(2).sum()

    torch.manual_seed(3)
    got, want = mf.mixed_grad(model, {"inner": mf.Random(1)}, traceable=True)(P, XS), torch.func.grad(model)(P, XS)
    torch.testing.assert_close(got["w1"], want["w1"], rtol=1e-12, atol=1e-12)  # exact: reverse mode
    assert not torch.allclose(got["b1"], want["b1"])  # the seeded argument: a one-tangent estimate


def test_grad_and_value_and_aux_follow_torch_func() -> None:
    def with_aux(p, x, y):
        return _model(p, x, y), {"x": x.sum()}

    (g, (value, aux)) = mf.mixed_grad_and_value(with_aux, has_aux=True, traceable=True)(P, XS, YS)
    ref_g, (ref_value, _) = torch.func.grad_and_value(with_aux, has_aux=True)(P, XS, YS)
    _close(g, ref_g)
    assert torch.equal(value, ref_value) and torch.equal(aux["x"], XS.sum())


def _regenerated_estimate(strategy: mf.Random, seed: int) -> dict:
    """(1/k) sum_j <J v_j, ybar> v_j for STEM under ``strategy``, its tangents drawn again as _traced draws
    them (per differentiated leaf in argument order, (k, *shape) at once), the rest by torch.func.grad."""
    torch.manual_seed(seed)
    vs = {}
    for key, t in P.items():  # torch.utils._pytree flattens a dict in insertion order
        if strategy.distribution == "gaussian":
            vs[key] = torch.randn((strategy.k, *t.shape), dtype=DT)
        else:
            vs[key] = torch.randint(0, 2, (strategy.k, *t.shape), dtype=DT) * 2 - 1
    stem = lambda p: torch.tanh(XS @ p["w1"] + p["b1"])  # noqa: E731
    h = stem(P)
    ybar = torch.func.grad(lambda h: _rest(P, h))(h)
    est = {key: torch.zeros_like(t) for key, t in P.items()}
    for j in range(strategy.k):
        used = {"w1": vs["w1"][j], "b1": vs["b1"][j]}  # STEM reads only these: the others get no tangent terms
        _, hdot = torch.func.jvp(stem, ({**P},), ({**{k: torch.zeros_like(v) for k, v in P.items()}, **used},))
        s = (hdot * ybar).sum()
        for key in used:
            est[key] = est[key] + s * used[key] / strategy.k
    rest = torch.func.grad(lambda p: _rest(p, h.detach()))(P)
    return {key: est[key] + rest[key] for key in P}


def _rest(p: dict, h: torch.Tensor) -> torch.Tensor:
    h = h + torch.sin(h @ p["w2"])
    return ((h @ p["w3"] - YS) ** 2).sum()


@pytest.mark.parametrize("strategy", [mf.Random(1), mf.Random(3, "rademacher")], ids=repr)
def test_random_is_the_forward_gradient_of_its_tangents(strategy: mf.Random) -> None:
    def model(p, x, y):
        h = STEM(p, x)
        return _rest(p, h)

    torch.manual_seed(7)
    got = mf.mixed_grad(model, {"stem": strategy}, traceable=True)(P, XS, YS)
    _close(got, _regenerated_estimate(strategy, 7))


def test_compiled_random_is_the_forward_gradient_for_each_k() -> None:
    """aot_eager keeps torch's own draws, so the compiled estimate must be the formula's exactly. The steps share
    their code with each other (and with other tests): after the first, Dynamo compiles k as a symbolic int."""

    def model(p, x, y):
        return _rest(p, STEM(p, x))

    torch._dynamo.reset()
    for strategy in (mf.Random(1), mf.Random(3, "rademacher"), mf.Random(2)):
        step = torch.compile(mf.mixed_grad(model, {"stem": strategy}, traceable=True), backend="aot_eager",
                             fullgraph=True)
        torch.manual_seed(7)
        _close(step(P, XS, YS), _regenerated_estimate(strategy, 7))


def _draws_traced(strategy: mf.Random, n_draws: int, step=None) -> torch.Tensor:
    """Independent estimates of ``strategies/test_random.LAYER``'s gradient: one traced call each."""
    from strategies.test_random import LAYER

    grad = step or mf.mixed_grad(lambda p, x: (LAYER(p, x) * C).sum(), {"layer": strategy}, traceable=True)
    return torch.stack([_flat(grad(dict(PARAMS), X)) for _ in range(n_draws)])


def _assert_variance(draws: torch.Tensor, g: torch.Tensor, rho: float) -> None:
    """E||g^ - g||^2 / ||g||^2 = rho (strategies/test_random's theory); |z| <= 5 on the mean of the ratios."""
    r = ((draws - g) ** 2).sum(1) / g.dot(g)
    z = (float(r.mean()) - rho) / (float(r.std()) / math.sqrt(r.shape[0]))
    assert abs(z) <= Z_MAX, f"relative variance {float(r.mean()):.3f}, theory {rho:.3f}, z = {z:.2f}"


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_random_is_unbiased_with_the_theoretical_variance(distribution: str) -> None:
    strategy = mf.Random(2, distribution)
    torch.manual_seed(11)
    draws = _draws_traced(strategy, 2000)
    g = _exact_gradient()
    _assert_unbiased(draws, g)
    rho = (N_SCALARS + 1 if distribution == "gaussian" else N_SCALARS - 1) / strategy.k
    _assert_variance(draws, g, rho)


def test_compiled_exact_is_one_graph_with_eager_values() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(mf.mixed_grad(_model, {"body": "rev"}, traceable=True), backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scale in (1.0, 2.0, 3.0):  # new values, same shapes: no recompile
            x = XS * scale
            _close(step(P, x, YS), torch.func.grad(_model)(P, x, YS))
    assert counter.frame_count == 1


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_compiled_random_is_unbiased_and_never_recompiles(distribution: str) -> None:
    """Inductor draws the tangents with its own generator: statistics, not values, are compared with eager."""
    from strategies.test_random import LAYER

    torch._dynamo.reset()
    strategy = mf.Random(2, distribution)
    step = torch.compile(mf.mixed_grad(lambda p, x: (LAYER(p, x) * C).sum(), {"layer": strategy}, traceable=True),
                         fullgraph=True)
    torch.manual_seed(12)
    with torch._dynamo.config.patch(error_on_recompile=True):
        draws = _draws_traced(strategy, 2000, step)
        torch.manual_seed(13)  # a new seed: still no recompile
        step(dict(PARAMS), X)
    g = _exact_gradient()
    _assert_unbiased(draws, g)
    _assert_variance(draws, g, (N_SCALARS + 1 if distribution == "gaussian" else N_SCALARS - 1) / strategy.k)


def test_segments_inside_a_forward_segment_run_plain() -> None:
    inner = mf.fwd(lambda p, h: torch.tanh(h @ p["w2"]), name="inner")
    outer = mf.fwd(lambda p, x: inner(p, torch.sin(x @ p["w1"])), name="outer")

    def model(p, x):
        return outer(p, x).pow(2).sum()

    _close(mf.mixed_grad(model, traceable=True)(P, XS), torch.func.grad(model)(P, XS))
    with pytest.raises(ValueError, match="plan key 'inner' matches only segment 'inner', which ran inside forward"):
        mf.mixed_grad(model, {"inner": "rev"}, traceable=True)(P, XS)


def test_bad_input_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"mixed_grad\(traceable=...\): expected True or False"):
        mf.mixed_grad(_model, traceable="yes")
    with pytest.raises(ValueError, match="drop generator="):
        mf.mixed_grad(_model, traceable=True, generator=torch.Generator())
    with pytest.raises(ValueError, match="data parallelism needs the default engine"):
        mf.mixed_grad_and_value(_model, traceable=True, process_group="world")
    with pytest.raises(ValueError, match="segment 'stem' has strategy Activity.* no traceable form"):
        mf.mixed_grad(_model, {"stem": mf.Activity(2)}, traceable=True)
    with pytest.raises(ValueError, match="segment 'stem' has strategy Random.*orthogonal.* no traceable form"):
        mf.mixed_grad(_model, {"stem": mf.Random(2, "orthogonal")}, traceable=True)
    odd = mf.fwd(lambda p, x: x @ p["w1"], name="odd", strategy=mf.Activity(2))
    with pytest.raises(ValueError, match="segment 'odd' has strategy Activity"):  # a default, seen at the call
        mf.mixed_grad(lambda p, x: odd(p, x).sum(), traceable=True)(P, XS)
    with pytest.raises(ValueError, match="plan key 'sterm' matched no segment that ran"):
        mf.mixed_grad(_model, {"sterm": "exact"}, traceable=True)(P, XS, YS)
    twin = mf.fwd(lambda p, x: x @ p["w1"], name="stem")
    with pytest.raises(ValueError, match="two different functions ran under the segment name 'stem'"):
        mf.mixed_grad(lambda p, x: (STEM(p, x) + twin(p, x)).sum(), traceable=True)(P, XS)
    big = mf.fwd(lambda w: w.sin(), name="big")
    with pytest.raises(MemoryError, match="segment 'big': traceable Exact.* 24000 basis tangents"):
        mf.mixed_grad(lambda w: big(w).sum(), traceable=True)(torch.zeros(24000))
    silent = mf.fwd(lambda p, x: None, name="silent")
    with pytest.raises(TypeError, match="segment 'silent' returned None; a segment must return a tensor"):
        mf.mixed_grad(lambda p, x: silent(p, x), traceable=True)(P, XS)
    cseg = mf.fwd(lambda z, x: (x.to(z.dtype) @ z).abs(), name="cseg")
    with pytest.raises(TypeError, match="segment 'cseg': complex inputs that need gradients"):
        mf.mixed_grad(lambda z, x: cseg(z, x).sum(), traceable=True)(torch.ones(4, 5, dtype=torch.complex128), XS)
