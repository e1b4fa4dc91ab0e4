"""The cost model's memory side against measurement: every plan of a small chain, predicted from the
uniform plans' windows alone, against the deterministic peak of a real mixed_grad step."""

from __future__ import annotations

import itertools

import pytest
import torch

import madfunc as mf
from madfunc.planner.auto import _profile, _table
from madfunc.planner.profile import Step

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
SEGMENTS = [mf.rev(lambda w, h: torch.tanh(h @ w).sin(), name=f"s{i}") for i in range(3)]


def _loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = x
    for i, segment in enumerate(SEGMENTS):
        h = segment(p[f"w{i}"], h)
    return h.pow(2).sum()


def test_every_mixed_plan_of_a_chain_is_predicted_from_the_uniform_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    p = {f"w{i}": torch.randn(8, 8, dtype=DT, generator=gen) / 3 for i in range(3)}
    x = torch.randn(16, 8, dtype=DT, generator=gen)
    candidates = (mf.Reverse(), mf.Exact(), mf.Random(k=3))
    profile = _profile(Step(_loss, (p, x), 0), candidates, repeats=1)
    table = _table(profile, lambda c: True)
    assert all(len(options) == 3 for options in table.candidates.values())  # n = 64 + 128 <= 4096: Exact too
    for combo in itertools.product(*table.candidates.values()):
        assignment = dict(zip(table.segments, combo, strict=True))
        plan = mf.Plan({name: c.strategy for name, c in assignment.items()})
        grad = mf.mixed_grad(_loss, plan)
        grad(p, x), grad(p, x)  # forward segments record their replay on the second call
        with mf.measure_peak() as meter:
            grad(p, x)
        # Each window's figures come from the uniform plan of its strategy; what a window frees of its input
        # is charged to the consumer. On a chain that accounting is exact: the prediction matched to the byte
        # in every run so far. The 1% slack (the target is 15%) is for the order of frees inside a
        # window, which a future engine may change; an error in the model is larger.
        assert table.peak(assignment) == pytest.approx(meter.peak_bytes, rel=0.01), plan
