"""``Exact`` seeds only the inputs its body reads (issue 18, item 1).

A segment handed a whole parameter dict (the README's pattern) that reads a few of its entries pushes one
basis tangent per scalar it *reads*: unread inputs get exact zero gradients and no tangents, and the size
guard, the cost warning and ``inspect``'s figures count read scalars only. Gradients are checked against
``torch.func.grad`` (or plain autograd) in float64; zeros exactly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch

import madfunc as mf

DT = torch.float64


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _assert_grads(got: dict, want: dict, unread: set[str]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if k in unread:  # an exact zero, not a small number
            assert torch.equal(got[k], torch.zeros_like(want[k])), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


@contextlib.contextmanager
def _no_performance_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", mf.PerformanceWarning)
        yield


def _body(p: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["w1"]) @ p["w1"].T


def test_dict_segment_reading_64_of_65600_scalars() -> None:
    """Old code: 65,600 tangents, a 32 GiB MemoryError without chunk_size (9.5 s with chunk_size=4096)."""
    params = {"w1": _randn(0, 8, 8), "w2": _randn(1, 256, 256)}  # 64 + 65,536 = 65,600 scalars
    assert sum(t.numel() for t in params.values()) == 65_600
    x = _randn(2, 5, 8)
    seg = mf.fwd(_body, name="reads_w1")

    def loss(p, x):
        return seg(p, x).pow(2).sum()

    want = torch.func.grad(lambda p, x: _body(p, x).pow(2).sum())(params, x)
    with _no_performance_warning():
        for _ in range(3):  # found by a plain pass, then remembered (and checked by each call's first pass)
            _assert_grads(mf.mixed_grad(loss)(params, x), want, {"w2"})
    row = mf.inspect(loss, {"reads_w1": mf.Exact()}, params, x).rows[0]
    assert (row.differentiated_numel, row.tangents) == (64, 64)
    assert row.saved_bytes == 64 * 5 * 8 * 8  # 64 output tangents of 5 x 8 float64 scalars
    assert not any("Exact() pushes" in flag for flag in row.flags)  # (backprop keeps less: that flag stays)


def test_inspect_predicts_from_read_scalars() -> None:
    """A costly segment under inspect is not run: its predicted sizes count the 5,000 read scalars."""
    params = {"w": _randn(0, 100, 50), "unread": _randn(1, 256, 256)}
    seg = mf.fwd(lambda p, x: torch.tanh(x @ p["w"]), name="costly")
    report = mf.inspect(lambda p, x: seg(p, x).sum(), {"costly": mf.Exact()}, params, _randn(2, 3, 100))
    row = report.rows[0]
    assert (row.differentiated_numel, row.tangents, row.output_numel) == (5000, 5000, 150)
    assert row.saved_bytes == 5000 * 150 * 8
    assert any("5000 tangents" in flag and "predicted" in flag for flag in row.flags)


def test_cost_warning_and_guard_count_read_scalars() -> None:
    """The warning names the scalars read (5,120), not the 70,656 given; the guard lets it run."""
    params = {"w": _randn(0, 80, 64), "unread": _randn(1, 256, 256)}
    seg = mf.fwd(lambda p, x: x @ p["w"], name="wide_reading_5120")
    with pytest.warns(mf.PerformanceWarning, match=r"segment 'wide_reading_5120'.* 5120 here"):
        g = mf.mixed_grad(lambda p, x: seg(p, x).sum())(params, _randn(2, 2, 80))
    assert torch.equal(g["unread"], torch.zeros(256, 256, dtype=DT))


def _branchy(p: dict, x: torch.Tensor) -> torch.Tensor:
    h = x @ p["a"]
    if h.sum() > 0:  # b is read only on this branch
        h = torch.sin(h @ p["b"])
    return h.tanh()


@pytest.mark.parametrize("order", ["skip_first", "take_first"])
def test_leaf_read_only_under_a_branch(order: str) -> None:
    """A remembered read set that misses a leaf (the branch not taken before) is corrected in the call
    that takes the branch: the first pass sees ``b`` read, and the segment runs again seeding it."""
    params = {"a": _randn(0, 4, 4), "b": _randn(1, 4, 4), "c": _randn(2, 256, 256)}
    seg = mf.fwd(_branchy, name=f"branchy_{order}")
    x = torch.ones(2, 4, dtype=DT)
    taken = x if (x @ params["a"]).sum() > 0 else -x  # (which sign takes the branch depends on a)
    xs = [-taken, taken, -taken, taken] if order == "skip_first" else [taken, -taken, taken]
    with _no_performance_warning():
        for x in xs:
            want = torch.func.grad(lambda p, x: _branchy(p, x).sum())(params, x)
            skipped = (x @ params["a"]).sum() <= 0
            got = mf.mixed_grad(lambda p, x: seg(p, x).sum())(params, x)
            _assert_grads(got, want, {"b", "c"} if skipped else {"c"})


def _flagged(p: dict, x: torch.Tensor, use_b: bool) -> torch.Tensor:
    h = torch.tanh(x @ p["a"])
    return h @ p["b"] if use_b else h


def test_leaf_read_under_a_python_flag_with_replay() -> None:
    """A non-tensor argument chooses what is read; recordings (replay) are made for each choice in turn."""
    params = {"a": _randn(0, 4, 4), "b": _randn(1, 4, 4), "c": _randn(2, 256, 256)}
    seg = mf.fwd(_flagged, name="flagged")
    x = _randn(3, 3, 4)
    with _no_performance_warning():
        for use_b in [False] * 3 + [True] * 3 + [False] * 2:
            want = torch.func.grad(lambda p, x, b: _flagged(p, x, b).sum())(params, x, use_b)
            got = mf.mixed_grad(lambda p, x, b: seg(p, x, b).sum())(params, x, use_b)
            _assert_grads(got, want, {"c"} if use_b else {"b", "c"})


def test_leaf_returned_as_it_is() -> None:
    """An input returned untouched reaches no op, yet its gradient is the output's cotangent."""
    params = {"a": _randn(0, 3, 3), "b": _randn(1, 3), "c": _randn(2, 256, 256)}
    seg = mf.fwd(lambda p, x: (torch.tanh(x @ p["a"]), p["b"]), name="returns_b")

    def plain(p, x):
        h, b = torch.tanh(x @ p["a"]), p["b"]
        return (h * b).sum() + b.pow(2).sum()

    def loss(p, x):
        h, b = seg(p, x)
        return (h * b).sum() + b.pow(2).sum()

    x = _randn(3, 2, 3)
    want = torch.func.grad(plain)(params, x)
    with _no_performance_warning():
        for _ in range(3):
            _assert_grads(mf.mixed_grad(loss)(params, x), want, {"c"})


def test_tied_dict_entries() -> None:
    """One tensor under two keys, read through one of them: as torch.func.grad, the other key's gradient
    is zero (each key is its own input), and an outer sum over the keys gives the tied gradient."""
    shared = _randn(0, 4, 4)
    params = {"a": shared, "b": shared, "c": _randn(1, 256, 256)}
    seg = mf.fwd(lambda p, x: torch.tanh(x @ p["a"]) @ p["a"], name="tied_entries")
    x = _randn(2, 3, 4)
    want = torch.func.grad(lambda p, x: (torch.tanh(x @ p["a"]) @ p["a"]).sum())(params, x)
    with _no_performance_warning():
        for _ in range(2):
            _assert_grads(mf.mixed_grad(lambda p, x: seg(p, x).sum())(params, x), want, {"b", "c"})


class _Partial(torch.nn.Module):
    """A module whose forward uses ``used`` and the tied ``embed``/``head`` pair, never ``unused`` (65,536
    weights: old code refused it with a 32 GiB MemoryError)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 6, bias=False, dtype=DT)
        self.used = torch.nn.Linear(6, 6, dtype=DT)
        self.head = torch.nn.Linear(6, 4, bias=False, dtype=DT)
        self.head.weight = torch.nn.Parameter(self.embed.weight.detach().T.clone().contiguous())
        self.unused = torch.nn.Linear(256, 256, bias=False, dtype=DT)
        self.tied = torch.nn.Linear(4, 6, bias=False, dtype=DT)
        self.tied.weight = self.embed.weight  # one parameter, two modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.used(self.embed(x)))) + self.tied(x).sum(-1, keepdim=True)


def _module_grads(model: torch.nn.Module, run, x: torch.Tensor, plan: dict | None) -> dict:
    model.zero_grad(set_to_none=True)
    with mf.use_plan(plan) if plan is not None else contextlib.nullcontext():
        run(x).pow(2).sum().backward()
    return {k: p.grad for k, p in model.named_parameters()}


def test_use_plan_module_ignoring_parameters() -> None:
    torch.manual_seed(0)
    model = _Partial()
    x = _randn(1, 5, 4)
    want = _module_grads(model, model, x, None)
    assert want["unused.weight"] is None  # autograd never reaches it
    seg = mf.fwd(model, name="partial")
    with _no_performance_warning():
        for _ in range(3):
            got = _module_grads(model, seg, x, {"partial": mf.Exact()})
            assert got.keys() == want.keys()
            for k, g in got.items():
                if k == "unused.weight":  # forward mode gives it an exact zero (or nothing)
                    assert g is None or torch.equal(g, torch.zeros(256, 256, dtype=DT))
                else:
                    torch.testing.assert_close(g, want[k], rtol=1e-10, atol=1e-12, msg=k)
