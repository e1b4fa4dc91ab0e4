"""SPSA: central differences along Random's directions (madfunc/strategies/spsa.py).

The generic tests (unbiased as eps -> 0, Random's variance law, seeds, lazy = eager, vmap, inspect/compare,
string form) run over its rows in tests/support/strategies.py. Here, deterministic checks under a fixed
generator, none of them statistical:

* SPSA draws Random's directions: in float64 the two estimates differ by at most the bound that the body's
  third derivative gives (``|d_j - J v_j| <= eps^2/6 max |f'''(theta)[v_j, v_j, v_j]|``), and halving
  eps divides the difference by 4;
* its directions and its scalar ``(l(theta + eps v) - l(theta - eps v)) / (2 eps)`` can be rebuilt outside
  (``call_seed``, ``SPSA.directions``): the MeZO reference in benchmarks/ depends on it;
* it differentiates what forward mode cannot (NumPy inside the body, a Function without a forward rule) in
  the middle of a mixed plan;
* every pass sees the same dropout mask; BatchNorm's statistics and a KV cache are updated once;
* the perturbed value of an input exists only while an op reads it (lazy), not for all inputs at once.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import opaque
from support.strategies import make_setting

import madfunc as mf
from madfunc.plan import parse_strategy
from madfunc.strategies.spsa import call_seed

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


X, C = _rand(0, 5, 3), _rand(1, 5, 4)
W0 = _rand(2, 3, 4) * 0.5


def _loss_of(seg):
    return lambda w: (seg(X, w) * C).sum()


SMOOTH = mf.fwd(lambda x, w: torch.tanh(x @ w), name="body")


def _estimate(strategy: mf.Strategy, seed: int = 3, fn=None) -> torch.Tensor:
    fn = fn or _loss_of(SMOOTH)
    return mf.mixed_grad(fn, {"body": strategy}, generator=torch.Generator().manual_seed(seed))(W0)


def _third_derivative_bound(v: torch.Tensor) -> float:
    """``max over the segment t in [-eps, eps] of |f'''|`` along ``v`` for ``f(w) = sum(C * tanh(X w))``:
    ``sum_i |C_i| |tanh'''| |(X v)_i|^3`` with ``|tanh'''| <= 2``, a bound that holds at every ``w``."""
    return float((C.abs() * 2 * (X @ v).abs() ** 3).sum())


@pytest.mark.parametrize("k", [1, 3])
def test_spsa_agrees_with_random_within_the_third_derivative_bound(k: int) -> None:
    random = _estimate(mf.Random(k))
    (directions,) = mf.SPSA(k).directions(call_seed(torch.Generator().manual_seed(3)), [W0])
    # g_spsa - g_random = (1/k) sum_j (d_j - J v_j) v_j, |d_j - J v_j| <= eps^2/6 max|f'''[v_j, v_j, v_j]|.
    errors = {}
    for eps in (1e-2, 5e-3):
        spsa = _estimate(mf.SPSA(k, eps))
        bound = sum(eps**2 / 6 * _third_derivative_bound(v) * float(v.norm()) for v in directions) / k
        errors[eps] = float((spsa - random).norm())
        assert 0 < errors[eps] <= bound, (eps, errors[eps], bound)
    # The error is c eps^2 + O(eps^4) (central differences: the eps^3 term cancels), rounding ~1e-16/eps.
    assert errors[1e-2] / errors[5e-3] == pytest.approx(4.0, rel=0.02)


def test_another_generator_seed_gives_other_directions() -> None:
    """The agreement above is not automatic: another generator seed gives other directions."""
    assert float((_estimate(mf.SPSA(2), seed=4) - _estimate(mf.Random(2))).norm()) > 0.1


@pytest.mark.parametrize("seeding", ["lazy", "eager"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_directions_and_scalar_can_be_rebuilt_outside(dtype: torch.dtype, seeding: str) -> None:
    """MeZO's step from SPSA's own directions: ``s = (l(w + eps v) - l(w - eps v)) / (2 eps)``, gradient ``s v``;
    the value ``l(w)`` (``primal="exact"``) or ``(l(w + eps v) + l(w - eps v)) / 2`` (``"mean"``)."""
    w, x, c = W0.to(dtype), X.to(dtype), C.to(dtype)

    def loss(w_):
        return (torch.tanh(x @ w_) * c).sum()

    seg = mf.fwd(loss, name="model")
    seed = call_seed(torch.Generator().manual_seed(9))
    (v,) = mf.SPSA().directions(seed, [w])
    plus, minus = loss(w.add(v[0], alpha=1e-3)), loss(w.add(v[0], alpha=-1e-3))
    s = (plus - minus) / (2 * 1e-3)
    for primal, expected in (("exact", loss(w)), ("mean", (plus + minus) * 0.5)):
        strategy = mf.SPSA(eps=1e-3, seeding=seeding, primal=primal)
        grad, value = mf.mixed_grad_and_value(seg, {"model": strategy}, generator=torch.Generator().manual_seed(9))(w)
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
        torch.testing.assert_close(grad, s * v[0], rtol=0, atol=0)


def _numpy_body(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """tanh(x @ w) computed by NumPy: no autograd, no forward mode can see through it."""
    return torch.from_numpy(np.tanh(x.detach().numpy() @ w.detach().numpy()))


def test_black_box_body_in_a_mixed_plan() -> None:
    """A NumPy body between two reverse-mode stages: the cotangent from above contracts with its differences,
    its input's gradient flows on below. It equals Random on the same body written in torch (O(eps^2))."""
    w1, w3 = _rand(5, 3, 3), _rand(6, 4, 2)

    def loss(body):
        seg = mf.fwd(body, name="body")
        return lambda w1_, w2, w3_: (torch.sin(seg(torch.tanh(X @ w1_), w2) @ w3_)).sum()

    argnums = (0, 1, 2)
    spsa = mf.mixed_grad(loss(_numpy_body), {"body": mf.SPSA(2, 1e-4)}, argnums=argnums,
                         generator=torch.Generator().manual_seed(1))(w1, W0, w3)
    random = mf.mixed_grad(loss(lambda x, w: torch.tanh(x @ w)), {"body": mf.Random(2)}, argnums=argnums,
                           generator=torch.Generator().manual_seed(1))(w1, W0, w3)
    for a, b in zip(spsa, random, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # eps^2 = 1e-8 times O(10) derivatives
    exact = torch.func.grad(lambda w: (torch.sin(torch.tanh(torch.tanh(X @ w1) @ w) @ w3)).sum())(W0)
    assert float(spsa[1].flatten() @ exact.flatten()) != 0  # it reached the body's own parameter


def test_a_function_without_forward_rule() -> None:
    """``opaque`` (no jvp, a backward that is not differentiable: forward mode refuses it) under SPSA."""
    w = _rand(7, 3, 2)

    def body(x, w_):
        return opaque(x @ w_)

    seg = mf.fwd(body, name="body")

    def loss(w_):
        return (seg(X, w_) ** 2).sum()

    with pytest.raises(mf.ForwardModeError, match="has no jvp staticmethod"):
        mf.mixed_grad(loss, {"body": mf.Random(1)})(w)
    gen = torch.Generator().manual_seed(2)
    got = mf.mixed_grad(loss, {"body": mf.SPSA(1, 1e-6)}, generator=gen)(w)
    exact = torch.func.grad(lambda w_: ((3 * (X @ w_).repeat(1, 17)) ** 2).sum())(w)
    (v,) = mf.SPSA().directions(call_seed(torch.Generator().manual_seed(2)), [w])
    # the loss is quadratic: central differences are exact up to rounding
    torch.testing.assert_close(got, (exact * v[0]).sum() * v[0], rtol=1e-8, atol=1e-8)


def test_every_pass_sees_the_same_dropout_mask() -> None:
    """``sum(dropout(x @ w))`` is linear in ``w`` for a fixed mask: SPSA equals Random to rounding only if the
    primal and both perturbed passes drew the same mask (another mask per pass is off by O(1))."""
    seg = mf.fwd(lambda x, w: torch.nn.functional.dropout(x @ w, 0.5), name="body")

    def loss(w):
        return (seg(X, w) * C).sum()

    got = []
    for strategy in (mf.SPSA(2), mf.Random(2)):
        torch.manual_seed(0)
        got.append(mf.mixed_grad(loss, {"body": strategy}, generator=torch.Generator().manual_seed(1))(W0))
    torch.testing.assert_close(got[0], got[1], rtol=1e-9, atol=1e-9)


def test_batchnorm_statistics_are_updated_once() -> None:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(4).double().train()
    plain = torch.nn.BatchNorm1d(4).double().train()
    plain.load_state_dict(bn.state_dict())
    x = _rand(8, 6, 4)
    seg = mf.fwd(bn, name="bn")
    with mf.use_plan({"bn": mf.SPSA(2)}):
        seg(x * 2).pow(2).sum().backward()
    plain(x * 2)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(dict(bn.named_buffers())[name], buffer, rtol=0, atol=0)
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0


def test_kv_cache_is_filled_once() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 32, (1, 6), generator=torch.Generator().manual_seed(1))
    mf.mark_segments(model, {"model.layers.*": "fwd"})
    with mf.use_plan({"model.layers.*": mf.SPSA(1)}):
        out = model(input_ids=ids, labels=ids, use_cache=True)
        out.loss.backward()
    assert out.past_key_values.get_seq_length() == ids.shape[1]
    plain = model(input_ids=ids, use_cache=True)
    torch.testing.assert_close(out.logits, plain.logits)
    grads = [p.grad for p in model.model.layers.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("seeding", ["lazy", "eager"])
def test_perturbed_inputs_exist_one_at_a_time(seeding: str) -> None:
    """The forward half (3 passes) of a chain of L = 6 weights, in live tensor bytes beyond what existed before:
    lazy, one weight-sized buffer (the direction drawn where the weight is read, overwritten by the perturbed
    value, as MeZO's in-place perturbation needs one) plus activations; eager, all L directions and all L
    perturbed weights at once (2L buffers: the test tells the two apart)."""
    depth, width = 6, 64
    weights = [(_rand(10 + i, width, width) / math.sqrt(width)).requires_grad_() for i in range(depth)]
    leaf = width * width * 8
    seg = mf.fwd(lambda x, *ws: functools.reduce(lambda h, w: torch.tanh(h @ w), ws, x).sum(), name="chain")
    x = _rand(20, 2, width)
    with mf.use_plan({"chain": mf.SPSA(1, seeding=seeding)}), mf.measure_peak() as memory:
        seg(x, *weights)
    if seeding == "lazy":
        assert leaf <= memory.peak_bytes <= leaf + 8 * 1024, memory.peak_bytes  # activations: 1 KiB each
    else:
        assert memory.peak_bytes >= 2 * depth * leaf, memory.peak_bytes


def test_lazy_seeding_under_vmap_equals_a_loop() -> None:
    """Under an outer vmap the perturbed value cannot overwrite its (unbatched) direction: it is a new tensor."""
    seg = mf.fwd(lambda z, w: torch.tanh(z) @ w, name="seg")
    zs = torch.stack([X, 2 * X, -X])
    grad = mf.mixed_grad(lambda z, w: (seg(z + 0.0, w) * C).sum(), {"seg": mf.SPSA(2, seeding="lazy")}, argnums=(0, 1))
    torch.manual_seed(11)
    batched = torch.func.vmap(grad, in_dims=(0, None), randomness="same")(zs, W0)
    for i in range(zs.shape[0]):
        torch.manual_seed(11)
        for got, want in zip(batched, grad(zs[i], W0), strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12)


_PASSES: list[int] = []  # module-level: the engine restores what the body reaches through its closure


@pytest.mark.parametrize(("primal", "passes"), [("exact", 2 * 3 + 1), ("mean", 2 * 3)])
def test_passes_per_call(primal: str, passes: int) -> None:
    def body(x, w):
        _PASSES.append(1)
        return torch.tanh(x @ w)

    seg = mf.fwd(body, name="counted")
    _PASSES.clear()
    mf.mixed_grad(lambda w: seg(X, w).sum(), {"counted": mf.SPSA(3, primal=primal)})(W0)
    assert len(_PASSES) == passes


def test_mean_primal_is_second_order_close_and_reads_are_watched() -> None:
    """``primal="mean"``: the output is ``f(theta) + O(eps^2)``, the gradient the one ``"exact"`` gives (the same
    differences), and an input the body does not read still gets an exact zero (the first pass watches)."""
    seg = mf.fwd(lambda x, w, unused: torch.tanh(x @ w), name="body")
    results = {}
    for primal in ("exact", "mean"):
        fn = mf.mixed_grad_and_value(lambda w, u: (seg(X, w, u) * C).sum(), {"body": mf.SPSA(2, primal=primal)},
                                     argnums=(0, 1), generator=torch.Generator().manual_seed(0))
        results[primal] = fn(W0, _rand(3, 2))
    (g_exact, _), v_exact = results["exact"]
    (g_mean, g_unused), v_mean = results["mean"]
    torch.testing.assert_close(g_mean, g_exact, rtol=0, atol=0)
    assert torch.equal(g_unused, torch.zeros(2, dtype=DT))
    # f(theta + eps v) + f(theta - eps v) - 2 f(theta) = eps^2 f''[v, v] + O(eps^4): |f''| <= sum |C| 0.77 |Xv|^2
    (v,) = mf.SPSA(2).directions(call_seed(torch.Generator().manual_seed(0)), [W0])
    bound = 1e-6 / 2 * float((C.abs() * 0.77 * (X @ v[0]) ** 2).sum()) * 1.01
    assert 0 < abs(float(v_mean - v_exact)) <= bound


def test_unread_input_gets_an_exact_zero() -> None:
    seg = mf.fwd(lambda x, w, unused: torch.tanh(x @ w), name="body")
    for seeding in ("lazy", "eager"):
        g = mf.mixed_grad(lambda w, u: seg(X, w, u).sum(), {"body": mf.SPSA(2, seeding=seeding)},
                          argnums=(0, 1))(W0, _rand(3, 2))
        assert torch.equal(g[1], torch.zeros(2, dtype=DT)) and g[0].abs().sum() > 0


def test_finite_difference_bias_is_far_below_the_table_tolerance() -> None:
    """The shared table's rows use eps = 1e-3 in float64: their estimates differ from Random's (same
    directions) by a relative 1e-5 or less, while its statistical tolerance on the mean's projection is
    ``5 sqrt(variance / draws)``, at least ``5 sqrt(25 / 2000) = 0.56`` (n = 24, k = 1)."""
    s = make_setting("joint")
    seg = mf.fwd(lambda z, w2: torch.tanh(z) @ w2, name="seg")

    def loss(z, w2):
        return (seg(z + 0.0, w2) * s.c).sum()

    got = [
        torch.cat([g.flatten() for g in mf.mixed_grad(loss, {"seg": st}, argnums=(0, 1),
                                                       generator=torch.Generator().manual_seed(0))(s.z0, s.w2)])
        for st in (mf.SPSA(1), mf.Random(1))
    ]
    assert float((got[0] - got[1]).norm() / got[1].norm()) < 1e-5


def test_string_form_and_repr() -> None:
    strategy = mf.SPSA(k=3, eps=2.5e-4, distribution="rademacher", seeding="lazy")
    assert str(strategy) == "spsa:3:0.00025:rademacher:lazy"
    assert parse_strategy(str(strategy)) == strategy
    assert parse_strategy("spsa") == mf.SPSA()
    assert parse_strategy("spsa:2:1e-2") == mf.SPSA(2, 1e-2)
    assert repr(mf.SPSA()) == "SPSA(k=1, eps=0.001, distribution='gaussian')"
    assert mf.SPSA(eps=1) == mf.SPSA(eps=1.0) and isinstance(mf.SPSA(eps=1).eps, float)
    mean = mf.SPSA(2, primal="mean")
    assert str(mean) == "spsa:2:0.001:gaussian:auto:mean" and parse_strategy(str(mean)) == mean
    assert repr(mean) == "SPSA(k=2, eps=0.001, distribution='gaussian', primal='mean')"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": 0.0}, ValueError, r"SPSA\(eps=0.0\): eps must be a finite float > 0"),
        ({"eps": -1e-3}, ValueError, r"SPSA\(eps=-0.001\)"),
        ({"eps": float("nan")}, ValueError, r"SPSA\(eps=nan\)"),
        ({"eps": "1e-3"}, TypeError, r"SPSA\(eps=...\): expected a positive float"),
        ({"k": 0}, ValueError, r"SPSA\(k=0\): k must be >= 1"),
        ({"k": 1.5}, TypeError, r"SPSA\(k=...\)"),
        ({"distribution": "uniform"}, ValueError, r"SPSA\(distribution='uniform'\): unknown distribution"),
        ({"seeding": "never"}, ValueError, r"SPSA\(seeding='never'\): unknown seeding"),
        ({"primal": "plus"}, ValueError, r"SPSA\(primal='plus'\): unknown primal"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        mf.SPSA(**kwargs)


@pytest.mark.parametrize(
    ("text", "match"),
    [("spsa:0", "K must be an integer >= 1"), ("spsa:1:0", "EPS must be a float > 0"),
     ("spsa:1:abc", "EPS must be a float > 0"), ("spsa:1:1e-3:uniform", "unknown distribution 'uniform'"),
     ("spsa:1:1e-3:gaussian:never", "unknown seeding 'never'"), ("spsa:1:1e-3:gaussian:auto:plus", "unknown primal")],
)
def test_string_form_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_strategy(text)


def test_variance_law_and_advice() -> None:
    stats = mf.strategies.SegmentStats(differentiated_numel=12)
    assert mf.SPSA(4).variance(stats) == mf.Random(4).variance(stats) == 13 / 4
    assert mf.SPSA(4).advice(stats) == []
    assert "Exact()" in mf.SPSA(12).advice(stats)[0]
