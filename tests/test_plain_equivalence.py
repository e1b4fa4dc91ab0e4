"""A forward segment behaves exactly like the plain code it wraps (issue 7).

Each test pins one way the engine used to be silently wrong or to fail on layers people train with:
complex outputs, random ops, grad-mode branches, ops whose forward rule yields no tangent, noise on
unused inputs, parameters read from closures or ``self``, tangents frozen by a model that re-seeds,
BatchNorm / Dropout / Transformer / LSTM in training mode. Exact cases compare with ``torch.func.grad``
or plain autograd in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import BackwardOnly
from torch import nn

import madfunc as mf

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64
EXACT_PLANS = [mf.Exact(), mf.Exact(chunk_size=1), mf.Exact(chunk_size=5)]


def _randn(seed: int, *shape: int, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _close(got, want, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


# -- 1. complex outputs -------------------------------------------------------------------------------
COMPLEX_BODIES = {
    "rfft": lambda w, x: torch.fft.rfft(x * w),
    "fft_of_real": lambda w, x: torch.fft.fft(torch.tanh(x @ w.reshape(4, 1)).squeeze(-1) * x[:, 0]),
    "polar": lambda w, x: torch.polar(x.abs() + 1.0, x * w),
    "view_as_complex": lambda w, x: torch.view_as_complex(torch.stack([x * w, x.sin()], dim=-1)),
    "eigvals": lambda w, x: torch.linalg.eigvals(x[:4, :4] * w + torch.eye(4, dtype=DT) * 3),
    "complex_intermediate": lambda w, x: torch.fft.irfft(torch.fft.rfft(x * w) * 2j, n=4),
}


@pytest.mark.parametrize("body", COMPLEX_BODIES, ids=str)
@pytest.mark.parametrize("strategy", EXACT_PLANS[:2], ids=str)
def test_complex_outputs_keep_their_tangents(body: str, strategy: mf.Exact) -> None:
    seg = mf.fwd(COMPLEX_BODIES[body], name="c")
    cot = _randn(9, 64)

    def loss(w, x):
        y = seg(w, x)
        flat = torch.view_as_real(y).flatten() if y.is_complex() else y.flatten()
        return (flat * cot[: flat.numel()]).sum() + flat.pow(2).sum()

    w, x = _randn(0, 4), _randn(1, 5, 4)
    _close(mf.mixed_grad(loss, {"c": strategy}, argnums=(0, 1))(w, x), torch.func.grad(loss, argnums=(0, 1))(w, x))


# -- 2. random ops: one draw per call, the plain call's --------------------------------------------------
def _dropout_body(w, x):
    h = F.dropout(torch.tanh(x @ w), 0.5, training=True)
    return h + 0.1 * torch.randn_like(h) * h  # a second random op, drawn after the first


@pytest.mark.parametrize("strategy", EXACT_PLANS, ids=str)
def test_exact_with_random_ops_equals_plain_grad_under_the_same_seed(strategy: mf.Exact) -> None:
    seg = mf.fwd(_dropout_body, name="d")

    def loss(w, x):
        return (seg(w, x) * F.dropout(x[:, :3], 0.3)).pow(2).sum()  # glue draws after the segment too

    w, x = _randn(0, 4, 3), _randn(1, 6, 4)
    torch.manual_seed(11)
    got = mf.mixed_grad(loss, {"d": strategy}, argnums=(0, 1))(w, x)
    after_madfunc = torch.get_rng_state()
    torch.manual_seed(11)
    want = torch.func.grad(loss, argnums=(0, 1))(w, x)
    _close(got, want)
    assert torch.equal(after_madfunc, torch.get_rng_state()), "torch's RNG must end where a plain call leaves it"


@pytest.mark.parametrize("seeding", ["eager", "lazy"])
@pytest.mark.parametrize("k", [1, 4])
def test_random_keeps_the_models_own_draws(k: int, seeding: str) -> None:
    seg = mf.fwd(_dropout_body, name="d")
    w, x = _randn(0, 4, 3), _randn(1, 6, 4)
    outputs = {}

    def loss(w, x):
        outputs["y"] = seg(w, x)
        return outputs["y"].pow(2).sum()

    torch.manual_seed(3)
    mf.mixed_grad(loss, {"d": mf.Random(k, "rademacher", seeding)})(w, x)
    torch.manual_seed(3)
    assert torch.equal(outputs["y"], _dropout_body(w, x))


# -- 3. grad mode ---------------------------------------------------------------------------------------
def test_segment_sees_the_callers_grad_mode() -> None:
    seen = []

    def body(w, x):
        seen.append(torch.is_grad_enabled())
        y = torch.tanh(x @ w)
        return y if torch.is_grad_enabled() else y.detach()  # code that skips work when no grad is wanted

    seg = mf.fwd(body, name="g")
    w, x = _randn(0, 4, 3), _randn(1, 6, 4)
    got = mf.mixed_grad(lambda w, x: seg(w, x).pow(2).sum())(w, x)
    want = torch.func.grad(lambda w, x: torch.tanh(x @ w).pow(2).sum())(w, x)
    _close(got, want)
    assert seen and all(seen)
    with torch.no_grad():  # and a plain no-grad caller still sees no-grad
        seg(w, x)
    with mf.use_plan({}), torch.no_grad():
        seg(w, x)
    assert seen[-1] is False


# -- 4. ops whose forward rule is wrong or missing: the double-vjp fallback --------------------------------
def _unpool(x):
    pooled, idx = F.max_pool2d(x, 2, stride=1, return_indices=True)  # overlapping windows: repeated indices
    return F.max_unpool2d(pooled, idx, 2, stride=1, output_size=x.shape[-2:])


FALLBACK_BODIES = {
    # PyTorch's forward rule yields no tangent: a silent zero before
    "scatter_reduce_prod": lambda x: x.scatter_reduce(0, torch.tensor([0, 1, 0, 1]), x * 2, reduce="prod"),
    "max_unpool2d": lambda x: _unpool(x.reshape(1, 1, 2, 2).repeat(1, 1, 2, 2)),  # its rule disagrees with backward
    "cdist": lambda x: torch.cdist(x.reshape(2, 2), x.reshape(2, 2).flip(0) + 1.0),  # no forward rule at all
    "backward_only_function": lambda x: BackwardOnly.apply(x.sin()),
}


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Exact(chunk_size=1)], ids=str)
@pytest.mark.parametrize("body", FALLBACK_BODIES, ids=str)
def test_ops_without_a_trustworthy_forward_rule_match_backprop(body: str, strategy: mf.Exact) -> None:
    seg = mf.fwd(FALLBACK_BODIES[body], name="op")
    x = _randn(0, 4) + torch.arange(4, dtype=DT)  # distinct values: max_unpool's ties are not at stake

    def loss(x):
        return (seg(x) * torch.linspace(-1, 2, seg(x).numel(), dtype=DT).reshape(seg(x).shape)).sum()

    _close(mf.mixed_grad(loss, {"op": strategy})(x), torch.func.grad(loss)(x))
    rows = mf.inspect(loss, {"op": strategy}, x).rows
    assert any("double-vjp fallback" in flag for flag in rows[0].flags)


# Ops whose backward follows a convention that is not the derivative of the forward pass: forward segments
# follow backprop's (ops/embedding.py). Each body's indices hit the padding row.
_IDX = torch.tensor([[0, 1, 0], [3, 4, 0]])
CONVENTION_BODIES = {
    "embedding_padding_idx": lambda w: F.embedding(_IDX, w.reshape(5, 2), padding_idx=0),
    "embedding_negative_padding_idx": lambda w: F.embedding(_IDX, w.reshape(5, 2), padding_idx=-5),
    "torch_embedding_padding_idx": lambda w: torch.embedding(w.reshape(5, 2), _IDX, 0),
    "embedding_scale_grad_by_freq": lambda w: F.embedding(_IDX, w.reshape(5, 2), scale_grad_by_freq=True),
    "embedding_scale_grad_by_freq_padding": lambda w: F.embedding(_IDX, w.reshape(5, 2), padding_idx=3,
                                                                  scale_grad_by_freq=True),
    "nn_embedding_module": lambda w: torch.func.functional_call(_EMB, {"weight": w.reshape(5, 2)}, (_IDX,)),
}
_EMB = nn.Embedding(5, 2, padding_idx=4).double()


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Exact(chunk_size=1)], ids=str)
@pytest.mark.parametrize("body", CONVENTION_BODIES, ids=str)
def test_ops_with_a_backward_convention_match_backprop(body: str, strategy: mf.Exact) -> None:
    seg = mf.fwd(CONVENTION_BODIES[body], name="op")
    w = _randn(0, 10)
    weights = torch.linspace(-1, 2, 12, dtype=DT).reshape(2, 3, 2)

    def loss(w):
        return (seg(w).pow(2) * weights).sum()

    want = torch.func.grad(loss)(w)
    _close(mf.mixed_grad(loss, {"op": strategy})(w), want)
    assert want.abs().sum() > 0


# -- 5. unused inputs get an exact zero ------------------------------------------------------------------
@pytest.mark.parametrize("seeding", ["eager", "lazy"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_random_gives_unused_leaves_an_exact_zero(distribution: str, seeding: str) -> None:
    seg = mf.fwd(lambda p, x: torch.tanh(x @ p["w1"]), name="stem")
    params = {"w1": _randn(0, 4, 3), "w2": _randn(1, 3, 3), "b": _randn(2, 3)}
    x = _randn(3, 5, 4)
    torch.manual_seed(0)
    grad = mf.mixed_grad(lambda p, x: seg(p, x).sum(), {"stem": mf.Random(4, distribution, seeding)})(params, x)
    assert torch.equal(grad["w2"], torch.zeros(3, 3, dtype=DT)) and torch.equal(grad["b"], torch.zeros(3, dtype=DT))
    assert grad["w1"].abs().sum() > 0
    report = mf.inspect(lambda p, x: seg(p, x).sum(), {"stem": mf.Random(4, distribution, seeding)}, params, x)
    assert report.rows[0].differentiated_numel == 12  # only w1 counts in n


# -- 6. tensors read from closures and self ---------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 5).double(), nn.Linear(5, 2).double()

    @mf.fwd
    def stem(self, x):  # a method segment: its parameters come from self
        return torch.tanh(self.a(x))

    def forward(self, x):
        return self.b(self.stem(x))


@pytest.mark.parametrize("strategy", EXACT_PLANS[:2], ids=str)
def test_method_and_closure_parameters_are_differentiated_under_the_plan(strategy: mf.Exact) -> None:
    net, ref = _Net(), _Net()
    inner = nn.Linear(2, 3).double()
    scale = torch.tensor(1.5, dtype=DT, requires_grad=True)
    head = mf.fwd(lambda h: inner(h) * scale, name="head")  # a closure over a module and a tensor
    x = _randn(0, 6, 4)
    with mf.use_plan({"stem": strategy, "head": strategy}):
        head(net(x)).pow(2).sum().backward()
    inner_ref = nn.Linear(2, 3).double()
    inner_ref.load_state_dict(inner.state_dict())
    scale_ref = scale.detach().clone().requires_grad_()
    (inner_ref(ref(x)) * scale_ref).pow(2).sum().backward()
    got = [*net.parameters(), *inner.parameters(), scale]
    want = [*ref.parameters(), *inner_ref.parameters(), scale_ref]
    for p, q in zip(got, want, strict=True):
        _close(p.grad, q.grad)


GLOBAL_WEIGHT = torch.ones(4, 2, dtype=DT, requires_grad=True)


def _reads_a_global(x):
    return x @ GLOBAL_WEIGHT


def test_a_hidden_parameter_is_an_error_not_a_lost_gradient() -> None:
    seg = mf.fwd(_reads_a_global, name="hidden")
    x = _randn(0, 3, 4).requires_grad_()
    with pytest.raises(RuntimeError, match=r"segment 'hidden' reads a tensor that needs a gradient from outside"):
        with mf.use_plan({}):
            seg(x).sum().backward()


# -- 7. tangents stay fresh and reproducible ---------------------------------------------------------------
def _reseeding_loss(w, x, seg):
    torch.manual_seed(123)  # a model that re-seeds inside its forward
    return seg(w, F.dropout(x, 0.2)).pow(2).sum()


def test_tangents_are_fresh_even_if_the_model_reseeds() -> None:
    seg = mf.fwd(lambda w, x: torch.tanh(x @ w), name="r")
    grad = mf.mixed_grad(lambda w, x: _reseeding_loss(w, x, seg), {"r": mf.Random(2)})
    w, x = _randn(0, 4, 3), _randn(1, 6, 4)
    torch.manual_seed(0)
    draws = [grad(w, x) for _ in range(4)]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])
    torch.manual_seed(0)
    again = [grad(w, x) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(draws, again, strict=True))


def test_generator_argument_owns_the_tangents() -> None:
    seg = mf.fwd(lambda w, x: torch.tanh(x @ w), name="r")
    w, x = _randn(0, 4, 3), _randn(1, 6, 4)

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return mf.mixed_grad(lambda w, x: seg(w, x).sum(), {"r": mf.Random(3)}, generator=gen)(w, x)

    state = torch.get_rng_state()
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state()), "with a generator, torch's own RNG is untouched"
    with pytest.raises(TypeError, match=r"mixed_grad\(generator=...\): expected a torch.Generator"):
        mf.mixed_grad(lambda w: w.sum(), generator=5)


# -- layers people train with ------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", EXACT_PLANS, ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_in_training_mode(strategy: mf.Exact, momentum: float | None) -> None:
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU()).double()

    model, ref = make(), make()
    seg = mf.fwd(model, name="block")
    x = _randn(0, 4, 2, 5, 5)
    for _ in range(2):  # the running statistics are updated exactly once per call
        with mf.use_plan({"block": strategy}):
            seg(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        _close(p.grad, q.grad)
    for name, buffer in ref.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name


def test_transformer_encoder_layer_in_training_mode_is_exact() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True).double()
    params = dict(layer.named_parameters())
    seg = mf.fwd(layer, name="enc")
    x = _randn(0, 2, 5, 8)

    def loss(p, x):
        return seg(p, x).pow(2).sum()

    def plain(p, x):
        return torch.func.functional_call(layer, p, (x,)).pow(2).sum()

    torch.manual_seed(7)
    got = mf.mixed_grad(loss, {"enc": mf.Exact()})(params, x)
    torch.manual_seed(7)
    want = torch.func.grad(plain)(params, x)
    _close(got, want)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_float32_rnn_runs_in_forward_mode(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    rnn = cls(3, 4, batch_first=True)
    params = dict(rnn.named_parameters())
    seg = mf.fwd(rnn, name="rnn")
    x = _randn(0, 2, 5, 3, dtype=torch.float32)
    got = mf.mixed_grad(lambda p, x: seg(p, x)[0].pow(2).sum())(params, x)
    want = torch.func.grad(lambda p, x: torch.func.functional_call(rnn, p, (x,))[0].pow(2).sum())(params, x)
    # float32: forward and reverse mode round differently; ~100 ops deep, eps 1.2e-7 per op.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- inputs and bodies that used to raise raw torch errors ------------------------------------------------
@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Random(3)], ids=str)
def test_empty_batch_gives_zero_gradients(strategy: mf.Strategy) -> None:
    seg = mf.fwd(lambda x: torch.tanh(x * 2), name="e")
    x = torch.zeros(0, 3, dtype=DT)
    assert mf.mixed_grad(lambda x: seg(x).sum(), {"e": strategy})(x).shape == (0, 3)


def test_segment_returning_none_is_named() -> None:
    seg = mf.fwd(lambda x: None, name="nothing")
    with pytest.raises(TypeError, match=r"segment 'nothing' returned None.*return"):
        mf.mixed_grad(lambda x: (seg(x), x.sum())[1])(_randn(0, 3))


class _DetachedBackward(BackwardOnly):
    @staticmethod
    def backward(ctx, g):
        return g.detach() * 3  # not differentiable: the fallback cannot differentiate it again


def test_custom_function_with_a_non_differentiable_backward_is_named() -> None:
    seg = mf.fwd(lambda x: _DetachedBackward.apply(x), name="custom")
    with pytest.raises(mf.ForwardModeError, match=r"segment 'custom'.*_DetachedBackward.*jvp"):
        mf.mixed_grad(lambda x: seg(x).sum())(_randn(0, 100))


def test_large_exact_segment_warns_once() -> None:
    seg = mf.fwd(lambda w, x: x @ w, name="wide_exact_segment")
    w, x = _randn(0, 80, 64), _randn(1, 2, 80)
    with pytest.warns(mf.PerformanceWarning, match=r"segment 'wide_exact_segment'.*5120"):
        mf.mixed_grad(lambda w, x: seg(w, x).sum())(w, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mf.mixed_grad(lambda w, x: seg(w, x).sum())(w, x)  # once per segment, not every step


def test_allow_unused_plan_keys() -> None:
    seg = mf.fwd(lambda x: x * 2, name="sometimes")
    plan = {"sometimes": mf.Random(2), "elsewhere": "rev"}
    with pytest.raises(ValueError, match="allow_unused=True"):
        mf.mixed_grad(lambda x: seg(x).sum(), plan)(_randn(0, 3))
    mf.mixed_grad(lambda x: seg(x).sum(), plan, allow_unused=True)(_randn(0, 3))
    with mf.use_plan(plan, allow_unused=True):
        pass


def test_inspect_reports_a_huge_exact_segment_instead_of_running_it() -> None:
    seg = mf.fwd(lambda w, x: torch.tanh(x @ w), name="huge")
    w, x = torch.zeros(3000, 3000), torch.zeros(2, 3000)  # 9M tangents: Exact would refuse (36 GB basis)
    row = mf.inspect(lambda w, x: seg(w, x).sum(), {}, w, x).rows[0]
    assert row.tangents == 9_000_000 and row.saved_bytes == 9_000_000 * 2 * 3000 * 4
    assert any("pushes 9000000 tangents" in flag and "predicted" in flag for flag in row.flags)


@torch.library.custom_op("madfunc_test::triple", mutates_args=())
def _triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


_triple.register_autograd(lambda ctx, g: g * 3, setup_context=lambda ctx, inputs, output: None)


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Random(2)], ids=str)
def test_op_that_silently_drops_tangents_is_found_not_contracted(strategy: mf.Strategy) -> None:
    """A custom op with only a backward yields *no* tangent in forward mode (PyTorch returns zeros), and
    its autograd cannot run under torch.func, so the fallback cannot help: a clear error, not zeros."""
    seg = mf.fwd(lambda w, x: torch.tanh(_triple(x @ w)), name="custom_op")
    w, x = _randn(0, 4, 3).requires_grad_(), _randn(1, 6, 4)
    with pytest.raises(mf.ForwardModeError, match=r"(?s)segment 'custom_op'.*triple"):
        with mf.use_plan({"custom_op": strategy}):
            seg(w, x).pow(2).sum().backward()


def _unbatchable(h: torch.Tensor) -> torch.Tensor:
    """Stands for an op that fails under vmap (and by the fallback, which runs under vmap too)."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    if any(str(i.key()) == "TransformType.Vmap" for i in retrieve_all_functorch_interpreters()):
        raise RuntimeError("this op has no batching rule")
    return h.sin()


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Random(3, seeding="lazy")], ids=str)
def test_body_vmap_cannot_batch_runs_one_tangent_at_a_time(strategy: mf.Strategy) -> None:
    name = f"loop_{type(strategy).__name__}"  # the warning comes once per segment name
    seg = mf.fwd(lambda w, x: _unbatchable(x @ w), name=name)
    w, x = _randn(0, 4, 3), _randn(1, 2, 4)
    loss = lambda w, x: seg(w, x).pow(2).sum()  # noqa: E731
    with pytest.warns(mf.PerformanceWarning, match=rf"segment '{name}': torch.func.vmap cannot batch"):
        torch.manual_seed(0)
        got = mf.mixed_grad(loss, {name: strategy}, argnums=(0, 1))(w, x)
    if isinstance(strategy, mf.Exact):
        _close(got, torch.func.grad(loss, argnums=(0, 1))(w, x))
    else:  # the same estimate as eager seeding with vmap would give: the tangents do not depend on the path
        seg_ok = mf.fwd(lambda w, x: (x @ w).sin(), name=name)
        torch.manual_seed(0)
        want = mf.mixed_grad(lambda w, x: seg_ok(w, x).pow(2).sum(), {name: strategy}, argnums=(0, 1))(w, x)
        _close(got, want)


def test_torch_op_vmap_cannot_batch_is_exact() -> None:
    # .to(channels_last) needs a 4-d tensor; under vmap the tangent batch makes it 5-d (also in the fallback).
    seg = mf.fwd(lambda w, x: (x @ w).reshape(1, 2, 3, 3).to(memory_format=torch.channels_last).sin(), name="cl")
    w, x = _randn(0, 4, 9), _randn(1, 2, 4)
    loss = lambda w, x: seg(w, x).pow(2).sum()  # noqa: E731
    with warnings.catch_warnings():  # by the fallback or one tangent at a time: right either way
        warnings.simplefilter("ignore", mf.PerformanceWarning)
        got = mf.mixed_grad(loss, argnums=(0, 1))(w, x)
    _close(got, torch.func.grad(loss, argnums=(0, 1))(w, x))


def test_op_torch_func_cannot_run_is_named() -> None:
    idx = torch.tensor([1, 3])  # tensor_split with tensor indices: torch.func's grad, jvp and vmap all fail
    seg = mf.fwd(lambda w, x: torch.tensor_split(x @ w, idx, dim=1)[1].sin(), name="split")
    w = _randn(0, 4, 5).requires_grad_()
    with pytest.raises(RuntimeError, match=r"(?s)segment 'split': op 'tensor_split' failed.*rev\(\)"):
        with mf.use_plan({}):
            seg(w, _randn(1, 6, 4))


def test_conjugate_complex_output() -> None:
    seg = mf.fwd(lambda x: torch.fft.ifft(x * 2).conj(), name="ifft")
    x = _randn(0, 6)
    loss = lambda x: torch.view_as_real(seg(x)).pow(2).sum() + torch.view_as_real(seg(x))[:, 1].sum()  # noqa: E731
    _close(mf.mixed_grad(loss)(x), torch.func.grad(loss)(x))


def test_op_without_forward_rule_reached_only_by_a_later_leaf_group() -> None:
    """Exact's first pass (w1's tangents) meets grid_sample without a tangent and needs no fallback, so
    later passes skip the op seam; w2's pass reaches grid_sample with a tangent and must still be right."""

    def body(w1, w2, x):
        image = (x[:1] @ w2).reshape(1, 1, 9, 9)
        sampled = F.grid_sample(image, torch.tanh(x[:1, :2]).reshape(1, 1, 1, 2), align_corners=False)
        return torch.tanh(x @ w1).sum() * sampled.sum()

    seg = mf.fwd(body, name="late")
    w1, w2, x = _randn(0, 4, 80), _randn(1, 4, 81), _randn(2, 3, 4)  # one pass each (both > SMALL_LEAF)
    got = mf.mixed_grad(lambda a, b: seg(a, b, x), argnums=(0, 1))(w1, w2)
    _close(got, torch.func.grad(lambda a, b: body(a, b, x), argnums=(0, 1))(w1, w2))
