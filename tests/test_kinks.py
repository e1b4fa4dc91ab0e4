"""Forward segments against backprop at the points where ops are not differentiable (kinks, ties, zeros,
repeated indices), in float64: each body runs as one ``Exact`` segment and its gradient is compared with
``torch.func.grad``'s. Most agree by PyTorch's own rules. The prelu, fmax, one-tensor-bound clamp, det and rrelu
rows agree because of madfunc's rules (ops/kinks.py; det in ops/rules.py): without them they fail, and a new rule of
that kind lands as a row here. The rows of ``DIFFERENT`` and ``RAISES`` are the known differences that
docs/guides/ops.md explains, asserted to stay as documented (a PyTorch release that changes one fails here).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import madfunc as mf

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64
KINKS = [-3.0, -1.0, 0.0, 1.0, 3.0, 6.0, 0.5, -0.5]
TIES = [1.0, 3.0, 3.0, -2.0, 0.0, 3.0]
PAIRS = [1.0, 2.0, 3.0, 0.0, 1.0, 5.0, 3.0, -1.0]  # (x, y): ties at 0 and 2
_I = torch.tensor
ZEROS = torch.zeros(3, dtype=DT)
PRELU = torch.nn.PReLU(2).double()

BODIES = {  # name: (body of w, w's values)
    **{name: (f, KINKS) for name, f in {
        "relu": F.relu, "relu6": F.relu6, "hardtanh": F.hardtanh, "hardswish": F.hardswish,
        "hardsigmoid": F.hardsigmoid, "leaky_relu": lambda w: F.leaky_relu(w, 0.1), "elu": F.elu, "celu": F.celu,
        "selu": F.selu, "threshold": lambda w: F.threshold(w, 1.0, -5.0), "hardshrink": F.hardshrink,
        "softshrink": F.softshrink, "softplus_threshold": lambda w: F.softplus(w, threshold=1.0),
        "abs": torch.abs, "clamp": lambda w: torch.clamp(w, -1.0, 1.0), "clamp_min": lambda w: w.clamp_min(0.0),
        "clamp_inverted": lambda w: torch.clamp(w, 1.0, -1.0), "gelu_tanh": lambda w: F.gelu(w, approximate="tanh"),
        "prelu": lambda w: F.prelu(w[:6].reshape(1, 6), w[6:7]),
        "prelu_1d_one_slope": lambda w: torch.prelu(w[:6], w[6:7]),
        "rrelu_eval": lambda w: F.rrelu(w, 0.1, 0.3),
        "rrelu_eval_in_place": lambda w: torch.nn.RReLU(inplace=True).eval()(w * 1.0),
        "torch_rrelu_eval_in_place": lambda w: torch.rrelu_(w * 1.0, 0.2, 0.4, False),
        "nn_prelu_channels": lambda w: torch.func.functional_call(PRELU, {"weight": w[6:]},
                                                                  (w[:6].reshape(3, 2),)),
    }.items()},
    **{name: (f, PAIRS) for name, f in {
        "maximum": lambda w: torch.maximum(w[:4], w[4:]), "minimum": lambda w: torch.minimum(w[:4], w[4:]),
        "fmax": lambda w: torch.fmax(w[:4], w[4:]), "fmin": lambda w: torch.fmin(w[:4], w[4:]),
        "tensor_fmax": lambda w: w[:4].fmax(w[4:]), "clip_tensor_min": lambda w: torch.clip(w[:4], min=w[4:]),
        "clamp_tensor_min": lambda w: torch.clamp(w[:4], min=w[4:]),
        "clamp_tensor_max": lambda w: w[:4].clamp(max=w[4:]),
        "clamp_both_tensors": lambda w: torch.clamp(w[:4], min=w[4:], max=w[4:] + 1),
        "clamp_in_place_tensor_min": lambda w: w[:4].clone().clamp_(min=w[4:]),
        "clip_in_place_tensor_max": lambda w: torch.clip_(w[:4].clone(), max=w[4:]),
    }.items()},
    **{name: (f, TIES) for name, f in {
        "max": torch.max, "amax_dim": lambda w: w.reshape(2, 3).amax(1), "max_dim": lambda w: w.reshape(2, 3).max(1)[0],
        "median_dim": lambda w: w.reshape(2, 3).median(1)[0], "sort": lambda w: w.sort()[0] * torch.arange(6.0),
        "topk": lambda w: w.topk(2)[0], "cummax": lambda w: w.cummax(0)[0], "logcumsumexp": lambda w: w.logcumsumexp(0),
        "max_pool1d": lambda w: F.max_pool1d(w.reshape(1, 1, 6), 2, 1),
        "adaptive_max_pool1d": lambda w: F.adaptive_max_pool1d(w.reshape(1, 1, 6), 2),
        "vector_norm_inf": lambda w: torch.linalg.vector_norm(w, float("inf")),
    }.items()},
    "prelu_at_zero": (lambda w: F.prelu(w.reshape(1, 2, 2), w[:2] + 1.0), [0.0, -1.0, 0.0, 2.0]),
    "prod_one_zero": (torch.prod, [2.0, 0.0, 3.0, 4.0]),
    "prod_two_zeros": (torch.prod, [2.0, 0.0, 3.0, 0.0]),
    "cumprod_zeros": (lambda w: w.cumprod(0), [2.0, 0.0, 3.0, 0.0, 4.0]),
    "norm_zero": (torch.norm, [0.0, 0.0, 0.0]),
    "vector_norm_zero_row": (lambda w: torch.linalg.vector_norm(w.reshape(2, 2), dim=1), [0.0, 0.0, 1.0, 2.0]),
    "normalize_zero": (lambda w: F.normalize(w.reshape(2, 2), dim=1), [0.0, 0.0, 1.0, 2.0]),
    "layer_norm_constant": (lambda w: F.layer_norm(w.reshape(2, 3), (3,)), [1.0, 1.0, 1.0, 1.0, 2.0, 3.0]),
    "pow_zero_zero": (lambda w: torch.pow(w[:2], w[2:]), [0.0, 0.0, 0.0, 2.0]),
    "det_singular": (lambda w: torch.linalg.det(w.reshape(2, 2)), [1.0, 2.0, 2.0, 4.0]),
    "det_zero": (lambda w: torch.linalg.det(w.reshape(3, 3)), [0.0] * 9),
    "det_rank_two": (lambda w: torch.linalg.det(w.reshape(3, 3)), [1.0, 2.0, 3.0, 2.0, 4.0, 6.0, 1.0, 0.0, 1.0]),
    "tensor_det_zero_row": (lambda w: w.reshape(2, 2).det(), [1.0, 2.0, 0.0, 0.0]),
    "huber_boundary": (lambda w: F.huber_loss(w, ZEROS[:2], reduction="none"), [1.0, -1.0]),
    "smooth_l1_boundary": (lambda w: F.smooth_l1_loss(w, ZEROS[:2], reduction="none"), [1.0, -1.0]),
    "l1_zero": (lambda w: F.l1_loss(w, ZEROS, reduction="none"), [0.0, 1.0, -1.0]),
    "cross_entropy_ignore_smooth": (lambda w: F.cross_entropy(w.reshape(2, 3), _I([1, -100]), label_smoothing=0.2),
                                    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    "nll_ignore_index": (lambda w: F.nll_loss(w.reshape(2, 3), _I([1, 2]), ignore_index=2), [1, 2, 3, 4, 5, 6.0]),
    "margin_ranking_boundary": (lambda w: F.margin_ranking_loss(w[:2], w[2:], _I([1.0, -1.0], dtype=DT), margin=1.0,
                                                                reduction="none"), [2.0, 1.0, 1.0, 0.0]),
    "index_select_repeated": (lambda w: w.index_select(0, _I([0, 0, 2])), [1.0, 2.0, 3.0]),
    "gather_repeated": (lambda w: w.reshape(2, 2).gather(1, _I([[0, 0], [1, 1]])), [1.0, 2.0, 3.0, 4.0]),
    "scatter_add_repeated": (lambda w: ZEROS.scatter_add(0, _I([0, 0, 2]), w), [1.0, 2.0, 3.0]),
    "index_put_accumulate": (lambda w: ZEROS.index_put((_I([0, 0, 2]),), w, accumulate=True), [1.0, 2.0, 3.0]),
    "scatter_reduce_amax": (lambda w: w[:3].scatter_reduce(0, _I([0, 0, 2]), w[3:], "amax"), [2.0, 1, 3, 2, 2, 1]),
    "scatter_reduce_prod_zero": (lambda w: w[:3].scatter_reduce(0, _I([0, 0, 2]), w[3:], "prod"), [2, 1, 3, 0, 2, 1.]),
    "softmax_minus_inf": (lambda w: torch.softmax(torch.where(w > 0, w, -math.inf), 0), [0.0, 1.0, 2.0]),
    # known differences (DIFFERENT, RAISES below)
    "scatter_repeated": (lambda w: ZEROS.scatter(0, _I([0, 0, 2]), w), [1.0, 2.0, 3.0]),
    "index_put_repeated": (lambda w: ZEROS.index_put((_I([0, 0, 2]),), w), [1.0, 2.0, 3.0]),
    "where_masked_nan": (lambda w: torch.where(w > 0, w.log(), 0.0), [0.0, 1.0, 2.0]),
    "nansum_masked_nan": (lambda w: torch.nansum(w / _I([1.0, 0.0, 2.0], dtype=DT)), [1.0, 0.0, 3.0]),
    "scatter_reduce_amax_exclude_self": (lambda w: w[:3].scatter_reduce(0, _I([0, 0, 2]), w[3:], "amax",
                                                                       include_self=False), [2.0, 1, 3, 2, 2, 1]),
    "polar_zero_abs": (lambda w: torch.view_as_real(torch.polar(w[:2], w[2:])), [0.0, 1.0, 0.5, 0.5]),
    "xlogy_zero": (lambda w: torch.xlogy(w[:2], w[2:]), [0.0, 1.0, 0.0, 2.0]),
    "atan2_zero": (lambda w: torch.atan2(w[:2], w[2:]), [0.0, 1.0, 0.0, 1.0]),
    "hypot_zero": (lambda w: torch.hypot(w[:2], w[2:]), [0.0, 1.0, 0.0, 1.0]),
    "cdist_zero": (lambda w: torch.cdist(w[:4].reshape(2, 2), w[4:].reshape(2, 2)), [1.0, 2, 0, 0, 1, 2, 3, 3]),
}
DIFFERENT = {  # the writes' winner vs every written value; NaN (backprop) vs finite; PyTorch's backward wrong
    "scatter_repeated", "index_put_repeated", "where_masked_nan", "nansum_masked_nan",
    "scatter_reduce_amax_exclude_self", "polar_zero_abs",
}
RAISES = {"xlogy_zero", "atan2_zero", "hypot_zero", "cdist_zero"}  # infinite derivative, finite value: refused


@pytest.mark.parametrize("name", BODIES, ids=str)
def test_forward_segment_at_kinks_and_ties_matches_backprop_or_the_documented_difference(name: str) -> None:
    body, values = BODIES[name]
    seg = mf.fwd(body, name="op")
    w = torch.tensor(values, dtype=DT)

    def loss(f):  # noqa: ANN001, ANN202
        def of(w):  # noqa: ANN001, ANN202
            out = f(w).reshape(-1)
            return (out * torch.linspace(-1.0, 2.0, out.numel(), dtype=DT)).sum() + 0.5 * out.pow(2).sum()
        return of

    want = torch.func.grad(loss(body))(w)
    if name in RAISES:
        with pytest.raises(FloatingPointError, match="segment 'op'"):
            mf.mixed_grad(loss(seg), {"op": mf.Exact()})(w)
        return
    got = mf.mixed_grad(loss(seg), {"op": mf.Exact()})(w)
    same = torch.allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert same != (name in DIFFERENT), (got, want)
    assert got.isfinite().all()  # a forward segment never hands back a NaN the user did not compute


def test_the_kink_rules_leave_the_common_calls_native() -> None:
    # clamp with number bounds needs no rule: a pass that meets only such calls stays untouched, so the engine's
    # later passes may skip the op seam (engine/pushes.py); a tensor bound is ruled.
    from madfunc.ops.rules import OpRules

    x = torch.tensor([0.5, 2.0], dtype=DT)
    with OpRules("op") as native:
        assert torch.equal(torch.clamp(x, 0.0, 1.0), torch.tensor([0.5, 1.0], dtype=DT))
        x.clamp(max=1.0)
        torch.clip(x, min=0.0)
    with OpRules("op") as ruled:
        assert torch.equal(torch.clamp(x, max=torch.ones(2, dtype=DT)), torch.tensor([0.5, 1.0], dtype=DT))
    assert not native.touched and ruled.touched
