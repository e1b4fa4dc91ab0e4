"""Clean-up passes over a recorded tangent pass (an aten-level ``torch.fx`` graph of ``vmap(jvp(body))``).

What functorch records is correct but does work on tangents known to be zero: a primal input without a
tangent enters forward-mode rules as an all-zero tensor (``zeros([]).expand(shape)`` or
``_efficientzerotensor``), so a convolution's rule convolves the zero input tangent with the weight and
adds the result, ``mse_loss``'s rule runs its backward on a zero grad, and vmap's layout fix-ups
(``_new_zeros_with_same_feature_meta`` + ``copy_``) copy whole tangent batches. ``simplify`` removes that:

1. **zero propagation**: a node is *zero* when it is created as zeros or when the input an op is linear
   in is zero (``_ZERO_IN_FIRST``, ``_ZERO_IF_ANY``), or it is a view of a zero node; ``x + 0`` and
   ``x - 0`` become ``x`` where the shapes and dtypes already agree (no broadcast or promotion in the add);
2. **layout fix-ups**: ``copy_(_new_zeros_with_same_feature_meta(x, ...), x)`` becomes ``x`` (same values,
   only the strides differ; the graph's ``view`` calls, which assumed the fixed-up strides, become
   ``reshape``: a view where the strides allow, a copy where not);
3. a zero node that something still reads is rebuilt as one ``zeros`` of its shape; dead nodes go;
4. **kernel choice**: ``avg_pool2d`` with kernel == stride and no padding on a large tangent batch becomes
   a sum of strided slices (``pool_by_slices``): on CPU, 0.4-0.6x the time of torch's pooling kernel on
   the many small images of a tangent batch (same values up to float rounding).

Values are unchanged except where the recorded graph multiplied a zero tangent by an infinite or NaN
primal factor: the clean graph gives 0 there, the exact derivative of a term that is absent.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

__all__ = ["mutates", "pool_by_slices", "simplify"]

aten = torch.ops.aten

# Creators of all-zero tensors.
_ZEROS = {aten.zeros.default, aten._efficientzerotensor.default, aten.zeros_like.default, aten.new_zeros.default,
          aten._new_zeros_with_same_feature_meta.default}

# Ops whose output is zero as soon as argument 0 is: views, reshapes, reductions, linear maps of one input.
_ZERO_IN_FIRST = {
    aten.alias.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.permute.default, aten.t.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.select.int, aten.slice.Tensor, aten.clone.default,
    aten.contiguous.default, aten.neg.default, aten.sum.dim_IntList, aten.sum.default, aten.mean.dim,
    aten.mean.default, aten.avg_pool2d.default, aten.avg_pool1d.default, aten.avg_pool3d.default, aten.gather.default,
    aten.tanh_backward.default, aten.sigmoid_backward.default, aten.threshold_backward.default,
    aten.mse_loss_backward.default, aten.gelu_backward.default, aten.silu_backward.default,
    aten.max_pool2d_with_indices_backward.default, aten.avg_pool2d_backward.default, aten.div.Tensor,
    aten.div.Scalar, aten.mul.Scalar, aten.flip.default, aten.roll.default, aten.repeat.default,
    aten.index_select.default, aten._log_softmax_backward_data.default,
    aten._softmax_backward_data.default, aten.unfold.default, aten.diagonal.default, aten.narrow.default,
    aten.expand_copy.default, aten.view_copy.default, aten.permute_copy.default, aten._to_copy.default,
}
# Bilinear ops: zero if any of the listed arguments is zero (and there is no additive term).
_ZERO_IF_ANY: dict[Any, tuple[int, ...]] = {  # (looked up by any node target)
    aten.mul.Tensor: (0, 1), aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.matmul.default: (0, 1),
    aten.convolution.default: (0, 1),  # only without bias (argument 2 None), checked below
}


def _meta(node: object):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_shape(a: object, b: object) -> bool:
    va, vb = _meta(a), _meta(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
            and va.dtype == vb.dtype)


def _is_zero(node: fx.Node, zero: set[fx.Node]) -> bool:
    target = node.target
    if target in _ZEROS:
        return True
    if target in _ZERO_IN_FIRST:
        return bool(node.args) and node.args[0] in zero
    if target in _ZERO_IF_ANY:
        if target is aten.convolution.default and node.args[2] is not None and node.args[2] not in zero:
            return False
        return any(node.args[i] in zero for i in _ZERO_IF_ANY[target])
    if target is operator.getitem:
        return node.args[0] in zero
    return False


def mutates(node: fx.Node) -> bool:
    """Whether ``node`` is an op that writes to one of its arguments."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _is_layout_fixup(node: fx.Node) -> bool:
    """``copy_(_new_zeros_with_same_feature_meta(x, ...), x)``, the fresh tensor read by nothing else."""
    if node.op != "call_function" or node.target is not aten.copy_.default:
        return False
    dst, src = node.args[:2]
    return (isinstance(dst, fx.Node) and dst.target is aten._new_zeros_with_same_feature_meta.default
            and len(dst.users) == 1 and _same_shape(node, src))


def simplify(gm: fx.GraphModule) -> int:
    """Remove work on zero tangents from ``gm`` in place (see the module docstring); returns nodes removed."""
    graph = gm.graph
    before = len(graph.nodes)
    if any(mutates(node) for node in graph.nodes if not _is_layout_fixup(node)):
        return 0  # an in-place op could turn a zero node into something else: leave the graph as recorded
    zero: set[fx.Node] = set()
    fixups = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if target is aten.alias.default:  # a view with the same values: read the source (CSE sees through it)
            node.replace_all_uses_with(node.args[0])
            continue
        if _is_layout_fixup(node):
            node.replace_all_uses_with(node.args[1])  # the copy has the source's values
            graph.erase_node(node)
            fixups += 1
            continue
        if target in (aten.add.Tensor, aten.sub.Tensor) and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if b in zero and _same_shape(node, a):
                node.replace_all_uses_with(a)
                continue
            if target is aten.add.Tensor and a in zero and _same_shape(node, b):
                node.replace_all_uses_with(b)
                continue
            if a in zero and b in zero:
                zero.add(node)
            continue
        if _is_zero(node, zero) and isinstance(_meta(node), torch.Tensor):
            zero.add(node)
    # Zero nodes still read by something that is not itself zero: one fresh zeros each.
    for node in list(graph.nodes):
        if node not in zero or node.target in _ZEROS:
            continue
        if node.target is aten.expand.default and node.args[0].target in _ZEROS:
            continue  # a broadcast scalar zero: already free, a fresh zeros would fill memory
        if all(user in zero for user in node.users):
            continue
        val = _meta(node)
        assert isinstance(val, torch.Tensor)  # (zero holds tensor nodes: checked, or add/sub of two of them)
        with graph.inserting_before(node):
            fresh = graph.call_function(aten.zeros.default, (list(val.shape),),
                                        {"dtype": val.dtype, "device": val.device})
        fresh.meta["val"] = val
        node.replace_all_uses_with(fresh)
    if fixups:  # later views assumed the fixed-up strides: reshape views where it can, copies where not
        for node in graph.nodes:
            if node.op == "call_function" and node.target in (aten.view.default, aten._unsafe_view.default):
                node.target = aten.reshape.default
    graph.eliminate_dead_code()
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.avg_pool2d.default and _pools_by_slices(node):
            node.target, node.args = pool_by_slices, (node.args[0], int(node.args[1][0]))
            node.kwargs = {}
    gm.recompile()
    return before - len(graph.nodes)


# Below this many input elements torch's kernel is as fast (measured on 2 CPU threads).
POOL_SLICES_NUMEL = 2**17


def _pools_by_slices(node: fx.Node) -> bool:
    """avg_pool2d(x, [k, k]) with stride k (or default), no padding, floor mode, no divisor, on a big input."""
    args: list[Any] = [*node.args, [], 0, False, True, None]  # (aten's defaults after the given arguments)
    x, kernel, stride, padding, ceil, _count_pad, divisor = args[:7]
    val = _meta(x)
    if not isinstance(val, torch.Tensor) or val.device.type != "cpu" or val.numel() < POOL_SLICES_NUMEL:
        return False
    kernel = list(kernel) * (2 // len(kernel))
    stride = list(stride) * (2 // len(stride)) if stride else kernel
    square = kernel[0] == kernel[1] and stride == kernel and 2 <= kernel[0] <= 4
    return square and padding in (0, [0], [0, 0]) and not ceil and divisor is None and not node.kwargs


def pool_by_slices(x: torch.Tensor, k: int) -> torch.Tensor:
    """``avg_pool2d(x, k)`` (stride k, no padding) as the mean of k*k strided slices."""
    h, w = x.shape[-2] // k * k, x.shape[-1] // k * k
    total = None
    for i in range(k):
        for j in range(k):
            part = x[..., i:h:k, j:w:k]
            total = part.clone() if total is None else total.add_(part)
    assert total is not None  # (k >= 1: the loops ran)
    return total.mul_(1.0 / (k * k))
