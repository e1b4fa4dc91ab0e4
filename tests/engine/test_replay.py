"""Record-and-replay of forward segments' tangent passes (madfunc/engine/replay.py, graphclean.py).

Every gradient is compared with torch.func.grad in float64. A replayed pass must give the eager engine's
values; a key that changes (shapes, dtypes, differentiated arguments, non-tensor arguments, closure scalars,
modules' training flags) must never replay a stale recording; and each reason a pass is not recorded has
a test that it falls back to the eager engine, with the gradient still right.
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad
from torch.fx.experimental.proxy_tensor import make_fx

import madfunc as mf
from engine.test_forward import _cnn  # AutoMAD's test CNN (conv, tanh, conv, relu, pools, linear)
from madfunc.engine import recordable
from madfunc.engine import replay as _replay
from madfunc.engine.graphclean import pool_by_slices
from madfunc.ops.scalars import ScalarForms

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def record_at_once() -> Iterator[None]:
    """Record on a pass's first clean sighting (the library waits for the second), from an empty cache."""
    before = _replay.RECORD_AFTER
    _replay.RECORD_AFTER = 1
    _replay.clear()
    yield
    _replay.RECORD_AFTER = before
    _replay.clear()


def _close(got, want) -> None:
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


CNN = mf.fwd(_cnn, name="cnn")


def _cnn_args(batch: int, dtype: torch.dtype = torch.float64) -> tuple:
    g = torch.Generator().manual_seed(batch)
    shapes = ((4, 3, 3, 3), (4,), (5, 4, 3, 3), (5,), (7, 45), (7,))
    params = tuple(torch.randn(*s, generator=g, dtype=dtype) * 0.3 for s in shapes)
    return params, torch.randn(batch, 3, 16, 16, generator=g, dtype=dtype), torch.randn(batch, 7, generator=g,
                                                                                          dtype=dtype)


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Exact(chunk_size=50)], ids=repr)
def test_replayed_passes_give_the_exact_gradient(strategy: mf.Strategy) -> None:
    g = mf.mixed_grad(lambda p, x, y: CNN(p, x, y), {"cnn": strategy})
    args = _cnn_args(2)
    want = grad(_cnn)(*args)
    for _ in range(3):  # eager (and recorded), then replayed twice
        _close(g(*args), want)
    assert _replay.replayed("cnn") == 1  # the leaf groups' passes (3, or 13 of 50 tangents) as one recording
    # a big tangent batch takes the strided-slice pooling, still exact
    args = _cnn_args(64)
    for _ in range(2):
        _close(g(*args), grad(_cnn)(*args))


@pytest.mark.parametrize("k,seeding", [(1, "kept"), (4, "eager"), (3, "auto")])
def test_random_passes_replay_with_the_same_estimate_and_unused_inputs(k: int, seeding: str) -> None:
    """A Random pass replays too, giving its eager pass's estimate under the same seed; an input the body
    never reads still gets an exact zero (the recording keeps which seeded inputs its pass read)."""
    gen = torch.Generator().manual_seed(0)
    w, unused, x = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((3, 2), (5,), (6, 3)))
    seg = mf.fwd(lambda w, u, x: torch.tanh(x @ w).pow(2).sum(), name="rand")
    g = mf.mixed_grad(lambda w, u: seg(w, u, x), {"rand": mf.Random(k, seeding=seeding)}, argnums=(0, 1))
    estimates = []
    for _ in range(3):  # eager (and recorded), then replayed twice
        torch.manual_seed(7)
        estimates.append(g(w, unused))
    assert _replay.replayed("rand") == 1
    for estimate in estimates[1:]:
        _close(estimate, estimates[0])
    assert torch.equal(estimates[-1][1], torch.zeros(5, dtype=torch.float64))


def test_changed_shapes_dtypes_and_differentiated_arguments_are_new_recordings() -> None:
    for batch, dtype, argnums in ((2, torch.float64, 0), (3, torch.float64, 0), (3, torch.float32, 0),
                                  (3, torch.float64, (0, 1)), (2, torch.float64, 0)):
        g = mf.mixed_grad(lambda p, x, y: CNN(p, x, y), {"cnn": "exact"}, argnums=argnums)
        args = _cnn_args(batch, dtype)
        want = grad(_cnn, argnums=argnums)(*args)
        for _ in range(2):
            got = g(*args)
            if dtype == torch.float32:
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b)
            else:
                _close(got, want)


def test_non_tensor_arguments_and_closure_scalars_are_part_of_the_key() -> None:
    def make():
        shift = 1.0

        def body(w: torch.Tensor, x: torch.Tensor, power: int) -> torch.Tensor:
            return torch.tanh(x @ w + shift) ** power

        def set_shift(value: float) -> None:
            nonlocal shift
            shift = value

        return body, set_shift

    body, set_shift = make()
    seg = mf.fwd(body, name="body")
    w, x = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for power, shift in ((2, 1.0), (2, 1.0), (3, 1.0), (3, -2.0), (3, -2.0)):
        set_shift(shift)
        got = mf.mixed_grad(lambda w, x, p=power: seg(w, x, p).sum())(w, x)
        _close(got, grad(lambda w, x, p=power: body(w, x, p).sum())(w, x))
    assert _replay.replayed("body") > 0


class _Scaled(torch.nn.Module):
    """Its output depends on the training flag, without randomness or buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        return h * 3.0 if self.training else h


def test_training_flags_are_part_of_the_key() -> None:
    torch.manual_seed(0)
    net = _Scaled()
    seg = mf.fwd(net, name="scaled")
    x = torch.randn(5, 3, dtype=torch.float64)
    params = dict(net.named_parameters())
    for training in (True, True, False, False, True):
        net.train(training)
        got = mf.mixed_grad(lambda p: seg(p, x).pow(2).sum())(params)
        want = grad(lambda p: torch.func.functional_call(net, p, (x,)).pow(2).sum())(params)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
    assert _replay.replayed("scaled") > 0


C = torch.randn(3, dtype=torch.float64)  # a tensor the body reads from outside its arguments


def _branches(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h = x @ w
    return torch.tanh(h) if h.sum() > 0 else torch.sin(h)


def _constant(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w) * C.sum()


def _mutates(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h = x @ w
    h.add_(1.0)
    return torch.tanh(h)


def _dropout(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.dropout(torch.tanh(x @ w), 0.5, training=True)


def _value_shapes(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w) * (x > 0).nonzero().shape[0]


@pytest.mark.parametrize(("body", "reason"), [
    (_branches, "branches on tensor values"),
    (_constant, "reads tensors that are not its inputs"),
    (_dropout, "draws random numbers"),
    (_value_shapes, "depend on tensor values"),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_passes_that_cannot_be_recorded_stay_eager_and_right(body, reason: str | None) -> None:
    global C
    seg = mf.fwd(body, name="seg")
    w = torch.randn(3, 3, dtype=torch.float64)
    xs = [torch.randn(4, 3, dtype=torch.float64) + shift for shift in (2.0, 2.0, -2.0, -2.0)]  # the branch flips
    for i, x in enumerate(xs):
        C = torch.randn(3, dtype=torch.float64)  # a new constant every call
        torch.manual_seed(i)
        got = mf.mixed_grad(lambda w, x: seg(w, x).sum())(w, x)
        torch.manual_seed(i)
        _close(got, grad(lambda w, x: body(w, x).sum())(w, x))
    assert reason in _replay.REFUSED["seg"]
    assert _replay.replayed("seg") == 0


def test_in_place_ops_on_intermediates_replay_and_writes_to_inputs_are_refused() -> None:
    seg = mf.fwd(_mutates, name="inplace")
    w, x = torch.randn(3, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for _ in range(3):
        _close(mf.mixed_grad(lambda w, x: seg(w, x).sum())(w, x), grad(lambda w, x: _mutates(w, x).sum())(w, x))
    assert _replay.replayed("inplace") == 1
    # a body that writes to an input fails in the eager engine first; the recorder refuses it too
    traced = make_fx(lambda x, y: x.t().add_(y.t()) * 2)(torch.randn(3, 3), torch.randn(3, 3))
    assert recordable._mutated_inputs(traced) == "aten.add_.Tensor"
    assert recordable._mutated_inputs(make_fx(lambda x: (x * 2).add_(1))(torch.randn(3))) == ""


def test_a_recording_that_disagrees_with_the_eager_pass_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recording is checked against the eager values it was made beside: a clean-up pass gone wrong
    (here: one that doubles the first output) leaves the segment eager, with the right gradient."""

    def broken(gm: torch.fx.GraphModule) -> int:
        out = next(iter(reversed(gm.graph.nodes)))
        first = out.args[0][0]
        with gm.graph.inserting_before(out):
            doubled = gm.graph.call_function(torch.ops.aten.mul.Scalar, (first, 2.0))
        out.args = ((doubled, *out.args[0][1:]),)
        gm.recompile()
        return 0

    monkeypatch.setattr(_replay, "simplify", broken)
    g = mf.mixed_grad(lambda p, x, y: CNN(p, x, y), {"cnn": "exact"})
    args = _cnn_args(2)
    for _ in range(3):
        _close(g(*args), grad(_cnn)(*args))
    assert "disagreed with the eager pass" in _replay.REFUSED["cnn"]
    assert _replay.replayed("cnn") == 0


def test_a_failed_recording_leaves_forward_mode_working() -> None:
    """A trace that fails inside functorch can leave dispatch keys excluded for the whole thread (torch
    2.13, layer_norm under fake tensors): every later jvp then fails an internal assertion."""
    w = torch.randn(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="half-way"), _replay._restored_state():
        torch._C._dispatch_tls_set_dispatch_key_excluded(torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode, True)
        raise RuntimeError("a trace failing half-way")
    torch.testing.assert_close(torch.func.jvp(torch.sin, (w,), (w,))[1], torch.cos(w) * w)


def test_segments_that_are_never_recorded() -> None:
    """Buffers (BatchNorm in training mode), an outer vmap, an op on the double-vjp fallback, and
    record=False all stay on the eager engine, with the right gradient."""
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Linear(3, 4, dtype=torch.float64), torch.nn.BatchNorm1d(4, dtype=torch.float64))
    seg_bn = mf.fwd(bn, name="bn")
    x = torch.randn(6, 3, dtype=torch.float64)
    params = dict(bn.named_parameters())
    for _ in range(3):
        mf.mixed_grad(lambda p: seg_bn(p, x).pow(2).sum())(params)

    w = torch.randn(3, 2, dtype=torch.float64)
    per_example = mf.fwd(lambda w, x: torch.tanh(x @ w), name="per_example")
    fallback = mf.fwd(lambda w, x: torch.logcumsumexp(x @ w, dim=0), name="fallback")
    opted_out = mf.fwd(lambda w, x: torch.tanh(x @ w), name="opted_out", record=False)
    for _ in range(3):
        got = torch.func.vmap(mf.mixed_grad(lambda w, x: per_example(w, x).sum()), in_dims=(None, 0))(w, x)
        _close(got, torch.func.vmap(grad(lambda w, x: torch.tanh(x @ w).sum()), in_dims=(None, 0))(w, x))
        _close(mf.mixed_grad(lambda w, x: fallback(w, x).sum())(w, x),
               grad(lambda w, x: torch.logcumsumexp(x @ w, dim=0).sum())(w, x))
        _close(mf.mixed_grad(lambda w, x: opted_out(w, x).sum())(w, x),
               grad(lambda w, x: torch.tanh(x @ w).sum())(w, x))
    for name in ("bn", "per_example", "fallback", "opted_out"):
        assert _replay.replayed(name) == 0, name


def test_eval_mode_buffers_are_read_at_every_replay() -> None:
    """BatchNorm's running statistics in eval mode are inputs of the recording, read from the module each
    time: updated in place by a training step, or reassigned, the replayed gradient follows them."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(144, 3)).double()
    seg = mf.fwd(net, name="bn")
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for phase in ("eval", "eval", "eval", "train", "eval", "reassigned", "eval"):
        net.train(phase == "train")
        if phase == "reassigned":
            net[1].running_var = torch.rand(4, dtype=torch.float64) + 0.5
        ref = copy.deepcopy(net)  # (a training step updates the running statistics: on a copy)
        want = torch.autograd.grad(ref(x).pow(2).sum(), list(ref.parameters()))
        got = mf.mixed_grad(lambda p: seg(p, x).pow(2).sum())(dict(net.named_parameters()))
        _close(tuple(got.values()), want)
    assert _replay.replayed("bn") == 1


def test_recordings_do_not_keep_a_dropped_model_alive() -> None:
    def train() -> weakref.ref:
        net = torch.nn.Sequential(torch.nn.Linear(3, 4, dtype=torch.float64), torch.nn.Tanh())
        seg = mf.fwd(net, name="dropped")
        x = torch.randn(5, 3, dtype=torch.float64)
        for _ in range(3):
            mf.mixed_grad(lambda p: seg(p, x).sum())(dict(net.named_parameters()))
        assert _replay.replayed("dropped") == 1
        return weakref.ref(net)

    alive = train()
    gc.collect()
    assert alive() is None
    assert _replay.replayed("dropped") == 0


def test_record_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"fwd\(record=...\): expected True or False"):
        mf.fwd(torch.sin, record="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("size", [(7, 3, 12, 12), (5, 2, 13, 11)])
def test_pooling_by_slices_is_avg_pool2d(k: int, size: tuple) -> None:
    x = torch.randn(*size, dtype=torch.float64)
    torch.testing.assert_close(pool_by_slices(x, k), F.avg_pool2d(x, k), rtol=1e-14, atol=1e-14)
    strided = x.transpose(0, 1)  # a tangent batch's layout is often permuted
    torch.testing.assert_close(pool_by_slices(strided, k), F.avg_pool2d(strided, k), rtol=1e-14, atol=1e-14)


# -- long loops (issue 18): a rollout of few parameters, recorded below a size and eager above it -------------
def _rollout(p: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """benchmarks/rollout.py's update, in small: a reaction-diffusion step with 8 coefficients, scalars included."""
    a, b, c, d, e, f, g, h = p.unbind()
    for _ in range(steps):
        lap = x.roll(1, -1) + x.roll(-1, -1) - 2 * x
        x = torch.add(x, a * lap + b * torch.tanh(c * x + d) - e * x + f * torch.sin(g * x) + h, alpha=0.01)
    return x / 3 - 1


ROLLOUT = mf.fwd(_rollout, name="rollout")


def _rollout_args() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.8, 1.2, 0.1, 0.6, 0.3, 2.0, 0.05], dtype=torch.float64)
    return p, torch.randn(3, 4, generator=gen, dtype=torch.float64)


def _rollout_grad(steps: int):
    return mf.mixed_grad(lambda p, x: ROLLOUT(p, x, steps).pow(2).sum(), {"rollout": mf.Exact()})


def _recording(name: str) -> _replay.Replay:
    (recording,) = [v for v in _replay._CACHE.values() if isinstance(v, _replay.Replay) and v.name == name]
    return recording


def test_a_recording_grows_linearly_with_the_loop_and_replays_the_eager_values() -> None:
    """The recorded graph (clean-up passes included) and the calls counted by the op seam grow by the same
    amount every step (a deterministic proxy of the recording's cost: tracing is linear in both), and each
    replay gives the eager gradient, which is torch.func.grad's."""
    p, x = _rollout_args()
    nodes, calls = [], []
    for steps in (2, 4, 6, 8):
        _replay.clear()
        g = _rollout_grad(steps)
        want = grad(lambda p, x, n=steps: _rollout(p, x, n).pow(2).sum())(p, x)
        eager = g(p, x)  # (records: RECORD_AFTER is 1 here)
        _close(eager, want)
        for _ in range(2):
            assert torch.equal(g(p, x), eager)
        nodes.append(len(_recording("rollout").gm.graph.nodes))
        calls.append(_recording("rollout").calls)
    assert len({b - a for a, b in zip(nodes, nodes[1:], strict=False)}) == 1, nodes
    assert len({b - a for a, b in zip(calls, calls[1:], strict=False)}) == 1, calls


def test_a_recording_keeps_no_tensors_alive() -> None:
    """Recording a pass leaves no more live tensors than an eager call does (the graph needs none: it reads its
    inputs at each run). It kept the fake tensor of every node's metadata (5,439 on a 100-step rollout)."""
    p, x = _rollout_args()

    def live() -> int:
        gc.collect()
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())  # (type: no __getattr__ call)

    _replay.RECORD_AFTER = 2
    g = _rollout_grad(6)
    got = g(p, x)  # eager: its first sighting
    before = live()
    got = g(p, x)  # eager again, then recorded
    assert _replay.replayed("rollout") == 1
    assert live() == before
    assert torch.equal(g(p, x), got)


def test_passes_above_the_size_limit_stay_eager_with_exact_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above MAX_RECORDED_CALLS the refusal is decided from the eager pass's count, before any tracing."""
    monkeypatch.setattr(_replay, "MAX_RECORDED_CALLS", 60)

    def never(*args: object) -> None:
        raise AssertionError("a pass above the size limit was traced")

    monkeypatch.setattr(_replay, "_record", never)
    p, x = _rollout_args()
    g = _rollout_grad(5)  # 19 torch calls a step, 6 around the loop
    want = grad(lambda p, x: _rollout(p, x, 5).pow(2).sum())(p, x)
    for _ in range(3):
        _close(g(p, x), want)
    assert "101 torch calls, above replay.MAX_RECORDED_CALLS = 60" in _replay.REFUSED["rollout"]
    assert _replay.replayed("rollout") == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.int64])
def test_the_seams_scalar_forms_give_the_plain_values(dtype: torch.dtype) -> None:
    """The op seam runs a tensor's arithmetic with a Python number by the .Scalar overload (whose forward formula
    makes no zero tensor: ~1 ms an op saved): same values and dtype as the plain call, and what it leaves alone."""
    x = (torch.arange(1, 7).reshape(2, 3) * 3).to(dtype)
    calls = [lambda x: 2 * x, lambda x: x * 0.3, lambda x: x / 3, lambda x: x - 1, lambda x: 1.5 + x,
             lambda x: torch.add(x, 2, alpha=3), lambda x: x.sub(0.25, alpha=2), lambda x: torch.div(x, 7),
             lambda x: x * True, lambda x: torch.div(x, 2, rounding_mode="floor"), lambda x: x.mul(x)]
    for call in calls:
        with ScalarForms():
            got = call(x)
        want = call(x)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_scalar_arithmetic_keeps_the_seam_and_exact_gradients() -> None:
    """A body whose arithmetic with numbers the seam ran faster keeps the seam in later passes (Exact's groups)."""
    w, b, x = (torch.randn(*s, dtype=torch.float64) for s in ((3, 3), (3,), (4, 3)))

    def body(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ w * 0.5 + b) / 3 - 1).pow(2).sum()

    seg = mf.fwd(body, name="scalars", record=False)
    g = mf.mixed_grad(lambda w, b, x: seg(w, b, x), {"scalars": mf.Exact(chunk_size=4)}, argnums=(0, 1))
    for _ in range(2):
        _close(g(w, b, x), grad(body, argnums=(0, 1))(w, b, x))


def test_a_pass_makes_no_zero_tangents_for_numbers() -> None:
    """The eager pass runs ``2 * y - 1`` by the .Scalar overloads: the numbers get no all-zero tangent, whose
    arithmetic runs torch's Python meta functions (``prims`` ops, ~1 ms an op: four of them here before). Seen
    by a dispatch mode, which sees the aten ops below torch.func's transforms."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    w, x = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    seg = mf.fwd(lambda w, x: (2 * (x @ w) - 1).pow(2).sum(), name="numbers", record=False)
    with Ops() as ops:
        got = mf.mixed_grad(lambda w: seg(w, x))(w)
    _close(got, grad(lambda w: (2 * (x @ w) - 1).pow(2).sum())(w))
    assert "aten.mul.Scalar" in ops.seen
    assert not [op for op in ops.seen if op.startswith("prims.")]
