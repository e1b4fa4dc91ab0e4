"""The op seam: what happens when an op runs inside a forward segment's tangent pass.

One ``TorchFunctionMode`` (``OpRules``) sees every torch function a segment's body calls. It
1. runs an op by its rule in ``RULES`` if it has one (a user's ``register_forward_rule``, or ours for
   ops whose forward rule in PyTorch is wrong: it disagrees with the op's backward rule, or yields no
   tangent at all; a rule may answer ``NATIVE`` for the calls it need not change); an op (or custom
   ``autograd.Function``) without a forward rule takes the double-vjp fallback (``_fallback``): its tangent
   from its backward rule, differentiated once more. Only an op whose backward is not differentiable either
   raises ``ForwardModeError``, naming segment and op;
2. records which watched tensors (the segment's differentiated inputs) an op actually reads, so that
   ``Random`` gives an exact zero, not noise, to inputs the segment never uses.

Kernels without forward rules that have a reference implementation are switched off around the body
instead (``reference_kernels``): attention uses PyTorch's math kernel, RNNs the native kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch.autograd.forward_ad import unpack_dual
from torch.overrides import TorchFunctionMode

from madfunc.core.autocast import autocast_once
from madfunc.core.checks import ForwardModeError, missing_forward_rule, writes_first_operand
from madfunc.core.functorch import CUSTOM_FUNCTION_CALL, METADATA_OPS, is_wrapped, unwrap
from madfunc.core.registry import REGISTRY
from madfunc.ops.dropout import RNG_RULES
from madfunc.ops.embedding import EMBEDDING_RULES
from madfunc.ops.fallback import NoForwardRuleError, function_with_fallback, has_jvp, jvp_by_double_vjp
from madfunc.ops.kinks import KINK_RULES, NATIVE
from madfunc.ops.scalars import scalar_form


def has_tangent(t: torch.Tensor) -> bool:
    return unpack_dual(t).tangent is not None


__all__ = ["OpFailed", "OpRules", "RULES", "reference_kernels", "register_forward_rule"]

def _double_vjp(mode: OpRules, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The fallback: the op's forward tangent from its backward rule, differentiated once more."""
    mode.fallbacks.add(name)
    try:
        return jvp_by_double_vjp(func, *args, **kwargs)
    except (NoForwardRuleError, RuntimeError, NotImplementedError) as error:
        if isinstance(error, ForwardModeError):
            raise
        raise ForwardModeError(
            f"segment {mode.segment!r} runs in forward mode, but op {name!r} inside it cannot run in forward mode "
            f"(PyTorch {torch.__version__}): {error} Mark the part that uses it rev() (or give segment "
            f"{mode.segment!r} Reverse() in the plan), or give madfunc a rule with madfunc.register_forward_rule."
        ) from error


def _checked(mode: OpRules, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The rule of an op once found dropping tangents (OpRules(strict=True)): it may do so only for some
    arguments (linear_cross_entropy's chunked path), so each call runs natively first and takes the
    fallback only if its outputs came without tangents although an input had one (~12 us per check)."""
    out = func(*args, **kwargs)
    return _double_vjp(mode, name, func, args, kwargs) if _drops_tangent(args, kwargs, out) else out


def _scatter_reduce(mode: OpRules, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # PyTorch's forward rule for reduce="prod" yields no tangent at all (a silent zero); the others are right.
    reduce = kwargs.get("reduce", args[4] if len(args) > 4 else None)  # (input, dim, index, src, reduce)
    if reduce == "prod":
        return _double_vjp(mode, f"{name}(reduce='prod')", func, args, kwargs)
    return func(*args, **kwargs)


def _cdist(mode: OpRules, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # cdist has no forward rule, and its usual backward (_cdist_backward) is not differentiable. For p = 2
    # the matrix-product kernel (_euclidean_dist) has a differentiable backward: the fallback works there.
    # p = 0 counts nonzero differences: piecewise constant, its derivative is zero (as cdist's backward).
    x1, x2, p = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("p", 2.0)
    if p == 0:  # the value without tangents, then a zero tangent (and zero gradient) from both inputs
        return func(x1.detach(), x2.detach(), *args[2:], **kwargs) + 0 * (x1.sum() + x2.sum())
    if p == 2:
        return _double_vjp(mode, name, func, (x1, x2, 2.0), {"compute_mode": "use_mm_for_euclid_dist"})
    return _double_vjp(mode, name, func, args, kwargs)


def _native_rnn(mode: OpRules, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # The oneDNN RNN kernel (mkldnn_rnn_layer, float32 on CPU) has no forward rule; the native one does.
    # cuDNN's reads its weights' storage, which functorch's wrappers have none of: off too, on CUDA. Switched
    # off for this op alone: convolutions elsewhere in the segment keep their kernels. (The backends' flags()
    # context managers would also touch the TF32 setting, which warns on CPU builds.)
    mkldnn, cudnn = torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    torch._C._set_cudnn_enabled(False)
    try:
        return func(*args, **kwargs)
    except (NotImplementedError, RuntimeError) as error:
        # CUDA's native cells (_thnn_fused_lstm_cell, ...) have no forward rule: their double backward has.
        if missing_forward_rule(str(error)) is None:
            raise
        return _double_vjp(mode, name, func, args, kwargs)
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
        torch._C._set_cudnn_enabled(cudnn)


def _storage_pointer(mode: OpRules, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # torch raises for data_ptr() of functorch's wrappers (no storage of their own); the plain tensor under
    # them holds the values. nn.LSTM/GRU/RNN.flatten_parameters reads it on CUDA before each call.
    return func(unwrap(args[0]), *args[1:], **kwargs)


def _skip_flatten(mode: OpRules, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # flatten_parameters' copy of an RNN's weights into one cuDNN buffer (its result is unused): a speed-up for
    # cuDNN, which runs with cuDNN off here (_native_rnn), and impossible on wrapped weights. Not done.
    weights = args[0] if args else kwargs.get("weight_arr", ())
    if any(is_wrapped(w) for w in weights):
        return None
    return func(*args, **kwargs)


# op (torch function, or custom autograd.Function class) -> rule(mode, op name, func, args, kwargs).
# Found by the op_db sweep (tests/test_opdb_sweep.py): max_unpool's forward rule disagrees with its
# backward where pooled indices repeat; scatter_reduce(prod)'s yields no tangent or a wrong one.
RULES: dict[Any, Callable[..., Any]] = {
    torch.scatter_reduce: _scatter_reduce,
    torch.Tensor.scatter_reduce: _scatter_reduce,
    F.max_unpool1d: _double_vjp,
    F.max_unpool2d: _double_vjp,
    F.max_unpool3d: _double_vjp,
    # logcumsumexp's forward rule is exact in exact arithmetic but loses ~1e-7 relative to its backward
    # rule on inputs of magnitude 1e4 (found by the sweep): route it so that forward segments agree with
    # backprop to rounding.
    torch.logcumsumexp: _double_vjp,
    torch.Tensor.logcumsumexp: _double_vjp,
    torch.cdist: _cdist,
    torch.lstm: _native_rnn,
    torch.gru: _native_rnn,
    torch.rnn_tanh: _native_rnn,
    torch.rnn_relu: _native_rnn,
    torch.Tensor.data_ptr: _storage_pointer,
    torch._cudnn_rnn_flatten_weight: _skip_flatten,
    **EMBEDDING_RULES,  # the padding row and scale_grad_by_freq: backprop's conventions (ops/embedding.py)
    **KINK_RULES,  # prelu at 0, fmax and one-tensor-bound clamp at ties: backprop's side (ops/kinks.py)
    # det's forward rule gives 0 at a singular matrix, where the derivative is the (nonzero) adjugate
    # (found by the audit kept as tests/test_kinks.py); its backward is right there, so the fallback is too.
    torch.linalg.det: _double_vjp,
    torch.det: _double_vjp,
    torch.Tensor.det: _double_vjp,
}


# Ops found at run time to drop tangents (see OpRules._strict), routed to the checked fallback from then on.
# Kept apart from RULES (ours and the user's register_forward_rule): a reset (core.registry) forgets these only.
LEARNED: dict[Any, Callable[..., Any]] = REGISTRY.register(
    "ops.learned", dict, "ops found to drop tangents, routed to the fallback"
)


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


class OpFailed(RuntimeError):
    """An op failed inside a forward segment, by its own rule and by the fallback."""


class OpRules(TorchFunctionMode):
    """Active around a forward segment's body in every tangent pass; see the module docstring."""

    def __init__(self, segment: str, watched: Sequence[torch.Tensor] = (), strict: bool = False,
                 plain_rng: bool = False) -> None:
        super().__init__()
        self.segment = segment
        # The segment was called outside torch.func's transforms (use_plan): random ops whose plain kernel
        # draws in another order than under the transforms run as the plain kernel does (_dropout).
        self.plain_rng = plain_rng
        self.watched = {id(t): i for i, t in enumerate(watched)}
        self.used: set[int] = set()
        self.fallbacks: set[str] = set()  # ops that ran by the double-vjp fallback (inspect lists them)
        self.touched = False  # whether any call needed the seam (a rule, a fallback, a custom Function)
        # strict (a diagnosis, see _passes.check_tangents): also see nested calls, and route every top-level
        # op in whose subtree a tangent was dropped to the fallback; ``learned`` names them.
        self.strict = strict
        self.learned: set[str] = set()
        self._stack: list[Any] = []  # the functions being run, outermost first
        self._dropped = False
        self.calls = 0  # torch calls seen: the pass's size, which decides whether it is recorded (_replay)
        self.scalar_forms = 0  # calls run by their .Scalar overload (ops/scalars.py)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        # The hot path: every torch call of every pass comes through here, so it does as little as it can.
        if kwargs is None:
            kwargs = {}
        self.calls += 1
        if self.strict:
            return self._strict(func, args, kwargs)
        return self._run(func, args, kwargs)

    def _run(self, func, args: tuple, kwargs: dict) -> Any:  # noqa: ANN001
        if self.watched and func not in METADATA_OPS:
            self._record(args)
            self._record(kwargs.values())
        rule = RULES.get(func) or LEARNED.get(func)
        if rule is None and func in RNG_RULES:
            # Dropout whose own draw inside the passes is not the plain code's: drawn as that (_dropout). None:
            # it is (CPU under torch.func), and the op runs as any other, leaving later passes free to go bare.
            out = RNG_RULES[func](self, args, kwargs)
            if out is not None:
                self.touched = True
                return out
        if rule is not None:
            out = rule(self, _name(func), func, args, kwargs)
            if out is not NATIVE:  # (NATIVE: this call needs no rule; it runs below as any other)
                self.touched = True
                return out
        if func is CUSTOM_FUNCTION_CALL:  # SomeFunction.apply(...) under a functorch transform
            self.touched = True
            return self._custom_function(args[0], args[1:], kwargs)
        scalar = scalar_form(func, args, kwargs)
        if scalar is not None:
            self.scalar_forms += 1
            return scalar(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as error:
            self.touched = True
            name = _name(func)
            # The op cannot run in forward mode (no forward rule, or its forward-mode kernel fails where its
            # plain one works): take the fallback. An in-place op may already have written to its operand,
            # so it is not re-run; an error the fallback hits too is the op's own (a user error): re-raised.
            if isinstance(error, ForwardModeError) or _in_place(func, kwargs):
                raise
            if missing_forward_rule(str(error)) is not None:
                return _double_vjp(self, name, func, args, kwargs)
            try:
                out = _double_vjp(self, name, func, args, kwargs)
            except Exception:  # noqa: BLE001 - the original error says more
                raise OpFailed(
                    f"segment {self.segment!r}: op {name!r} failed inside the forward segment, and again when run by "
                    "the double-vjp fallback. If it runs in plain PyTorch, it cannot run under torch.func's "
                    "transforms (jvp, vmap): mark the part that uses it rev() (or give segment "
                    f"{self.segment!r} Reverse()).\nPyTorch said: {_first_line(error)}"
                ) from error
            return out

    def _strict(self, func, args: tuple, kwargs: dict) -> Any:  # noqa: ANN001
        ruled = func in RULES or func in LEARNED or func is CUSTOM_FUNCTION_CALL
        if (self._stack and self._stack[-1] == func) or ruled:
            # A Python-level function handing itself back to torch-function dispatch (as torch.cdist and
            # Tensor methods written in Python do), or an op with a rule of ours (trusted, and it may call
            # the op itself): run it without re-entering, or it would recurse forever.
            return self._run(func, args, kwargs)
        top = not self._stack
        if top:
            self._dropped = False
        self._stack.append(func)
        try:
            with self:  # re-enter: the calls inside func come back here too
                out = self._run(func, args, kwargs)
        finally:
            self._stack.pop()
        if getattr(func, "__name__", "") not in _DROPS_BY_DESIGN and _drops_tangent(args, kwargs, out):
            self._dropped = True
        if top and self._dropped and func not in RULES and func not in METADATA_OPS and not _in_place(func, kwargs):
            LEARNED[func] = _checked
            self.learned.add(getattr(func, "__name__", str(func)))
        return out

    def _custom_function(self, cls: type, args: tuple, kwargs: dict) -> Any:
        rule = RULES.get(cls)
        if rule is not None:
            return rule(self, cls.__name__, cls.apply, args, kwargs)
        if has_jvp(cls):
            # torch types HigherOrderOperator.__call__ with a ParamSpec that this operator leaves unbound
            return CUSTOM_FUNCTION_CALL(cls, *args, **kwargs)  # pyright: ignore[reportCallIssue]
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


# Functions whose outputs carry no tangent by definition: not evidence of a dropped tangent.
_DROPS_BY_DESIGN = frozenset(
    ("detach", "detach_", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
     "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "__get__")
)


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


def _in_place(func: Any, kwargs: dict) -> bool:
    """Whether ``func`` writes to an operand (it must never be re-run by the fallback)."""
    return writes_first_operand(func) or "out" in kwargs


def _drops_tangent(args: tuple, kwargs: dict, out: Any) -> bool:
    """Whether a floating output lacks a tangent although an input has one (at the current jvp level)."""
    outs = [
        o for o in optree.tree_leaves(out) if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())
    ]
    # All outputs: a multi-output op may leave some without tangents by design (native_batch_norm's saved
    # statistics); an op that drops the tangent of one output among several is not caught here.
    if not outs or any(has_tangent(o) for o in outs):
        return False
    # optree's PyTree is a class to type checkers, so no plain tuple matches it (a stub limit)
    inputs = optree.tree_leaves((args, kwargs), is_leaf=lambda x: isinstance(x, torch.Tensor))  # pyright: ignore[reportArgumentType]
    return any(isinstance(t, torch.Tensor) and has_tangent(t) for t in inputs)


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Inside forward segments, use kernels that have forward-mode rules.

    Scaled-dot-product attention falls back to PyTorch's math kernel (the CPU flash kernel has no jvp
    rule); nn.MultiheadAttention / TransformerEncoderLayer leave their fused "fast path"
    (``_transformer_encoder_layer_fwd`` has no jvp rule). (RNNs: see ``_native_rnn``.) Under autocast, each op
    is cast once, as in a plain call (``_autocast``; first: it reads the caller's attention backends).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(autocast_once())
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
