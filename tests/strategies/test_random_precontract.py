"""Random segments with few outputs contract their tangents in forward (``Random.finish``): backward then
neither keeps nor draws them again. The estimate must be the very same forward gradient
``(1/k) sum_j <J v_j, ybar> v_j`` of the tangents drawn from the call's seed, in float64 to 1e-12."""

from __future__ import annotations

import pytest
import torch

import madfunc as mf
from madfunc.engine.rng import TangentStream
from madfunc.strategies import random as _random
from madfunc.strategies.tangents import draw_tangents

CPU = torch.device("cpu")
F64 = torch.float64


def _data() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    return tuple(torch.randn(*s, generator=gen, dtype=F64) for s in ((4, 3), (3,), (5, 4), (2,), (3,)))


def _body(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, outputs: str):
    h = torch.tanh(x @ w + b)
    if outputs == "scalar":
        return h.pow(2).sum()
    if outputs == "vector":  # m = 2
        return h[:2].sum(1)
    return h.sum(), h[0, :2]  # a tuple: m = 1 + 2


def _cotangent_loss(out, c2: torch.Tensor, c3: torch.Tensor) -> torch.Tensor:
    """A loss whose cotangent ybar on the segment's outputs is a known, non-trivial vector."""
    if isinstance(out, tuple):
        return out[0] * c3[0] + (out[1] * c2).sum()
    return out * c3[1] if out.dim() == 0 else (out * c2).sum()


def _expected(distribution, k, outputs, w, b, x, c2, c3, seed) -> list[torch.Tensor]:
    v = draw_tangents(distribution, k, [w.shape, b.shape], [F64, F64], CPU, seed)
    true = torch.func.grad(lambda w, b: _cotangent_loss(_body(w, b, x, outputs), c2, c3), argnums=(0, 1))(w, b)
    s = sum(vi.reshape(k, -1) @ gi.reshape(-1) for vi, gi in zip(v, true, strict=True))  # <J v_j, ybar>
    return [torch.tensordot(s / k, vi, dims=1) for vi in v]


def _estimate(strategy, outputs, w, b, x, c2, c3):
    seg = mf.fwd(lambda w, b, x: _body(w, b, x, outputs), name="seg")
    torch.manual_seed(2024)
    return mf.mixed_grad(lambda w, b: _cotangent_loss(seg(w, b, x), c2, c3), {"seg": strategy}, argnums=(0, 1))(w, b)


def _seed() -> int:
    torch.manual_seed(2024)  # the seed the call's tangent stream gave its one Random segment call
    return TangentStream("test").segment_seed("seg")


SHAPES = [("scalar", 1), ("scalar", 5), ("vector", 2), ("tuple", 4)]
LAWS = [("gaussian", "eager"), ("rademacher", "kept"), ("gaussian", "auto"), ("orthogonal", "auto")]


# (k = 1 with kept tangents is not contracted: U would be as large as the kept tangent, which backward scales.)
@pytest.mark.parametrize("outputs,k,distribution,seeding", [
    (o, k, d, s) for o, k in SHAPES for d, s in LAWS if not (k == 1 and s == "kept")
])
def test_contracted_in_forward_is_the_forward_gradient(outputs, k, distribution, seeding, monkeypatch) -> None:
    w, b, x, c2, c3 = _data()

    def no_regeneration(*args, **kwargs):
        raise AssertionError("backward drew the tangents again although the segment has m <= k outputs")

    monkeypatch.setattr(_random, "regenerate", no_regeneration)
    got = _estimate(mf.Random(k, distribution, seeding=seeding), outputs, w, b, x, c2, c3)
    for g, e in zip(got, _expected(distribution, k, outputs, w, b, x, c2, c3, _seed()), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seeding", ["eager", "kept", "lazy"])
def test_more_outputs_than_tangents_regenerate_in_backward(seeding: str, monkeypatch) -> None:
    """m = 3 > k = 2: contracting in forward would keep more than the tangents; backward regenerates."""
    w, b, x, c2, c3 = _data()
    calls = []
    original = _random.regenerate
    monkeypatch.setattr(_random, "regenerate", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    got = _estimate(mf.Random(2, "gaussian", seeding=seeding), "tuple", w, b, x, c2, c3)
    assert calls
    for g, e in zip(got, _expected("gaussian", 2, "tuple", w, b, x, c2, c3, _seed()), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_a_retained_graph_gives_the_same_estimate_twice() -> None:
    """backward(retain_graph=True) twice under use_plan: the contracted tangents serve both."""
    w, b, x, c2, c3 = _data()
    w, b = w.requires_grad_(), b.requires_grad_()
    seg = mf.fwd(lambda w, b, x: _body(w, b, x, "scalar"), name="seg")
    torch.manual_seed(2024)
    with mf.use_plan({"seg": mf.Random(3)}):
        loss = _cotangent_loss(seg(w, b, x), c2, c3)
    loss.backward(retain_graph=True)
    first = [w.grad.clone(), b.grad.clone()]
    loss.backward()
    for p, g in zip((w, b), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=1e-12)


def test_inspect_counts_the_contracted_tangents() -> None:
    """What a Random(k=8) loss segment keeps for backward: n numbers (U = V^T ydot), not k x n."""
    w, b, x, c2, c3 = _data()
    seg = mf.fwd(lambda w, b, x: _body(w, b, x, "scalar"), name="seg")
    report = mf.inspect(lambda w, b: seg(w, b, x), {"seg": mf.Random(8, seeding="kept")}, w, b)
    n = w.numel()  # (argnums=0: only w is differentiated)
    assert report.rows[0].saved_bytes == (n + 8) * 8  # U, plus the 8 output tangents
