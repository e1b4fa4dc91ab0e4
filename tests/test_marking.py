"""``mf.mark_segments``: submodules become segments by module path, and the model is otherwise unchanged.

Every gradient is compared with plain autograd or ``torch.func.grad`` in float64 (Exact: to 1e-12); marking
must leave parameter names, checkpoints, hooks, copies and pickles as they were, and its errors name the key.
HuggingFace models (Llama, GPT-2, PEFT, save/load, generate, compile): tests/test_marking_hf.py.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn

import madfunc as mf
from madfunc.engine import replay as _replay
from madfunc.marking import _MarkedForward

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A residual block with a nested submodule (``inner``), to mark at several depths."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.inner = nn.Sequential(nn.Linear(6, 6), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(torch.tanh(self.lin(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def _x() -> torch.Tensor:
    return torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) ** 2).mean()


def _autograd(model: nn.Module, x: torch.Tensor, plan: dict | None = None) -> dict[str, torch.Tensor]:
    """Gradients of every parameter by ``loss.backward()`` (under ``use_plan(plan)`` if a plan is given)."""
    model.zero_grad(set_to_none=True)
    if plan is None:
        _loss(model, x).backward()
    else:
        with mf.use_plan(plan):
            _loss(model, x).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_close(got: dict, expected: dict, tol: float = 1e-12) -> None:
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=tol, msg=k)


def _marked(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m.__dict__.get("forward"), _MarkedForward)}


# (spec, plan) pairs: every plan gives an exact gradient.
CASES = {
    "blocks-default": ({"blocks.*": "fwd"}, {}),
    "all-by-name": (
        {"stem": "fwd", "blocks.*": "fwd", "head": "rev"},
        {"stem": "exact", "blocks.0": mf.Exact(chunk_size=7), "blocks.1": "exact", "head": "exact"},
    ),
    "strategy-default-overridden": ({"blocks.*": mf.Random(k=3)}, {"blocks.*": "exact"}),
    "root": ({"": "fwd"}, {}),
    "nested-rev-outer": ({"blocks.*": "rev", "blocks.*.inner": "fwd"}, {"blocks.*.inner": "exact"}),
    "nested-fwd-outer": ({"blocks.*": "fwd", "blocks.?.inner": "rev"}, {"blocks.*": "exact", "blocks.?": "exact"}),
    "leaf-modules": ({"blocks.*.lin": "fwd", "head.1": "fwd"}, {"*": "exact"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_use_plan_exact_matches_autograd(case: str) -> None:
    spec, plan = CASES[case]
    model, x = _net(), _x()
    reference = _autograd(model, x)
    with mf.mark_segments(model, spec) as handle:
        _assert_close(_autograd(model, x, plan), reference)
        _assert_close(_autograd(model, x, plan), reference)  # the second call, which records the passes
        _assert_close(_autograd(model, x, plan), reference)  # and the third, which replays them
        assert any(_replay.replayed(name) for name in handle.segments)
    assert not _marked(model)


class TrainFlag(nn.Module):
    """No parameters; its computation depends on ``self.training`` alone (neither random nor updating state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) if self.training else torch.sin(x)


def test_replay_keys_on_every_submodules_training_flag() -> None:
    """A recording made in eval mode is not replayed once a parameterless submodule is put in train mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(TrainFlag(), nn.Tanh()), nn.Linear(6, 1)).double().eval()
    x = _x()
    with mf.mark_segments(model, {"1": "fwd"}):  # no parameters: only its activation input is differentiated
        for _ in range(3):
            _assert_close(_autograd(model, x, {"1": "exact"}), _autograd(model, x))
        assert _replay.replayed("1")
        model[1][0].train()  # only the parameterless submodule
        _assert_close(_autograd(model, x, {"1": "exact"}), _autograd(model, x))


@pytest.mark.parametrize("traceable", [False, True], ids=["default", "traceable"])
@pytest.mark.parametrize("case", ["blocks-default", "all-by-name", "root", "nested-rev-outer"])
def test_mixed_grad_of_functional_call_matches_torch_func_grad(case: str, traceable: bool) -> None:
    spec, plan = CASES[case]
    if traceable:  # traceable segments take Exact() without a chunk size
        plan = {k: "exact" if isinstance(v, mf.Exact) else v for k, v in plan.items()}
    model, x = _net(), _x()
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(params: dict, x: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(model, params, (x,)) ** 2).mean()

    reference = torch.func.grad(loss, argnums=(0, 1))(params, x)
    mf.mark_segments(model, spec)
    got = mf.mixed_grad(loss, plan, argnums=(0, 1), traceable=traceable)(params, x)
    _assert_close(got[0], reference[0])
    torch.testing.assert_close(got[1], reference[1], rtol=0, atol=1e-12)


def test_segments_run_in_forward_mode_under_their_qualified_names() -> None:
    """Random estimates differ from the gradient (so forward mode ran), only where the plan put them."""
    model, x = _net(), _x()
    reference = _autograd(model, x)
    handle = mf.mark_segments(model, {"blocks.*": "fwd", "stem": mf.Random(k=2)})
    assert handle.segments == {"stem": mf.Random(k=2), "blocks.0": mf.Exact(), "blocks.1": mf.Exact()}
    _assert_close(_autograd(model, x, {"stem": "exact"}), reference)
    got = _autograd(model, x, {"blocks.1": mf.Random(k=2)})  # stem: Random by default, too
    for k in reference:
        if k.startswith("head."):  # downstream of every estimate
            torch.testing.assert_close(got[k], reference[k], rtol=0, atol=1e-12)
        else:  # an estimate, or upstream of one
            assert not torch.allclose(got[k], reference[k])
    got = _autograd(model, x, {"stem": mf.Random(k=2)})
    for k in reference:
        assert torch.allclose(got[k], reference[k], rtol=0, atol=1e-12) != k.startswith("stem.")
    report = mf.inspect(lambda p, x: (torch.func.functional_call(model, p, (x,)) ** 2).mean(),
                        {"blocks.*": "exact"}, dict(model.named_parameters()), x)
    assert [row.name for row in report.rows] == ["stem", "blocks.0", "blocks.1"]


def test_plan_keys_are_checked_against_qualified_names() -> None:
    model, x = _net(), _x()
    mf.mark_segments(model, {"blocks.*": "fwd"})
    with pytest.raises(ValueError, match=r"plan key 'block\.\*' matched no segment.*'blocks\.0', 'blocks\.1'"):
        _autograd(model, x, {"block.*": "exact"})


def test_pattern_marks_outermost_matches_only() -> None:
    model = _net()
    handle = mf.mark_segments(model, {"blocks.*": "fwd", "*": "rev"})
    # "*" marks the top-level modules (not the root); "blocks.*" the blocks, not their submodules.
    assert list(handle.segments) == ["stem", "blocks", "blocks.0", "blocks.1", "head"]
    assert _marked(model) == set(handle.segments)
    handle.remove()
    handle = mf.mark_segments(model, {"blocks.*": "fwd", "blocks.0": "rev", "blocks.1.inner": "rev"})
    assert handle.segments == {"blocks.0": mf.Reverse(), "blocks.1": mf.Exact(), "blocks.1.inner": mf.Reverse()}


class Tied(nn.Module):
    """Tied weights (one Parameter in two slots, as an LM's embedding and head) and one module at two paths."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4), nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        self.act = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.again = self.act  # the same module, registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.again(self.act(self.enc(x))))


def _tied() -> Tied:
    torch.manual_seed(0)
    return Tied().double()


def _functional_loss(model: nn.Module):  # noqa: ANN202
    def loss(params: dict, x: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(model, params, (x,)) ** 2).mean()

    return loss


@pytest.mark.parametrize("spec", [{"": "fwd"}, {"*": "fwd"}, {"act": "fwd", "dec": "fwd"}], ids=["root", "all", "two"])
def test_tied_weights_and_shared_modules(spec: dict) -> None:
    x = _x()
    model = _tied()
    plain = _autograd(model, x)
    handle = mf.mark_segments(model, spec)
    assert "again" not in handle.segments  # a shared module is one segment, under its first path
    _assert_close(_autograd(model, x, {"*": "exact"}), plain)
    handle.remove()
    with pytest.raises(ValueError, match=r"'act' and 'again' are one shared module, marked with different values"):
        mf.mark_segments(model, {"act": "fwd", "again": "rev"})

    # (Fresh models: torch.func.functional_call leaves its argument tensors in a module registered under two
    # paths once it returns, torch 2.13.)
    params = {k: p.detach() for k, p in model.named_parameters()}
    assert "dec.weight" not in params  # it is "enc.weight"
    reference = torch.func.grad(_functional_loss(_tied()))(params, x)
    for traceable in (False, True):
        model = _tied()
        mf.mark_segments(model, spec)
        _assert_close(mf.mixed_grad(_functional_loss(model), {"*": "exact"}, traceable=traceable)(params, x), reference)


# -- the model is otherwise unchanged ------------------------------------------------------------------------


def test_names_checkpoints_and_remove() -> None:
    model, x = _net(), _x()
    keys = list(model.state_dict())
    names = [k for k, _ in model.named_parameters()]
    expected = model(x)
    handle = mf.mark_segments(model, {"": "fwd", "blocks.*": "fwd", "head": "rev"})
    assert list(model.state_dict()) == keys and [k for k, _ in model.named_parameters()] == names
    assert inspect.signature(model.forward) == inspect.signature(Net.forward.__get__(model))  # for HF's checks
    assert "segment 'blocks.0'" in repr(model.blocks[0].forward)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)

    other = _net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    model.load_state_dict(other.state_dict())  # while marked: the same keys, the new values are used
    _assert_close(_autograd(model, x, {"*": "exact"}), _autograd(other, x))  # "*": the root segment, named ""

    handle.remove()
    handle.remove()  # idempotent
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert "blocks.0" in repr(handle) and "removed" in repr(handle)
    with mf.mark_segments(model, {"blocks.*": "fwd"}):
        assert _marked(model) == {"blocks.0", "blocks.1"}
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_instance_forward_is_kept_and_restored() -> None:
    model, x = _net(), _x()
    own = model.blocks[0].forward  # e.g. what accelerate's hooks install: a bound method in __dict__
    calls = []

    def instance_forward(h: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return own(h)

    model.blocks[0].forward = instance_forward
    reference = _autograd(model, x)
    with mf.mark_segments(model, {"blocks.0": "fwd"}):
        _assert_close(_autograd(model, x, {"blocks.0": "exact"}), reference)
    assert model.blocks[0].__dict__["forward"] is instance_forward
    assert calls


def test_hooks_run_once_around_the_segment() -> None:
    model, x = _net(), _x()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append("pre"))
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append("post") or out * 2)
    reference = _autograd(model, x)
    seen.clear()
    mf.mark_segments(model, {"blocks.0": "fwd"})
    _assert_close(_autograd(model, x, {"blocks.0": mf.Exact(chunk_size=5)}), reference)
    assert seen == ["pre", "post"]


def test_deepcopy_runs_the_copys_parameters() -> None:
    model, x = _net(), _x()
    handle = mf.mark_segments(model, {"blocks.*": "fwd", "stem": "fwd"})
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    assert _marked(twin) == {"stem", "blocks.0", "blocks.1"}
    assert twin.blocks[0].forward.module is twin.blocks[0]
    got = _autograd(twin, x, {"blocks.*": "exact"})
    assert all(p.grad is None for p in model.parameters())  # the original's parameters took no part
    handle.remove()  # the original's handle leaves the copy marked
    assert _marked(twin) == {"stem", "blocks.0", "blocks.1"}
    del twin.stem.forward, twin.blocks[0].forward, twin.blocks[1].forward  # what the error message suggests
    _assert_close(got, _autograd(twin, x))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_round_trip(how: str) -> None:
    model, x = _net(), _x()
    reference = _autograd(model, x)
    mf.mark_segments(model, {"blocks.*": "fwd"})
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert _marked(loaded) == {"blocks.0", "blocks.1"}
    _assert_close(_autograd(loaded, x, {"blocks.*": "exact"}), reference)
    with pytest.raises(ValueError, match="already marked"):
        mf.mark_segments(loaded, {"blocks.0": "fwd"})


# -- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"block.*": "fwd"}, r"key 'block\.\*' matched no module of Net.*Close module names: .*'blocks\.0'"),
        ({"blocks.2": "fwd"}, r"key 'blocks\.2' matched no module.*'blocks\.0'"),
        ({"net.blocks.0": "fwd"}, r"Did you mean 'blocks\.0' \(without the prefix 'net\.'\)"),
        ({"0.lin": "fwd"}, r"Did you mean 'blocks\.0\.lin' \(with the prefix 'blocks\.'\)"),
        ({"blocks.*": "forward"}, r"spec\['blocks\.\*'\]: unknown value 'forward'; expected 'fwd'.*'rev'"),
        ({"*": "fwd", "s*": "exact", "st*": "rev"}, r"'stem' is matched by several keys with different values"),
    ],
)
def test_value_errors(spec: dict, match: str) -> None:
    model = _net()
    with pytest.raises(ValueError, match=match):
        mf.mark_segments(model, spec)
    assert not _marked(model)  # nothing marked by a failed call


@pytest.mark.parametrize(
    ("model", "spec", "match"),
    [
        (torch.zeros(3), {"": "fwd"}, r"mark_segments\(model, spec\): expected an nn\.Module, got Tensor"),
        (None, {"stem": 3}, r"spec\['stem'\]: expected 'fwd'.*strategy.*got int 3"),
        (None, {1: "fwd"}, r"keys must be module names or patterns \(str\), got 1"),
        (None, ["stem"], r"expected a mapping"),
    ],
)
def test_type_errors(model, spec, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        mf.mark_segments(_net() if model is None else model, spec)


def test_already_marked_is_refused_by_path() -> None:
    model = _net()
    first = mf.mark_segments(model, {"blocks.0": "fwd"})
    with pytest.raises(ValueError, match=r"module 'blocks\.0' is already marked.*\.remove\(\)"):
        mf.mark_segments(model, {"blocks.*": "rev"})
    assert _marked(model) == {"blocks.0"}  # the failed call marked nothing, not even blocks.1
    first.remove()
    mf.mark_segments(model, {"blocks.*": "rev"})
    assert _marked(model) == {"blocks.0", "blocks.1"}

