"""torch.nn modules as forward segments: exact gradients (by the op's forward rule or the fallback).

Each module runs as ``mf.fwd(module, name=...)`` called as ``seg(params, *inputs)`` inside
``mf.mixed_grad`` (Exact strategy), differentiating its parameters and every float input at once,
and is compared with ``torch.func.grad`` of ``torch.func.functional_call`` in float64.
Modules whose op has no forward rule run by the double-vjp fallback; one that no rule can run raises
``madfunc.ForwardModeError`` naming the segment and the op.
"""

from __future__ import annotations

from collections.abc import Callable

import optree
import pytest
import torch
from conftest import assert_tree_close, max_abs_error, record_float64_error
from torch import nn

import madfunc as mf

# Tiny models: one intra-op thread is ~10x faster here (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

RTOL64, ATOL64 = 1e-10, 1e-12
DT = torch.float64


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _bn(cls: type[nn.Module], channels: int) -> nn.Module:
    module = cls(channels)
    # Non-trivial running statistics, so eval mode is not an identity map.
    module.running_mean.copy_(_randn(11, channels) * 0.3)
    module.running_var.copy_(_randn(12, channels).abs() + 0.5)
    return module


# name: (module factory, input factory)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]] = {
    "Linear": (lambda: nn.Linear(4, 3), lambda: (_randn(0, 2, 4),)),
    "Bilinear": (lambda: nn.Bilinear(3, 2, 2), lambda: (_randn(0, 2, 3), _randn(1, 2, 2))),
    "Conv1d": (lambda: nn.Conv1d(2, 3, 3), lambda: (_randn(0, 2, 2, 6),)),
    "Conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2), lambda: (_randn(0, 1, 2, 5, 5),)),
    "Conv3d": (lambda: nn.Conv3d(1, 2, 2), lambda: (_randn(0, 1, 1, 3, 3, 3),)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), lambda: (_randn(0, 1, 2, 3, 3),)),
    "BatchNorm1d_eval": (lambda: _bn(nn.BatchNorm1d, 3), lambda: (_randn(0, 4, 3),)),
    "BatchNorm2d_eval": (lambda: _bn(nn.BatchNorm2d, 2), lambda: (_randn(0, 2, 2, 3, 3),)),
    "LayerNorm": (lambda: nn.LayerNorm(4), lambda: (_randn(0, 3, 4),)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), lambda: (_randn(0, 2, 4, 3),)),
    "InstanceNorm1d_affine": (lambda: nn.InstanceNorm1d(2, affine=True), lambda: (_randn(0, 2, 2, 5),)),
    "RMSNorm": (lambda: nn.RMSNorm(4), lambda: (_randn(0, 3, 4),)),
    "LocalResponseNorm": (lambda: nn.LocalResponseNorm(2), lambda: (_randn(0, 1, 4, 3, 3),)),
    "Embedding": (lambda: nn.Embedding(10, 3), lambda: (torch.tensor([[1, 2, 2], [9, 0, 4]]),)),
    "MultiheadAttention": (
        lambda: nn.MultiheadAttention(4, 2, batch_first=True),
        lambda: (_randn(0, 2, 3, 4), _randn(1, 2, 5, 4), _randn(2, 2, 5, 4)),
    ),
    "TransformerEncoderLayer_train_nodropout": (
        lambda: nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True).train(),
        lambda: (_randn(0, 2, 3, 4),),
    ),
    # In eval mode the encoder layer would take PyTorch's fused fast path, which has no forward-mode rule;
    # forward segments turn the fast path off, as they pick the math kernel for scaled-dot-product attention.
    "TransformerEncoderLayer_eval": (
        lambda: nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True).eval(),
        lambda: (_randn(0, 2, 3, 4),),
    ),
    "RNN": (lambda: nn.RNN(3, 4, batch_first=True), lambda: (_randn(0, 2, 3, 3),)),
    "GRU": (lambda: nn.GRU(3, 4, batch_first=True), lambda: (_randn(0, 2, 3, 3),)),
    "LSTM": (lambda: nn.LSTM(3, 4, num_layers=2), lambda: (_randn(0, 3, 2, 3),)),
    "Softmax": (lambda: nn.Softmax(-1), lambda: (_randn(0, 2, 5),)),
    "LogSoftmax": (lambda: nn.LogSoftmax(-1), lambda: (_randn(0, 2, 5),)),
    "GELU_tanh": (lambda: nn.GELU(approximate="tanh"), lambda: (_randn(0, 2, 5),)),
    "GELU": (lambda: nn.GELU(), lambda: (_randn(0, 2, 5),)),
    "SiLU": (lambda: nn.SiLU(), lambda: (_randn(0, 2, 5),)),
    "Mish": (lambda: nn.Mish(), lambda: (_randn(0, 2, 5),)),
    "ELU": (lambda: nn.ELU(), lambda: (_randn(0, 2, 5),)),
    "Softplus": (lambda: nn.Softplus(beta=2.0), lambda: (_randn(0, 2, 5),)),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.1), lambda: (_randn(0, 2, 5),)),
    "Hardswish": (lambda: nn.Hardswish(), lambda: (_randn(0, 2, 5),)),
    "PReLU": (lambda: nn.PReLU(3), lambda: (_randn(0, 2, 3, 4),)),
    "Dropout_eval": (lambda: nn.Dropout(0.5), lambda: (_randn(0, 2, 5),)),
    "AvgPool2d": (lambda: nn.AvgPool2d(2), lambda: (_randn(0, 1, 2, 4, 4),)),
    "MaxPool1d": (lambda: nn.MaxPool1d(2), lambda: (_randn(0, 2, 2, 6),)),
    "MaxPool2d": (lambda: nn.MaxPool2d(2, stride=1), lambda: (_randn(0, 1, 2, 4, 4),)),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d((2, 3)), lambda: (_randn(0, 1, 2, 5, 5),)),
    "AdaptiveMaxPool1d": (lambda: nn.AdaptiveMaxPool1d(3), lambda: (_randn(0, 2, 2, 7),)),
    "LPPool2d_positive": (lambda: nn.LPPool2d(2, 2), lambda: (_randn(0, 1, 2, 4, 4),)),
    "Upsample_nearest": (lambda: nn.Upsample(scale_factor=2), lambda: (_randn(0, 1, 2, 3, 3),)),
    "Upsample_bilinear": (
        lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        lambda: (_randn(0, 1, 2, 3, 3),),
    ),
    "PixelShuffle": (lambda: nn.PixelShuffle(2), lambda: (_randn(0, 1, 8, 2, 2),)),
    "PixelUnshuffle": (lambda: nn.PixelUnshuffle(2), lambda: (_randn(0, 1, 2, 4, 4),)),
    "Flatten_Unflatten": (
        lambda: nn.Sequential(nn.Flatten(), nn.Unflatten(1, (3, 2))),
        lambda: (_randn(0, 2, 2, 3),),
    ),
    "Unfold": (lambda: nn.Unfold(2), lambda: (_randn(0, 1, 2, 3, 3),)),
    "Fold": (lambda: nn.Fold((3, 3), 2), lambda: (_randn(0, 1, 8, 4),)),
    "CosineSimilarity": (lambda: nn.CosineSimilarity(), lambda: (_randn(0, 3, 4), _randn(1, 3, 4))),
    "PairwiseDistance": (lambda: nn.PairwiseDistance(), lambda: (_randn(0, 3, 4), _randn(1, 3, 4))),
    "MSELoss": (lambda: nn.MSELoss(), lambda: (_randn(0, 3, 4), _randn(1, 3, 4))),
    "HuberLoss": (lambda: nn.HuberLoss(delta=0.5), lambda: (_randn(0, 3, 4), _randn(1, 3, 4))),
    "CrossEntropyLoss": (lambda: nn.CrossEntropyLoss(), lambda: (_randn(0, 3, 4), torch.tensor([0, 3, 1]))),
    "Sequential_inplace_relu_dropout": (
        lambda: nn.Sequential(
            nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2), nn.Dropout(0.2, inplace=True)
        ),
        lambda: (_randn(0, 5, 3),),
    ),
    "Sequential_conv_bn_pool": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), _bn(nn.BatchNorm2d, 2), nn.ReLU(), nn.MaxPool2d(2)
        ),
        lambda: (_randn(0, 2, 1, 4, 4),),
    ),
}

# Modules whose op has no forward rule in PyTorch and a backward that is not differentiable either:
# with at most 64 output scalars the double-vjp fallback reads their Jacobian rows (exact).
CASES.update({
    "EmbeddingBag": (
        lambda: nn.EmbeddingBag(10, 3),
        lambda: (torch.tensor([[1, 2], [3, 4]]),),
    ),
    "CTCLoss": (
        lambda: nn.CTCLoss(),
        lambda: (
            _randn(0, 5, 1, 4).log_softmax(-1),
            torch.tensor([[1, 2]]),
            torch.tensor([5]),
            torch.tensor([2]),
        ),
    ),
    "MultiMarginLoss": (
        lambda: nn.MultiMarginLoss(),
        lambda: (_randn(0, 3, 4), torch.tensor([0, 3, 1])),
    ),
    "MultiLabelMarginLoss": (
        lambda: nn.MultiLabelMarginLoss(),
        lambda: (_randn(0, 2, 4), torch.tensor([[3, 0, -1, 1], [1, 2, -1, 0]])),
    ),
})


# vmap falls back to a slow loop for an op without a batching rule; madfunc says so once per segment and
# op (a PerformanceWarning naming both), harmless for correctness.
def _no_batching_rule(op: str):
    # '.' stands for ':', which a filterwarnings spec cannot hold (it separates the spec's fields)
    return pytest.mark.filterwarnings(f"ignore:segment '.*'. vmap has no batching rule for aten..{op}")


SLOW_FALLBACK = {"Bilinear": "_trilinear", "Mish": "mish_backward"}


def _setup(factory: Callable[[], nn.Module], inputs_factory: Callable[[], tuple]):
    torch.manual_seed(0)  # module initialisation
    module = factory().to(DT)
    if not any(isinstance(m, nn.TransformerEncoderLayer) for m in module.modules()):
        module.eval()  # eval mode (dropout off, running statistics); the encoder layers set their own mode
    params = {k: v.detach() for k, v in module.named_parameters()}
    inputs = inputs_factory()
    float_positions = [i + 1 for i, t in enumerate(inputs) if t.is_floating_point()]
    return module, params, inputs, (0, *float_positions)


def _scalar(out) -> torch.Tensor:
    # sin keeps every output entry's cotangent distinct (a plain sum would give zero through softmax).
    return sum(torch.sin(leaf).sum() for leaf in optree.tree_leaves(out) if leaf.is_floating_point())


@pytest.mark.parametrize(
    "case",
    [pytest.param(k, marks=_no_batching_rule(SLOW_FALLBACK[k])) if k in SLOW_FALLBACK else k for k in CASES],
)
def test_module_as_forward_segment_is_exact(case: str) -> None:
    module, params, inputs, argnums = _setup(*CASES[case])
    seg = mf.fwd(module, name=case)

    got = mf.mixed_grad(lambda p, *xs: _scalar(seg(p, *xs)), argnums=argnums)(params, *inputs)
    want = torch.func.grad(
        lambda p, *xs: _scalar(torch.func.functional_call(module, p, xs)), argnums=argnums
    )(params, *inputs)
    assert_tree_close(got, want, rtol=RTOL64, atol=ATOL64)
    record_float64_error(f"module/{case}", max_abs_error(got, want))
    assert any(bool(leaf.abs().max() > 0) for leaf in optree.tree_leaves(got))


def test_module_without_any_usable_rule_raises_forward_mode_error() -> None:
    """EmbeddingBag's backward is not differentiable and 2 x 40 outputs are too many for Jacobian rows."""
    module, params, inputs, argnums = _setup(lambda: nn.EmbeddingBag(10, 40), lambda: (torch.tensor([[1, 2], [3, 4]]),))
    seg = mf.fwd(module, name="bag")

    def loss(p, *xs):
        return _scalar(seg(p, *xs))

    # Reverse mode handles it (so the failure is forward mode's, not the test's) ...
    want = torch.func.grad(lambda p, *xs: _scalar(torch.func.functional_call(module, p, xs)))(params, *inputs)
    assert_tree_close(mf.mixed_grad(loss, {"bag": "rev"})(params, *inputs), want, rtol=RTOL64, atol=ATOL64)
    # ... and forward mode says which segment, which op, and what to do.
    with pytest.raises(mf.ForwardModeError, match=r"(?s)segment 'bag'.*embedding_bag.*not differentiable.*rev\(\)"):
        mf.mixed_grad(loss)(params, *inputs)
