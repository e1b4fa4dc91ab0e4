"""The seed-fused optimizer (madfunc/optim.py): its update equals ``p.grad`` then ``torch.optim.SGD``'s, and no
parameter-sized gradient buffer exists for the parameters it takes from a ``Random`` segment."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

import madfunc as mf
from madfunc.optim import SeedSGD


class Body(nn.Module):
    """The Random segment: an embedding (tied to the head outside the segment) and two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin1 = nn.Linear(6, 6)
        self.lin2 = nn.Linear(6, 6)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin2(torch.tanh(self.lin1(self.emb(idx)))))


class Net(nn.Module):
    """A Random part (``body``), a Reverse part (``mid``) and a tied weight (the head reuses ``body.emb``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.mid = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.ones(()))  # outside every segment: plain autograd

    def forward(self, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.body(idx)) * self.scale
        logits = h @ self.body.emb.weight.T
        return nn.functional.cross_entropy(logits.reshape(-1, 11), target.reshape(-1))


def _strategies() -> list:
    rows = [
        pytest.param(mf.Random(k=3), id="random-k3"),
        pytest.param(mf.Random(k=1, distribution="rademacher", seeding="lazy"), id="random-k1-lazy"),
        pytest.param(mf.Random(k=2, seeding="kept"), id="random-k2-kept"),
    ]
    return [*rows, pytest.param(mf.SPSA(k=2, eps=1e-4), id="spsa")]


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 11, (4, 5), generator=gen), torch.randint(0, 11, (4, 5), generator=gen)


def _backward(model: Net, strategy, step: int, micro: int = 0) -> None:
    """One backward of a micro-batch under the plan, with tangents fixed by (step, micro)."""
    idx, target = _data(10 * step + micro)
    gen = torch.Generator().manual_seed(1000 * step + micro)
    with mf.use_plan({"body": strategy, "mid": "rev"}, generator=gen):
        model(idx, target).backward()


@pytest.fixture
def marked():
    """Two identical float64 models with the same segments marked: one for each optimizer."""
    torch.manual_seed(0)
    fused = Net().double()
    plain = copy.deepcopy(fused)
    handles = [mf.mark_segments(m, {"body": "fwd", "mid": "rev"}) for m in (fused, plain)]
    yield fused, plain
    for h in handles:
        h.remove()


HYPER = [
    pytest.param({}, id="plain"),
    pytest.param({"weight_decay": 0.1}, id="wd"),
    pytest.param({"momentum": 0.9, "weight_decay": 0.05, "dampening": 0.1}, id="momentum"),
    pytest.param({"momentum": 0.8, "nesterov": True}, id="nesterov"),
]


@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("strategy", _strategies())
def test_fused_update_equals_grad_then_sgd(marked, strategy, hyper):
    """Over several steps with gradient accumulation (2 backward calls per step), float64: the same
    parameters as ``p.grad`` then ``torch.optim.SGD``, to rounding."""
    fused, plain = marked
    opt = SeedSGD(fused.parameters(), lr=0.05, **hyper)
    ref = torch.optim.SGD(plain.parameters(), lr=0.05, **hyper)
    initial = copy.deepcopy(fused.state_dict())
    for step in range(3):
        for micro in range(2):
            _backward(fused, strategy, step, micro)
            _backward(plain, strategy, step, micro)
        # the Random segment's own parameters wait as records; the tied weight keeps its head part in p.grad
        assert fused.body.lin1.weight.grad is None and opt.pending() > 0
        assert fused.body.emb.weight.grad is not None and fused.mid.weight.grad is not None
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)
        assert not torch.equal(p, initial[name]), name  # trained, not left alone


def test_zero_grad_clears_deferred_parts(marked):
    fused, plain = marked
    opt = SeedSGD(fused.parameters(), lr=0.1)
    ref = torch.optim.SGD(plain.parameters(), lr=0.1)
    _backward(fused, mf.Random(k=2), 0)  # discarded by zero_grad: no trace of it may reach the step
    _backward(plain, mf.Random(k=2), 0)
    assert opt.pending() == 5  # the Random segment's parameters: emb.weight, lin1's and lin2's weights and biases
    opt.zero_grad()
    ref.zero_grad()
    assert opt.pending() == 0
    _backward(fused, mf.Random(k=2), 1)
    _backward(plain, mf.Random(k=2), 1)
    opt.step()
    ref.step()
    for p, q in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_plain_optimizer_unchanged(marked):
    """A parameter in no SeedSGD gets ``p.grad`` as today, also beside a SeedSGD holding others."""
    fused, _ = marked
    opt = SeedSGD(fused.body.lin1.parameters(), lr=0.1)
    _backward(fused, mf.Random(k=2), 0)
    assert fused.body.lin1.weight.grad is None and opt.pending() == 2
    assert fused.body.lin2.weight.grad is not None  # not claimed: an ordinary gradient


def test_deleted_optimizer_releases_its_parameters(marked):
    fused, _ = marked
    opt = SeedSGD(fused.parameters(), lr=0.1)
    ref = weakref.ref(opt)
    del opt
    assert ref() is None
    _backward(fused, mf.Random(k=2), 0)
    assert fused.body.lin1.weight.grad is not None


def test_clip_grad_norm_counts_deferred_parts(marked):
    """``opt.clip_grad_norm_`` gives torch's norm of the whole gradient and clips the same."""
    fused, plain = marked
    opt = SeedSGD(fused.parameters(), lr=0.1)
    ref = torch.optim.SGD(plain.parameters(), lr=0.1)
    _backward(fused, mf.Random(k=3), 0)
    _backward(plain, mf.Random(k=3), 0)
    norm = opt.clip_grad_norm_(0.01)
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.01)
    torch.testing.assert_close(norm, expected, rtol=1e-12, atol=0)
    assert float(expected) > 0.01  # the clip happened
    opt.step()
    ref.step()
    for p, q in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip(marked):
    fused, plain = marked
    opt = SeedSGD(fused.parameters(), lr=0.1, momentum=0.9)
    _backward(fused, mf.Random(k=2), 0)
    opt.step()
    opt.zero_grad()
    state = copy.deepcopy(opt.state_dict())
    assert len(state["state"]) == len(list(fused.parameters()))  # one momentum buffer each
    other = SeedSGD(plain.parameters(), lr=0.5, momentum=0.9)
    other.load_state_dict(state)
    assert other.param_groups[0]["lr"] == 0.1
    for i, entry in state["state"].items():
        torch.testing.assert_close(other.state_dict()["state"][i]["momentum_buffer"], entry["momentum_buffer"])


def test_functional_transforms_are_not_deferred(marked):
    """Under mixed_grad the gradients come back as tensors (nothing deferred, nothing pending)."""
    fused, _ = marked
    opt = SeedSGD(fused.parameters(), lr=0.1)
    params = dict(fused.named_parameters())
    idx, target = _data(0)

    def loss(p):
        return torch.func.functional_call(fused, p, (idx, target))

    grads = mf.mixed_grad(loss, {"body": mf.Random(k=2), "mid": "rev"})(params)
    assert grads["body.lin1.weight"].shape == (6, 6) and opt.pending() == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, r"SeedSGD\(lr=-1.0\): lr must be >= 0"),
        ({"momentum": "0.9"}, TypeError, r"SeedSGD\(momentum=...\): expected a float"),
        ({"nesterov": True}, ValueError, r"Nesterov momentum needs momentum > 0"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        SeedSGD([nn.Parameter(torch.ones(2))], **kwargs)


def test_parameter_in_two_seed_optimizers_is_refused():
    p = nn.Parameter(torch.ones(3))
    first = SeedSGD([p], lr=0.1)
    with pytest.raises(ValueError, match=r"already handled by another seed-fused optimizer \(SeedSGD"):
        SeedSGD([p], lr=0.1)
    other = SeedSGD([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="already handled"):
        other.add_param_group({"params": [p]})
    assert len(other.param_groups) == 1  # the refused group was not added
    del first
    SeedSGD([p], lr=0.1)  # the first one is gone: its claim went with it


def _peak_of_step(fused: bool, momentum: float) -> tuple[int, int, int]:
    """Live tensor bytes (mf.measure_peak) of one whole step of a 3.4 MiB model under Random(k=1) (lazy seeding:
    one leaf's tangents at a time in forward too): the step's peak, the bytes it leaves alive (the optimizer's
    state, made in this first step), and the parameters' bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(384, 384) for _ in range(6)])
    handle = mf.mark_segments(model, {"": "fwd"})
    opt = (SeedSGD if fused else torch.optim.SGD)(model.parameters(), lr=1e-3, momentum=momentum)
    x = torch.randn(4, 384)
    with mf.measure_peak() as meter:
        with mf.use_plan({"*": mf.Random(k=1, seeding="lazy")}, generator=torch.Generator().manual_seed(0)):
            model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    return meter.peak_bytes, meter.live_bytes, sum(p.numel() * p.element_size() for p in model.parameters())


def test_fused_step_holds_no_parameter_sized_gradient():
    """p.grad then SGD peaks at the parameters' size (their gradients); the fused step at about one leaf's:
    its tangent, regenerated and scaled in place into the leaf's update, plus activations of 4 x 384."""
    leaf = 384 * 384 * 4
    plain, _, params = _peak_of_step(False, 0.0)
    fused, fused_left, _ = _peak_of_step(True, 0.0)
    assert plain >= params  # every gradient alive at once before the step
    assert fused < 1.25 * leaf < params / 4  # measured: 1.07 leaves (tangent, activations, a bias)
    assert fused_left == 0  # SGD without momentum keeps nothing
    # Momentum keeps one buffer per parameter (as torch.optim.SGD's): the parameters' size, held between steps.
    _, momentum_left, _ = _peak_of_step(True, 0.9)
    assert momentum_left == params


def test_deferred_coefficients_under_a_process_group_are_the_reduced_ones():
    """Under a process group, a parameter's record carries the coefficients reduced over ranks (``shared.s``),
    an activation's this rank's own, and a parameter the segment did not read gets no record (as combine
    gives it None); the engine tells the reduction what it returned."""
    from types import SimpleNamespace

    from madfunc.engine.forward import _defer
    from madfunc.strategies.base import Shared

    recorded = []
    reduction = SimpleNamespace(read=[True, False, False], record=recorded.append)
    shared = Shared(s=torch.tensor([4.0, 8.0]), params=[True, False, True], reduction=reduction)
    engine = SimpleNamespace(seed=7, used=[True, True, False], name="body")
    meta = [(torch.Size([3]), torch.float32, torch.device("cpu"))] * 3
    local = torch.tensor([1.0, 2.0])
    records = mf.Random(k=2).seed_records(engine, None, local, meta, shared)
    assert records is not None and records[2] is None
    torch.testing.assert_close(records[0].coef, torch.tensor([2.0, 4.0]))  # reduced s / k
    torch.testing.assert_close(records[1].coef, torch.tensor([0.5, 1.0]))  # local s / k

    p, a, unread = nn.Parameter(torch.ones(3)), torch.ones(3), nn.Parameter(torch.ones(3))
    opt = SeedSGD([p, unread], lr=1.0)
    grads = _defer([p, a, unread], records, shared)
    assert grads[0] is None and grads[2] is None and opt.pending() == 1
    assert recorded == [grads]
    torch.testing.assert_close(grads[1], records[1].gradient())


@pytest.mark.parametrize("strategy", [mf.Random(k=2, distribution="orthogonal"), mf.Activity(k=2), mf.Exact()],
                         ids=str)
def test_strategies_that_cannot_defer_fill_p_grad(marked, strategy):
    """Orthogonal tangents (drawn jointly), per-example Activity and Exact have no seed record: their parameters
    get ``p.grad`` as usual and SeedSGD applies it as torch.optim.SGD does."""
    fused, plain = marked
    opt = SeedSGD(fused.parameters(), lr=0.1, momentum=0.5)
    ref = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.5)
    for step in range(2):
        _backward(fused, strategy, step)
        _backward(plain, strategy, step)
        assert opt.pending() == 0 and fused.body.lin1.weight.grad is not None
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    for p, q in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_under_a_process_group(marked):
    """use_plan(process_group=...) on one gloo rank: the deferred path with the reduction (records from the reduced
    coefficients, the reduction told what autograd got) steps as p.grad then torch.optim.SGD."""
    import torch.distributed as dist

    fused, plain = marked
    opt = SeedSGD(fused.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for step in range(2):
            for model, optimizer in ((fused, opt), (plain, ref)):
                idx, target = _data(step)
                with mf.use_plan({"body": mf.Random(k=2), "mid": "rev"}, generator=torch.Generator().manual_seed(step),
                                 process_group=dist.group.WORLD):
                    model(idx, target).backward()
                assert model is plain or (opt.pending() > 0 and fused.body.lin1.weight.grad is None)
                optimizer.step()
                optimizer.zero_grad()
    finally:
        dist.destroy_process_group()
    for p, q in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
