"""The imperative path: ``with mf.use_plan(plan): loss = model(x); loss.backward()`` with torch.optim."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import opaque
from torch import nn

import madfunc as mf

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


class Net(nn.Module):
    """conv stem (forward segment) -> residual MLP body (reverse segment) -> head (forward segment)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = mf.fwd(
            nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten()),
            name="stem",
        )
        self.body = mf.rev(nn.Sequential(nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 12)), name="body")
        self.head = mf.fwd(nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 3)), name="head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.body(h)  # residual glue between segments
        return self.head(h)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1, 4, 4, dtype=DT, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    return x, y


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(DT)


EXACT_PLANS = [
    None,  # every segment its default: stem and head Exact, body Reverse
    {"stem": mf.Exact(chunk_size=5), "head": "exact", "body": "rev"},
    {"*": "exact"},  # the body too
    {"*": "rev"},
]


@pytest.mark.parametrize("plan", EXACT_PLANS, ids=["defaults", "chunked", "all_exact", "all_reverse"])
def test_gradients_and_sgd_steps_equal_plain_autograd(plan) -> None:
    mixed, plain = _net(), _net()
    opt_mixed = torch.optim.SGD(mixed.parameters(), lr=0.1, momentum=0.9)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    for _ in range(3):
        for opt in (opt_mixed, opt_plain):
            opt.zero_grad()
        with mf.use_plan(plan):
            loss_mixed = F.cross_entropy(mixed(x), y)
            loss_mixed.backward()
        loss_plain = F.cross_entropy(plain(x), y)
        loss_plain.backward()
        torch.testing.assert_close(loss_mixed, loss_plain, rtol=1e-12, atol=1e-14)
        for (name, p_mixed), p_plain in zip(mixed.named_parameters(), plain.parameters(), strict=True):
            assert p_mixed.grad is not None, name
            torch.testing.assert_close(p_mixed.grad, p_plain.grad, rtol=1e-10, atol=1e-12, msg=name)
        opt_mixed.step()
        opt_plain.step()
    for p_mixed, p_plain in zip(mixed.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p_mixed, p_plain, rtol=1e-10, atol=1e-12)


def test_segment_parameters_belong_to_the_model() -> None:
    net = _net()
    names = [name for name, _ in net.named_parameters()]
    assert names[:2] == ["stem.module.0.weight", "stem.module.0.bias"]
    assert len(names) == 2 + 4 + 4
    assert isinstance(net.stem, nn.Module) and isinstance(net.stem, mf.ModuleSegment)


@pytest.mark.parametrize(
    "plan",
    [{"stem": "exact", "head": mf.Exact(chunk_size=4)}, {"stem": mf.Random(k=8, distribution="rademacher")}],
    ids=["exact", "random_stem"],
)
def test_training_loop_reduces_the_loss(plan) -> None:
    net = _net(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    x, y = _data(1)
    torch.manual_seed(0)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        with mf.use_plan(plan):
            loss = F.cross_entropy(net(x), y)
        loss.backward()  # backward may run after the block: strategies were fixed when segments ran
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_outside_use_plan_segments_are_plain_modules() -> None:
    """Outside the block there is no forward mode at all: an op forward mode cannot run runs fine, the
    gradients are bit-identical to the unwrapped modules, and inside the block the same op fails."""

    class Dist(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, x):
            return opaque(torch.cdist(self.proj(x), x))

    torch.manual_seed(0)
    inner = Dist().to(DT)
    seg = mf.fwd(inner, name="dist")
    x = torch.randn(4, 3, dtype=DT)
    seg(x).sum().backward()
    got = [p.grad.clone() for p in inner.parameters()]
    inner.zero_grad()
    inner(x).sum().backward()
    for a, p in zip(got, inner.parameters(), strict=True):
        assert torch.equal(a, p.grad)
    with pytest.raises(mf.ForwardModeError, match="segment 'dist'"):
        with mf.use_plan():
            seg(x)
    # Leaving the block (even by an error) restores plain behaviour.
    seg(x).sum().backward()


def test_plan_checked_on_exit() -> None:
    net = _net()
    x, y = _data()
    with pytest.raises(
        ValueError, match=r"use_plan: plan key.*'stme'.*Segments that ran: 'stem', 'body', 'head'"
    ):
        with mf.use_plan({"stme": "exact"}):
            F.cross_entropy(net(x), y).backward()
    # The error comes on exit, after the block's work: the gradients were computed.
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match=r"'stem' matched no segment that ran\. Segments that ran: none"):
        with mf.use_plan({"stem": "exact"}):
            pass


def test_nested_use_plan_blocks_restore_state() -> None:
    net = _net()
    x, y = _data()
    with mf.use_plan({"stem": "rev"}):
        with mf.use_plan({"head": "rev"}):
            F.cross_entropy(net(x), y).backward()
        F.cross_entropy(net(x), y).backward()
    plain = copy.deepcopy(net)
    plain.zero_grad()
    net.zero_grad()
    F.cross_entropy(plain(x), y).backward()
    with mf.use_plan():
        F.cross_entropy(net(x), y).backward()
    for p, q in zip(net.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_batchnorm_in_training_mode_inside_a_forward_segment() -> None:
    """BatchNorm in training mode updates running statistics in place. Either madfunc trains it exactly
    like autograd (same gradients, same running statistics) or it refuses with an error naming the
    segment; never a bare torch error or silently different numbers."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).to(DT)
    reference = copy.deepcopy(module)
    seg = mf.fwd(module, name="bn_stem")
    x = torch.randn(6, 3, dtype=DT)
    reference(x).pow(2).sum().backward()
    try:
        with mf.use_plan():
            loss = seg(x).pow(2).sum()
    except RuntimeError as error:
        assert "segment 'bn_stem'" in str(error)
        return
    loss.backward()
    for p, q in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(module[1].running_var, reference[1].running_var)


def test_a_use_plan_block_takes_its_tangents_seed_at_entry_and_can_be_reused() -> None:
    """The tangents come from torch's generator as it is when the block is entered (README, "Randomness"),
    not when use_plan() was called; entering one block object twice draws fresh tangents."""
    layer = mf.fwd(nn.Linear(3, 1, dtype=torch.float64), name="layer")
    x = torch.ones(2, 3, dtype=torch.float64)

    def weight_grad(block) -> torch.Tensor:
        with block:
            layer(x).sum().backward()
        g, layer.module.weight.grad = layer.module.weight.grad, None
        return g

    torch.manual_seed(0)
    block = mf.use_plan({"layer": mf.Random(k=2)})
    torch.randn(5)  # between the call and the entry
    early = weight_grad(block)
    torch.manual_seed(0)
    torch.randn(5)
    assert torch.equal(early, weight_grad(mf.use_plan({"layer": mf.Random(k=2)})))
    assert not torch.equal(weight_grad(block), weight_grad(block))
