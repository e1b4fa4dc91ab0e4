"""A strategy defined here, outside the package, works everywhere a built-in one does.

``Coordinates`` estimates the gradient from ``k`` coordinate axes drawn without replacement, scaled by
``n / k``: coordinate ``i`` is drawn with probability ``k / n``, so ``E[g^_i] = g_i`` and
``E||g^ - g||^2 = sum_i g_i^2 (n/k - 1)``, a relative variance of exactly ``n / k - 1``. It implements the
public contract only (``madfunc.Strategy``, ``madfunc.strategies.EngineView``/``StrategyState``) and is
run through ``mixed_grad``, ``use_plan``, ``Plan.from_string``, ``compare`` (whose variance column reads its
law) and ``inspect``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import pytest
import torch

import madfunc as mf
from madfunc.strategies import EngineView, Shared, StrategyState
from madfunc.strategies.base import Meta, Passes, SegmentStats

DT = torch.float64


@dataclasses.dataclass(frozen=True)
class Chosen(StrategyState):
    axes: torch.Tensor  # the k coordinates drawn, among the n differentiated scalars


@dataclasses.dataclass(frozen=True)
class Coordinates(mf.Strategy, kind="coordinates", fields=("K",)):
    k: int = 1
    stochastic = True  # draws from the call's seed (engine.seed)

    def push(self, engine: EngineView, tensors: Sequence[torch.Tensor], diff_tensors: Sequence[torch.Tensor],
             n: int) -> tuple[Passes, StrategyState]:
        assert engine.seed is not None
        axes = torch.randperm(n, generator=torch.Generator().manual_seed(engine.seed))[: self.k]
        basis = torch.zeros(len(axes), n, dtype=DT)
        basis[torch.arange(len(axes)), axes] = 1.0
        pieces = basis.split([t.numel() for t in diff_tensors], dim=1)
        tangents = [p.reshape(len(axes), *t.shape).to(t) for p, t in zip(pieces, diff_tensors, strict=True)]
        engine.stats.tangents = len(axes)
        engine.begin_pass()
        return engine.push(tensors, engine.diff, tangents), Chosen(axes)

    def combine(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                shared: Shared | None = None) -> list[torch.Tensor | None]:
        assert isinstance(state, Chosen)
        sizes = [math.prod(shape) for shape, _, _ in meta]
        flat = torch.zeros(sum(sizes), dtype=DT)
        if s is not None:
            flat[state.axes] = s.to(DT) * (sum(sizes) / len(state.axes))
        return [p.reshape(shape).to(dtype) for p, (shape, dtype, _) in zip(flat.split(sizes), meta, strict=True)]

    def variance(self, stats: SegmentStats) -> float | None:
        n = stats.differentiated_numel or 0
        return n / self.k - 1 if n else None


def _model() -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3).to(DT)
    return layer, torch.randn(6, 4, dtype=DT)


def _loss(params: dict, x: torch.Tensor, seg: mf.ModuleSegment) -> torch.Tensor:
    return seg(params, x).tanh().pow(2).sum()


def _reference(layer: torch.nn.Linear, x: torch.Tensor) -> dict:
    params = dict(layer.named_parameters())
    return torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).tanh().pow(2).sum())(params)


def test_the_string_form_comes_from_the_class():
    plan = mf.Plan.from_string("layer=coordinates:3")
    assert plan["layer"] == Coordinates(k=3)
    assert str(plan) == "layer=coordinates:3"
    assert mf.Plan({"layer": "coordinates:2"})["layer"] == Coordinates(k=2)  # a string wherever a strategy goes
    with pytest.raises(ValueError, match=r"coordinates\[:K\]"):  # and the error's syntax lists it
        mf.Plan.from_string("layer=nope")
    with pytest.raises(ValueError, match=r"coordinates:K: K must be an integer >= 1, got '0'"):
        mf.Plan.from_string("layer=coordinates:0")


def test_mixed_grad_with_all_coordinates_is_exact():
    layer, x = _model()
    seg = mf.fwd(layer, name="layer")
    params = dict(layer.named_parameters())
    got = mf.mixed_grad(_loss, {"layer": Coordinates(k=15)})(params, x, seg)  # n = 12 + 3: every axis
    want = _reference(layer, x)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)


def test_mixed_grad_is_unbiased():
    """The mean of m draws of each coordinate: every draw is 0 or g_i n/k, so Hoeffding's inequality bounds
    P(|mean - g_i| >= t) <= 2 exp(-2 m t^2 / (g_i n/k)^2); t is set so that this is 1e-6 per coordinate, a
    false-failure rate below 1.5e-5 over the 15 coordinates."""
    layer, x = _model()
    seg = mf.fwd(layer, name="layer")
    params = dict(layer.named_parameters())
    grad = mf.mixed_grad(_loss, {"layer": Coordinates(k=4)}, generator=torch.Generator().manual_seed(1))
    m, scale = 2000, 15 / 4
    draws = torch.stack([torch.cat([g.reshape(-1) for g in grad(params, x, seg).values()]) for _ in range(m)])
    mean = draws.mean(0)
    want = torch.cat([g.reshape(-1) for g in _reference(layer, x).values()])
    # The scale, exactly, on every draw: k axes each give (n/k) g_i, so sum_i g^_i / g_i = n (a wrong scale such as
    # n/(k+1), which the bound below could miss, fails here).
    assert bool(want.abs().min() > 0)
    torch.testing.assert_close((draws / want).sum(1), torch.full((m,), 15.0, dtype=DT), rtol=1e-12, atol=1e-9)
    t = want.abs() * scale * math.sqrt(math.log(2 / 1e-6) / (2 * m))
    assert bool(((mean - want).abs() <= t + 1e-12).all()), (mean - want).abs() / t


def test_use_plan_backward_with_all_coordinates_is_exact():
    layer, x = _model()
    seg = mf.fwd(layer, name="layer")
    with mf.use_plan({"layer": Coordinates(k=15)}):
        seg(x).tanh().pow(2).sum().backward()
    want = _reference(layer, x)
    for key, param in layer.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(param.grad, want[key], rtol=1e-12, atol=1e-12)


def test_compare_reads_its_variance_law_and_inspect_its_tangents():
    layer, x = _model()
    seg = mf.fwd(layer, name="layer")
    params = dict(layer.named_parameters())
    report = mf.compare(_loss, {"layer": Coordinates(k=5)}, params, x, seg, draws=8)
    assert report.variance_theory == pytest.approx(15 / 5 - 1)
    rows = mf.inspect(_loss, mf.Plan.from_string("layer=coordinates:5"), params, x, seg).rows
    assert [(row.name, row.tangents) for row in rows] == [("layer", 5)]
