"""Forward mode for ops without a forward (jvp) rule: differentiate their backward once more.

For ``y = f(x)`` the vjp ``w -> J^T w`` is linear in ``w``; its own vjp, evaluated at a tangent ``u``, is
``(J^T)^T u = J u``, the jvp (PyTorch issue #10223, TensorFlow's ForwardAccumulator). So an op with a
backward that is itself differentiable gets a forward rule for free, at the cost of a vjp of a vjp.

``jvp_by_double_vjp(func, *args, **kwargs)`` runs ``func`` inside a ``torch.autograd.Function`` whose
``jvp`` staticmethod does that, so ``torch.func.jvp`` (and ``vmap`` over it, and forward-AD dual tensors)
use the double vjp instead of ``func``'s own forward rule. The Function is reached through functorch's
``custom_function_call``: under ``jvp`` its generated single-level Function calls our ``jvp`` with the
tangents, which under ``vmap`` are BatchedTensors, so every op in the double vjp is batched: one pass
for all tangents. ``backward`` is the ordinary vjp, so an outer ``grad`` or autograd still works.

When the backward is not differentiable (``_cdist_backward``, ``_embedding_bag_backward``,
``_ctc_loss_backward``, ``multi_margin_loss_backward``, a ``once_differentiable`` or detached custom
backward) and the op has at most ``JACOBIAN_ROWS_LIMIT`` output scalars (e.g. a loss), ``J u`` comes
from the Jacobian's rows instead (one first-order vjp per output scalar);
otherwise ``NoForwardRuleError`` is raised.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, cast

import optree
import torch
from torch.autograd.forward_ad import unpack_dual
from torch.func import vjp

__all__ = ["JACOBIAN_ROWS_LIMIT", "NoForwardRuleError", "function_with_fallback", "has_jvp", "jvp_by_double_vjp"]

# Output scalars up to which a non-differentiable backward is replaced by the Jacobian's rows: m vjps
# (batched) against the double vjp's ~3 passes, so only worth it for small outputs such as losses.
JACOBIAN_ROWS_LIMIT = 64


class NoForwardRuleError(NotImplementedError):
    """The op has no forward-mode rule and its backward cannot be differentiated either."""


class _Call:
    """``func`` with its non-tensor arguments fixed: a function of the flat tensor leaves only.

    Passed to the autograd.Function as a non-tensor argument, so functorch ignores it (tangent None).
    """

    def __init__(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.func = func
        owner = getattr(func, "__self__", None)  # Function.apply is bound to the Function class
        self.name = f"{owner.__name__}.apply" if isinstance(owner, type) else getattr(func, "__name__", repr(func))
        # optree's PyTree is a class to type checkers, so no plain tuple matches it (a stub limit)
        self.leaves, self.spec = optree.tree_flatten((args, kwargs), none_is_leaf=True)  # pyright: ignore[reportArgumentType]
        self.positions = [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)]
        self.out_leaves: list[Any] = []
        self.out_spec: Any = None
        self.out_positions: list[int] = []  # tensor outputs, in the order the Function returns them
        self.float_out: list[int] = []  # indices into the tensor outputs that carry tangents

    def run(self, tensors) -> tuple:
        leaves = list(self.leaves)
        for pos, t in zip(self.positions, tensors, strict=True):
            leaves[pos] = t
        args, kwargs = optree.tree_unflatten(self.spec, leaves)
        out_leaves, self.out_spec = optree.tree_flatten(self.func(*args, **kwargs), none_is_leaf=True)
        self.out_leaves = out_leaves
        self.out_positions = [i for i, o in enumerate(out_leaves) if isinstance(o, torch.Tensor)]
        outs = tuple(out_leaves[i] for i in self.out_positions)
        self.float_out = [j for j, o in enumerate(outs) if o.is_floating_point() or o.is_complex()]
        return outs

    def restricted(self, tensors, which: list[int]) -> Callable[..., tuple]:
        """The float outputs as a function of the tensors at ``which`` only (the rest held fixed)."""

        def f(*xs):
            full = list(tensors)
            for i, x in zip(which, xs, strict=True):
                full[i] = x
            outs = self.run(full)
            return tuple(outs[j] for j in self.float_out)

        return f


def _fail(call: _Call, why: str, error: BaseException | None = None) -> NoForwardRuleError:
    said = f"\nPyTorch said: {str(error).strip().splitlines()[0]}" if error is not None else ""
    return NoForwardRuleError(
        f"{call.name} has no forward-mode (jvp) rule, and its backward is not differentiable ({why}), so its "
        f"forward tangent cannot be computed by differentiating the backward (double vjp); with at most "
        f"{JACOBIAN_ROWS_LIMIT} output scalars the Jacobian's rows would be used instead. Run this op in reverse "
        f"mode.{said}"
    )


def _output_tangents(call: _Call, primals: tuple, tangents: tuple) -> tuple:
    """``J u`` for the float outputs, ``u`` the given tangents (None: no tangent for that input)."""
    which = [i for i, t in enumerate(tangents) if t is not None and primals[i].is_floating_point()]
    f = call.restricted(primals, which)
    try:
        ys, vjp_fn = vjp(f, *(primals[i] for i in which))  # pyright: ignore[reportAssignmentType]  (vjp's annotation includes has_aux's 3-tuple)
    except (RuntimeError, NotImplementedError) as error:  # e.g. a custom op whose autograd torch.func refuses
        raise _fail(call, "its backward cannot run under torch.func", error) from error
    us = tuple(tangents[i] for i in which)
    if not which:
        return tuple(torch.zeros_like(y) for y in ys)

    def transposed(*w):
        gs = vjp_fn(w)
        for g in gs:
            # vjp_fn is linear in w: an output that does not depend on w must be zero (an input the op
            # ignores, a zero derivative). A nonzero one means the backward detached its result or was
            # once_differentiable (whose error node has no edge to w, so autograd would return zeros).
            cut = not g.requires_grad or g.grad_fn is None or g.grad_fn.name() == "torch::autograd::Error"
            if cut and _surely_nonzero(g):
                raise _fail(call, "its result does not depend on the output gradient through autograd")
        return gs

    m = sum(y.numel() for y in ys)
    if m == 0:  # empty outputs (e.g. pdist of one row): nothing to differentiate
        return tuple(torch.zeros_like(y) for y in ys)
    try:
        # Any point w works since the map is linear; ones, not zeros, so the check above can see a
        # detached backward, and not random, so vmap(randomness="error") is fine.
        _, vjp_vjp = vjp(transposed, *(torch.ones_like(y) for y in ys))  # pyright: ignore[reportAssignmentType]  (vjp's annotation includes has_aux's 3-tuple)
        with warnings.catch_warnings():
            # Some double-backward ops lack batching rules (grid_sample's uses addcmul_): vmap loops
            # over the tangents for that op alone and warns; that is ours to know, not the user's.
            warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
            return vjp_vjp(us)
    except (RuntimeError, NotImplementedError) as error:  # the backward could not be differentiated
        first = error
    if m <= JACOBIAN_ROWS_LIMIT:
        try:  # first derivatives only, and the backward's values are right even when detached
            return _by_jacobian_rows(ys, vjp_fn, us)
        except (RuntimeError, NotImplementedError) as error:
            raise _fail(
                call, "differentiating it failed, and so did calling it once per output scalar", first
            ) from error
    if isinstance(first, NoForwardRuleError):
        raise first
    raise _fail(call, "differentiating it failed", first) from first


def _surely_nonzero(g: torch.Tensor) -> bool:
    try:
        return bool(g.ne(0).any())
    except RuntimeError:  # batched by an outer vmap: data-dependent control flow is refused; skip
        return False


def _by_jacobian_rows(ys: tuple, vjp_fn: Callable, us: tuple) -> tuple:
    """``J u`` from ``J`` itself: its rows ``J^T e_i``, one vjp per output scalar.

    A loop, not vmap over the basis: the batching rules of such backward ops are not to be trusted
    (torch 2.13: vmap over the cotangent of ``_cdist_backward``, hence ``jacrev(torch.cdist)`` on
    inputs with <= 25 rows, repeats the first row). The rows are unbatched even under a vmap over
    tangents; only the final contraction with ``u`` is batched.
    """
    m = sum(y.numel() for y in ys)
    basis = torch.eye(m, dtype=torch.float64, device=ys[0].device).split([y.numel() for y in ys], dim=1)
    cotangents = [e.reshape(m, *y.shape).to(y.dtype) for e, y in zip(basis, ys, strict=True)]
    rows = [vjp_fn(tuple(c[r] for c in cotangents)) for r in range(m)]
    flat = cast(torch.Tensor, sum(  # (a tensor: the caller passes at least one tangent)
        torch.stack([row[i] for row in rows]).reshape(m, -1).to(u.dtype) @ u.reshape(-1) for i, u in enumerate(us)
    ))
    return tuple(part.reshape(y.shape) for part, y in zip(flat.split([y.numel() for y in ys]), ys, strict=True))


class _DoubleVjp(torch.autograd.Function):
    # forward, jvp and backward are plain torch code, so functorch may vmap them by running them on
    # BatchedTensors; the jvp is then one batched double vjp for the whole batch of tangents.
    generate_vmap_rule = True

    @staticmethod
    def forward(call: _Call, *tensors: torch.Tensor) -> tuple:
        outs = call.run(tensors)
        # An output that *is* an input would be taken for an in-place result; return a copy instead.
        return tuple(o.clone() if any(o is t for t in tensors) else o for o in outs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.call = inputs[0]
        ctx.save_for_forward(*inputs[1:])
        ctx.save_for_backward(*inputs[1:])
        ctx.mark_non_differentiable(*(o for j, o in enumerate(output) if j not in ctx.call.float_out))

    @staticmethod
    def jvp(ctx: Any, _call_tangent: None, *tangents: torch.Tensor | None) -> tuple:
        call: _Call = ctx.call
        # ctx holds the primals as the jvp level saw them: dual tensors. Drop their tangents (a view,
        # reverse-mode history kept), else a custom Function inside ``func`` would be asked for its
        # missing jvp when the vjps below re-run it (functorch re-enables forward AD for Functions).
        primals = tuple(unpack_dual(x).primal for x in ctx.saved_tensors)
        out_tangents = iter(_output_tangents(call, primals, tangents))
        return tuple(next(out_tangents) if j in call.float_out else None for j in range(len(call.out_positions)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        call: _Call = ctx.call
        primals = tuple(ctx.saved_tensors)
        which = [i for i, x in enumerate(primals) if ctx.needs_input_grad[i + 1] and x.is_floating_point()]
        result: list[torch.Tensor | None] = [None] * (len(primals) + 1)
        if not which:
            return tuple(result)
        ys, vjp_fn = vjp(  # pyright: ignore[reportAssignmentType]  (vjp's annotation includes has_aux's 3-tuple)
            call.restricted(primals, which), *(primals[i] for i in which))
        cot = tuple(
            torch.zeros_like(y) if grads[j] is None else grads[j] for j, y in zip(call.float_out, ys, strict=True)
        )
        for i, g in zip(which, vjp_fn(cot), strict=True):
            result[i + 1] = g
        return tuple(result)


def jvp_by_double_vjp(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)``, whose forward-mode tangent is computed by differentiating its vjp.

    ``args``/``kwargs`` are pytrees; their tensor leaves are the inputs (integer ones get no tangent),
    the rest is held fixed. ``func`` must be a pure function of them. Outside forward mode this costs
    one extra Python layer; under ``torch.func.jvp`` (batched or not) one recomputation of ``func``, its
    vjp, and one (batched) vjp of that vjp.
    """
    call = _Call(func, args, kwargs)
    outs = _DoubleVjp.apply(call, *(call.leaves[i] for i in call.positions))
    leaves = list(call.out_leaves)
    for pos, t in zip(call.out_positions, outs, strict=True):
        leaves[pos] = t
    return optree.tree_unflatten(call.out_spec, leaves)


def has_jvp(fn_cls: type) -> bool:
    """Whether a custom autograd.Function defines its own forward-mode rule."""
    return getattr(fn_cls.jvp, "__func__", fn_cls.jvp) is not torch.autograd.function._SingleLevelFunction.jvp


def function_with_fallback(fn_cls: type[torch.autograd.Function]) -> Callable[..., Any]:
    """An ``apply`` for a custom autograd.Function that has no ``jvp``: its tangent from its ``backward``.

    Needs ``setup_context`` (functorch refuses Functions without it) and torch-only code in forward and
    backward. A Function with neither ``vmap`` nor ``generate_vmap_rule`` is given a subclass with
    ``generate_vmap_rule = True`` (vmap over the tangents reaches its forward); one that has its own
    ``jvp`` is returned unchanged.
    """
    if has_jvp(fn_cls):
        return fn_cls.apply
    target = fn_cls
    overrides_vmap = fn_cls.vmap is not torch.autograd.Function.vmap
    if not fn_cls.generate_vmap_rule and not overrides_vmap:
        target = type(fn_cls.__name__, (fn_cls,), {"generate_vmap_rule": True})

    def apply(*args: Any, **kwargs: Any) -> Any:
        return jvp_by_double_vjp(target.apply, *args, **kwargs)

    apply.__qualname__ = apply.__name__ = f"{fn_cls.__name__}.apply"
    return apply
