"""Dropout in forward segments draws the mask the plain code draws under the same seed (madfunc/ops/dropout.py).

Called from plain autograd (``use_plan``), the plain code's CPU dropout fills its noise in the memory order
of its input; under torch.func's transforms it is drawn in logical order. On a non-contiguous activation
(``nn.MultiheadAttention``'s output, so every ``TransformerEncoderLayer``) segments used to draw another
mask than the plain model: a different output and gradient from the same seed. Gradients are compared with
plain autograd in float64; under ``mixed_grad`` the reference is ``torch.func.grad``, whose dropout the
segment shares.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import madfunc as mf

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


class _Transposed(nn.Module):
    """A linear layer whose output is a transposed (non-contiguous) view, then ``drop``."""

    def __init__(self, drop) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6, dtype=DT)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)).transpose(0, 1)  # (6, B, ...) view of a (B, 6) result: strides (1, 6)
        return self.drop(h)


class _AttentionWeights(nn.Module):
    """nn.MultiheadAttention asked for its weights: its dropout acts on them inside F.multi_head_attention_forward."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=True, average_attn_weights=False)[0]


def _transformer() -> nn.Module:
    return nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.2, batch_first=True, dtype=DT)


MODELS = {
    "dropout": (lambda: _Transposed(nn.Dropout(0.4)), (5, 4)),
    "dropout_inplace": (lambda: _Transposed(lambda h: F.dropout(h * 1.0, 0.4, inplace=True)), (5, 4)),
    "alpha_dropout": (lambda: _Transposed(nn.AlphaDropout(0.3)), (5, 4)),
    "torch.dropout": (lambda: _Transposed(lambda h: torch.dropout(h, 0.25, True)), (5, 4)),
    "transformer": (_transformer, (3, 5, 8)),
    "attention_weights": (_AttentionWeights, (3, 5, 8)),
}


def _model_and_plain_output(name: str) -> tuple:
    """MODELS[name] in training mode, an input, the model as segment "m", and its plain output from seed 5."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().train()
    x = torch.randn(*shape, dtype=DT)
    seg = mf.fwd(model, name="m")
    torch.manual_seed(5)
    return model, x, seg, model(x)


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Random(3)], ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_use_plan_draws_the_plain_models_dropout_mask(name: str, strategy: mf.Strategy) -> None:
    model, x, seg, plain = _model_and_plain_output(name)
    torch.manual_seed(5)
    with mf.use_plan({"m": strategy}):
        out = seg(x)
    assert torch.equal(out, plain) or torch.allclose(out, plain, rtol=1e-13, atol=1e-14)
    if isinstance(strategy, mf.Exact):  # and the gradient is the plain model's, from the same mask
        torch.manual_seed(5)
        with mf.use_plan({"m": strategy}):
            seg(x).pow(2).sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        torch.manual_seed(5)
        model(x).pow(2).sum().backward()
        for g, p in zip(got, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["dropout", "transformer"])
def test_mixed_grad_shares_torch_funcs_dropout(name: str) -> None:
    """Under mixed_grad the plain code runs under torch.func.grad, which draws dropout in logical order."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().train()
    params = dict(model.named_parameters())
    x = torch.randn(*shape, dtype=DT)
    seg = mf.fwd(model, name="m")
    torch.manual_seed(5)
    got = mf.mixed_grad(lambda p, x: seg(p, x).pow(2).sum(), {"m": mf.Exact()})(params, x)
    torch.manual_seed(5)
    want = torch.func.grad(lambda p, x: torch.func.functional_call(model, p, (x,)).pow(2).sum())(params, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# -- CUDA: the fused kernel ------------------------------------------------------------------------------------
# On CUDA, F.dropout runs the fused Philox kernel (native_dropout) in the plain call and under torch.func.grad,
# but vmap's batching rule (a segment's passes are vmap(jvp)) draws the mask with bernoulli_: other numbers from
# the same generator state. Segments used to return another mask's output and gradient (an O(1) error) under
# both transforms; they now draw with the plain kernel (madfunc/ops/dropout.py: _fused, _attention,
# _multi_head_attention).
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (its fused dropout kernel)")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]

# The dropout input's layout, from h = x @ w of shape (64, 8). The kernel takes a vectorized path on aligned
# contiguous memory and an elementwise one otherwise, mapping random numbers to elements differently.
LAYOUTS = {
    "contiguous": lambda h: h,
    "transposed": lambda h: h.t(),
    "permuted": lambda h: h.reshape(4, 16, 8).permute(2, 0, 1),
    "sliced": lambda h: h[:, 1:7],
    "misaligned": lambda h: h.flatten()[3:],  # contiguous, but its address is not 16-byte aligned
    "expanded": lambda h: h[:1].expand(5, 8),
    "large": lambda h: h.repeat(16, 160),  # 1.3M entries: more than one pass of the kernel's grid
}


def _rng_states() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.get_rng_state(), torch.cuda.get_rng_state()


def _strategy(name: str, n: int) -> mf.Strategy:
    return mf.Exact() if name == "exact" else mf.Random(k=n, distribution="orthogonal")  # exact at k = n


def _assert_same_state(got: tuple, want: tuple, cpu_too: bool) -> None:
    # Random advances torch's CPU generator by one draw on exit, by design (README, "Randomness").
    assert torch.equal(got[1], want[1]), "the CUDA generator ended elsewhere than after the plain call"
    if cpu_too:
        assert torch.equal(got[0], want[0]), "the CPU generator ended elsewhere than after the plain call"


def _close(got, want, rtol: float = 1e-12) -> None:
    scale = max(float(t.detach().abs().max()) for t in (want if isinstance(want, list) else [want]))
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


@cuda
@pytest.mark.parametrize("strategy", ["exact", "orthogonal"])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_dropout_draws_the_plain_kernels_mask(layout: str, p: float, strategy: str) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, dtype=DT, generator=gen).cuda()
    x = torch.randn(64, 8, dtype=DT, generator=gen).cuda()

    def body(w, x):
        return F.dropout(LAYOUTS[layout](x @ w), p)

    def loss_of(f):
        def loss(w, x):
            out = f(w, x)
            return out.sin().sum(), out

        return loss

    seg = mf.fwd(body, name="d")
    plan = {"d": _strategy(strategy, w.numel())}
    # mixed_grad against torch.func.grad
    torch.manual_seed(3)
    want, want_out = torch.func.grad(loss_of(body), has_aux=True)(w, x)
    want_state = _rng_states()
    torch.manual_seed(3)
    got, got_out = mf.mixed_grad(loss_of(seg), plan, has_aux=True)(w, x)
    _close(got_out, want_out, 1e-13)
    _close(got, want)
    _assert_same_state(_rng_states(), want_state, cpu_too=strategy == "exact")
    # use_plan + backward() against plain autograd
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    torch.manual_seed(3)
    plain = body(w1, x)
    plain.sin().sum().backward()
    want_state = _rng_states()
    torch.manual_seed(3)
    with mf.use_plan(plan):
        out = seg(w2, x)
        out.sin().sum().backward()
    _close(out, plain, 1e-13)
    _close(w2.grad, w1.grad)
    _assert_same_state(_rng_states(), want_state, cpu_too=strategy == "exact")


def _parameter_count(name: str) -> int:
    torch.manual_seed(0)
    return sum(p.numel() for p in MODELS[name][0]().parameters())


@pytest.mark.parametrize("strategy", ["exact", "orthogonal"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda)])
def test_cuda_models_draw_the_plain_masks(device: str, name: str, strategy: str) -> None:
    """Every model of MODELS (in-place and alpha dropout, attention with dropout in float64, transposed activations)
    on CUDA: outputs, gradients and the generators' states after the call, under both transforms."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().to(device).train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(1)).to(device)
    seg = mf.fwd(model, name="m")
    plan = {"m": _strategy(strategy, _parameter_count(name))}

    def loss_of(f):
        def loss(p, x):
            out = f(p, x)
            return out.pow(2).sum(), out

        return loss

    torch.manual_seed(5)
    want, want_out = torch.func.grad(loss_of(lambda p, x: torch.func.functional_call(model, p, (x,))),
                                     has_aux=True)(params, x)
    want_state = _rng_states()
    torch.manual_seed(5)
    got, got_out = mf.mixed_grad(loss_of(seg), plan, has_aux=True)(params, x)
    _close(got_out, want_out, 1e-13)
    _close(list(got.values()), list(want.values()))
    _assert_same_state(_rng_states(), want_state, cpu_too=strategy == "exact")

    torch.manual_seed(5)
    plain = model(x)
    plain.pow(2).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    want_state = _rng_states()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with mf.use_plan(plan):
        out = seg(x)
        out.pow(2).sum().backward()
    _close(out, plain, 1e-13)
    _close([p.grad for p in model.parameters()], want)
    _assert_same_state(_rng_states(), want_state, cpu_too=strategy == "exact")


@cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_attention_dropout_draws_the_plain_kernels_mask(causal: bool) -> None:
    """Scaled-dot-product attention drops its weights inside one ATen call (the math kernel, in float64)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=DT, generator=gen).cuda() for _ in range(3))

    def body(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=causal)

    def loss_of(f):
        def loss(q, k, v):
            out = f(q, k, v)
            return out.sin().sum(), out

        return loss

    seg = mf.fwd(body, name="a")
    torch.manual_seed(2)
    want, want_out = torch.func.grad(loss_of(body), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    want_state = _rng_states()
    torch.manual_seed(2)
    got, got_out = mf.mixed_grad(loss_of(seg), {"a": mf.Exact()}, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    _close(got_out, want_out, 1e-13)
    _close(list(got), list(want))
    _assert_same_state(_rng_states(), want_state, cpu_too=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(2)
    with mf.use_plan({"a": mf.Exact()}):
        out = seg(*leaves)
        out.sin().sum().backward()
    _close(out, want_out, 1e-13)
    _close([t.grad for t in leaves], list(want))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_dropout_in_lower_precision_rounds_as_the_kernel(dtype: torch.dtype) -> None:
    """The kernel multiplies in float32 and rounds once: the segment's output is the plain one bit for bit."""
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
    seg = mf.fwd(lambda x: F.dropout(x.t() * 1, 0.3), name="h")
    torch.manual_seed(4)
    plain = F.dropout(x.t() * 1, 0.3)
    leaf = x.clone().requires_grad_()
    torch.manual_seed(4)
    with mf.use_plan({"h": mf.Random(k=2)}):
        out = seg(leaf)
    assert torch.equal(out, plain)
    torch.manual_seed(4)
    got, got_out = mf.mixed_grad(lambda x: (lambda o: (o.float().sum(), o))(seg(x)), {"h": mf.Exact()},
                                 has_aux=True)(x)
    assert torch.equal(got_out, plain)
    assert torch.equal(got, (plain != 0).t().to(dtype) * got.max())  # mask * scale, the same mask


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_a_callers_vmap_keeps_its_own_draws(monkeypatch: pytest.MonkeyPatch, randomness: str) -> None:
    """Under the caller's vmap the plain code draws through vmap's batching rule too: the kernel rule stays out.
    (On CPU with the rule switched on as if CPU dropout were fused: on CUDA, torch 2.11 crashes (SIGSEGV) in
    dropout under vmap(grad(vmap(jvp))), with or without madfunc's rule.)"""
    from madfunc.ops import dropout as _dropout
    monkeypatch.setattr(_dropout, "_FUSED", frozenset(("cpu",)))
    gen = torch.Generator().manual_seed(0)
    w, xs = torch.randn(8, 8, dtype=DT, generator=gen), torch.randn(3, 4, 8, dtype=DT, generator=gen)
    seg = mf.fwd(lambda w, x: F.dropout(x @ w, 0.5), name="d")
    plans = [mf.Exact()] + ([mf.Random(k=64, distribution="orthogonal")] if randomness == "same" else [])
    for plan in plans:
        torch.manual_seed(0)
        want = torch.func.vmap(torch.func.grad(lambda w, x: F.dropout(x @ w, 0.5).sin().sum()), in_dims=(None, 0),
                               randomness=randomness)(w, xs)
        torch.manual_seed(0)
        got = torch.func.vmap(mf.mixed_grad(lambda w, x: seg(w, x).sin().sum(), {"d": plan}), in_dims=(None, 0),
                              randomness=randomness)(w, xs)
        _close(got, want)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("device", DEVICES)
def test_complex_half_tangents_are_checked_for_zeros(device: str) -> None:
    """The all-zero check after a pass: any() has no CUDA kernel for complex32 (op ``chalf``)."""
    from madfunc.engine.passes import all_zero_tangents

    y = torch.ones(3, dtype=torch.complex32, device=device)
    zero, one = torch.zeros(2, 3, dtype=torch.complex32, device=device), torch.ones(2, 3, device=device).chalf()
    assert all_zero_tangents(("chalf-test",), [y, y, y], [zero, one, one.conj()]) == [0]


@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
def test_kernel_rule_on_cpu_draws_what_native_dropout_draws(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """The CUDA rule's machinery, run on CPU (as if CPU dropout were fused): under both transforms the segment
    draws what the device's native_dropout draws on a plain input, outside vmap's batching rule."""
    from madfunc.ops import dropout as _dropout
    monkeypatch.setattr(_dropout, "_FUSED", frozenset(("cpu",)))
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 8, dtype=DT, generator=gen), torch.randn(64, 8, dtype=DT, generator=gen)
    seg = mf.fwd(lambda w, x: F.dropout(LAYOUTS[layout](x @ w), 0.3), name="d")

    def plain(w, x):
        return torch.native_dropout(LAYOUTS[layout](x @ w), 0.3, True)[0]

    torch.manual_seed(1)
    want = torch.func.grad(lambda w, x: plain(w, x).sin().sum())(w, x)
    torch.manual_seed(1)
    got = mf.mixed_grad(lambda w, x: seg(w, x).sin().sum(), {"d": mf.Exact()})(w, x)
    _close(got, want)
    leaf = w.clone().requires_grad_()
    torch.manual_seed(1)
    with mf.use_plan({"d": mf.Exact()}):
        seg(leaf, x).sin().sum().backward()
    _close(leaf.grad, want)


def _spy(rule, label: str, applied: list[str]):
    def spy(*args):
        out = rule(*args)
        if out is not None:
            applied.append(label)
        return out

    return spy


@pytest.mark.parametrize("name", ["transformer", "attention_weights"])
def test_kernel_rules_reach_into_attention_on_cpu(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The op seam does not see the calls F.multi_head_attention_forward makes (a TorchFunctionMode is paused while
    it handles one); its rule runs the body under the seam, so the dropout and attention rules reach inside. On CPU
    with the rules switched on, use_plan still gives the plain CPU model's output and gradient."""
    from madfunc.ops import dropout as _dropout
    monkeypatch.setattr(_dropout, "_FUSED", frozenset(("cpu",)))
    applied: list[str] = []
    for op in (F.dropout, F.scaled_dot_product_attention):
        monkeypatch.setitem(_dropout.RNG_RULES, op, _spy(_dropout.RNG_RULES[op], op.__name__, applied))
    model, x, seg, plain = _model_and_plain_output(name)
    plain.pow(2).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(5)
    with mf.use_plan({"m": mf.Exact()}):
        out = seg(x)
        out.pow(2).sum().backward()
    _close(out, plain, 1e-13)
    _close([p.grad for p in model.parameters()], want)
    inside = "scaled_dot_product_attention" if name == "transformer" else "dropout"
    assert inside in applied, applied
