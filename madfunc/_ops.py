"""The op seam: what happens when an op runs inside a forward segment's tangent pass.

One ``TorchFunctionMode`` (``OpRules``) sees every torch function a segment's body calls. It
1. runs an op by its rule in ``RULES`` if it has one (a user's ``register_forward_rule``, or ours for
   ops whose forward rule in PyTorch is wrong: it disagrees with the op's backward rule, or yields no
   tangent at all); an op (or custom ``autograd.Function``) without a forward rule takes the double-vjp
   fallback (``_fallback``): its tangent from its backward rule, differentiated once more. Only an op
   whose backward is not differentiable either raises ``ForwardModeError``, naming segment and op;
2. records which watched tensors (the segment's differentiated inputs) an op actually reads, so that
   ``Random`` gives an exact zero, not noise, to inputs the segment never uses.

Kernels without forward rules that have a reference implementation are switched off around the body
instead (``reference_kernels``): attention uses PyTorch's math kernel, RNNs the native kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._checks import ForwardModeError, missing_forward_rule
from ._fallback import NoForwardRuleError, function_with_fallback, has_jvp, jvp_by_double_vjp

try:  # what SomeFunction.apply(...) becomes under a functorch transform (a HigherOrderOperator)
    from torch._functorch.autograd_function import custom_function_call as _CUSTOM_FUNCTION_CALL
except ImportError:  # pragma: no cover - other PyTorch versions: custom Functions go their own way
    _CUSTOM_FUNCTION_CALL = object()

__all__ = ["OpRules", "RULES", "reference_kernels", "register_forward_rule"]

# Tensor queries that read metadata only: a tensor passed to them is not "used" by the segment.
_METADATA = frozenset(
    (getattr(torch.Tensor, name).__get__ if hasattr(getattr(torch.Tensor, name), "__get__")
     and not callable(getattr(torch.Tensor, name)) else getattr(torch.Tensor, name))
    for name in ("size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "element_size",
                 "data_ptr", "__len__", "shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout",
                 "is_complex", "storage_offset")
)


def _double_vjp(mode: OpRules, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The fallback: the op's forward tangent from its backward rule, differentiated once more."""
    mode.fallbacks.add(name)
    try:
        return jvp_by_double_vjp(func, *args, **kwargs)
    except NoForwardRuleError as error:
        raise ForwardModeError(
            f"segment {mode.segment!r} runs in forward mode, but op {name!r} inside it cannot run in forward mode "
            f"(PyTorch {torch.__version__}): {error} Mark the part that uses it rev() (or give segment "
            f"{mode.segment!r} Reverse() in the plan), or give madfunc a rule with madfunc.register_forward_rule."
        ) from error


def _scatter_reduce(mode: OpRules, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # PyTorch's forward rule for reduce="prod" yields no tangent at all (a silent zero); the others are right.
    reduce = kwargs.get("reduce", args[3] if len(args) > 3 else None)
    if reduce == "prod":
        return _double_vjp(mode, f"{name}(reduce='prod')", func, args, kwargs)
    return func(*args, **kwargs)


def _native_rnn(mode: OpRules, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # The oneDNN RNN kernel (mkldnn_rnn_layer, float32 on CPU) has no forward rule; the native one does.
    # Switched off for this op alone: oneDNN convolutions elsewhere in the segment keep their speed.
    # (torch.backends.mkldnn.flags() would also touch the TF32 setting, which warns on CPU builds.)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return func(*args, **kwargs)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


# op (torch function, or custom autograd.Function class) -> rule(mode, op name, func, args, kwargs).
# Found by the op_db sweep (tests/test_opdb_sweep.py): max_unpool's forward rule disagrees with its
# backward where pooled indices repeat; scatter_reduce(prod)'s yields no tangent.
RULES: dict[Any, Callable[..., Any]] = {
    torch.scatter_reduce: _scatter_reduce,
    torch.Tensor.scatter_reduce: _scatter_reduce,
    F.max_unpool1d: _double_vjp,
    F.max_unpool2d: _double_vjp,
    F.max_unpool3d: _double_vjp,
    torch.lstm: _native_rnn,
    torch.gru: _native_rnn,
    torch.rnn_tanh: _native_rnn,
    torch.rnn_relu: _native_rnn,
}


def register_forward_rule(op: Any, rule: Callable[..., Any] | None = None) -> None:
    """Tell forward segments how to run ``op``: with ``rule`` instead, or by the double-vjp fallback.

    Inside a forward segment, a call of ``op`` (a torch function such as ``torch.cdist``, or a custom
    ``torch.autograd.Function`` subclass, whose ``apply`` is then replaced) runs ``rule(*args, **kwargs)``
    instead: an implementation of the same function from ops that have forward-mode rules (a
    decomposition). With ``rule=None``, the op's forward tangent is computed from its backward rule,
    differentiated once more (the double-vjp fallback, about 2-3x the cost of the op's backward). Ops
    without a forward rule in PyTorch take that fallback anyway; register a rule when a cheaper or more
    accurate one exists, or to route an op whose forward rule you do not trust. Outside forward segments
    ``op`` is unchanged.

    Args:
        op: a torch function (as called, e.g. ``torch.cdist`` or ``torch.nn.functional.grid_sample``) or a
            ``torch.autograd.Function`` subclass.
        rule: a function with ``op``'s signature, or ``None`` for the double-vjp fallback. Default: ``None``.

    Examples:
        >>> import torch, madfunc as mf
        >>> def cdist_rule(x, y, p=2.0, **kwargs):       # differentiable ops only: forward mode works
        ...     return (x[:, None] - y[None]).pow(2).sum(-1).clamp_min(1e-30).sqrt()
        >>> mf.register_forward_rule(torch.cdist, cdist_rule)
        >>> seg = mf.fwd(lambda x, y: torch.cdist(x, y), name="dist")
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        >>> g = mf.mixed_grad(lambda x: seg(x, y).sum())(x)
        >>> torch.allclose(g, torch.func.grad(lambda x: torch.cdist(x, y).sum())(x))
        True
        >>> mf.register_forward_rule(torch.cdist)            # back to the fallback
    """
    if rule is not None and not callable(rule):
        raise TypeError(f"register_forward_rule(op, rule): rule must be callable or None, got {type(rule).__name__}.")
    if not callable(op):
        raise TypeError(f"register_forward_rule(op, rule): op must be a torch function or an autograd.Function "
                        f"subclass, got {type(op).__name__} {op!r:.60}.")
    if rule is None:
        RULES[op] = _double_vjp
    else:
        RULES[op] = lambda mode, name, func, args, kwargs: rule(*args, **kwargs)


class OpRules(TorchFunctionMode):
    """Active around a forward segment's body in every tangent pass; see the module docstring."""

    def __init__(self, segment: str, watched: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.segment = segment
        self.watched = {id(t): i for i, t in enumerate(watched)}
        self.used: set[int] = set()
        self.fallbacks: set[str] = set()  # ops that ran by the double-vjp fallback (inspect lists them)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.watched and func not in _METADATA:
            self._record(args)
            self._record(kwargs.values())
        if func is _CUSTOM_FUNCTION_CALL:  # SomeFunction.apply(...) under a functorch transform
            return self._custom_function(args[0], args[1:], kwargs)
        rule = RULES.get(func)
        name = getattr(func, "__name__", str(func))
        if rule is not None:
            return rule(self, name, func, args, kwargs)
        try:
            return func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as error:
            # No forward rule (found when the op ran, before it had an effect): take the fallback.
            # An in-place op may already have written to its operand, so it is not re-run.
            if isinstance(error, ForwardModeError) or missing_forward_rule(str(error)) is None or name.endswith("_"):
                raise
        return _double_vjp(self, name, func, args, kwargs)

    def _custom_function(self, cls: type, args: tuple, kwargs: dict) -> Any:
        rule = RULES.get(cls)
        if rule is not None:
            return rule(self, cls.__name__, cls.apply, args, kwargs)
        if has_jvp(cls):
            return _CUSTOM_FUNCTION_CALL(cls, *args, **kwargs)
        self.fallbacks.add(f"{cls.__name__}.apply")
        try:
            return function_with_fallback(cls)(*args, **kwargs)
        except NoForwardRuleError as error:
            raise ForwardModeError(
                f"segment {self.segment!r} runs in forward mode, but the custom autograd.Function {cls.__name__} "
                f"inside it has no jvp staticmethod, and {error} Give it a jvp (with setup_context and "
                f"generate_vmap_rule = True), or mark the part that uses it rev()."
            ) from error

    def _record(self, values: Any) -> None:
        for value in values:
            if isinstance(value, torch.Tensor):
                index = self.watched.get(id(value))
                if index is not None:
                    self.used.add(index)
            elif isinstance(value, (list, tuple)):  # torch.cat([...]), torch.stack((...))
                self._record(value)


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Inside forward segments, use kernels that have forward-mode rules.

    Scaled-dot-product attention falls back to PyTorch's math kernel (the CPU flash kernel has no jvp
    rule); nn.MultiheadAttention / TransformerEncoderLayer leave their fused "fast path"
    (``_transformer_encoder_layer_fwd`` has no jvp rule). (RNNs: see ``_native_rnn``.)
    """
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        except ImportError:  # pragma: no cover - PyTorch < 2.3
            pass
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "set_fastpath_enabled"):
            previous = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, previous)
        yield
