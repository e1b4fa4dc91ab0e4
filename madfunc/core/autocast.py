"""``torch.autocast`` inside forward segments: each op cast once, where the body calls it, as in a plain call.

Autocast casts an op's floating inputs where the op is called (to the autocast dtype for matmul-like ops,
to float32 for the precision-sensitive ones), then runs the op with autocast *off*: the ops a composite op
is made of, and the op's forward-mode rule, see no autocast. Scaled-dot-product attention's math kernel
relies on that: on CPU it upcasts bf16/fp16 inputs and computes scores, softmax and the weighted sum in
float32. Under torch.func's transforms (a segment's passes run its body under ``vmap(jvp(...))``) autocast
is applied again to every op *inside* a composite op (functorch's dynamic layers restore the dispatch keys
that were active where the outer op was called), so there the math kernel's float32 matmuls ran in the
autocast dtype, and ``pinverse``'s and ``cdist``'s float32 internals too. (Plain ``torch.autograd.forward_ad``
does not do this: it is functorch's doing.)

Measured on a 2-layer OPT decoder, each layer an ``Exact`` segment, 20 random models, against float64: the
segment's attention in the autocast dtype made its output differ from the plain call's in the last bits,
which moves ReLU pre-activations that sit within one rounding of zero to the other side; each such flip
costs some gradient entries an O(1) relative error, and the worst relative error per tensor was up to 7.6x
backprop's under bf16 (median 1.0x), all parameters together up to 3.0x (bf16) and 6.4x (fp16). Casting
attention once (float32 inside) brought bf16's worst case to 4.5x; its value from the plain kernel, to 1.06x.
The other cause was madfunc's own arithmetic running inside the caller's autocast block (``no_autocast``
below). The basis and random tangents are in the leaf's dtype and the output tangents in the output's: not
a cause.

So inside a segment's passes, under autocast, ``AutocastOnce`` runs the functions in ``_POLICIES`` as the
plain call does: their floating inputs cast per the op's autocast policy (through ordinary torch calls, so
that the op seam and lazy seeding below it still see the inputs themselves), then the op with autocast off.
Scaled-dot-product attention (without dropout) also takes its *value* from the kernel the plain call would
run (the flash kernel on CPU), and only its tangents from the math kernel (``y_plain + (y - y.detach())``:
exactly ``y_plain``, with ``y``'s tangents), so that the segment computes the plain call's output bit for bit
and its ReLUs switch where backprop's do. A policy applies only where the op has an autocast kernel for the
device (PyTorch's lists differ between CPU and CUDA), read from the dispatcher. Without autocast nothing here
runs: the float32 path is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from madfunc.core.registry import REGISTRY

__all__ = ["AutocastOnce", "autocast_once", "enabled_devices", "no_autocast", "without_autocast"]

_DEVICES = ("cpu", "cuda")  # (others: their autocast is left as it is)

try:  # PyTorch >= 2.4: one API for every device
    torch.is_autocast_enabled("cpu")
    _is_on, _set, _dtype = torch.is_autocast_enabled, torch.set_autocast_enabled, torch.get_autocast_dtype
except TypeError:  # pragma: no cover - PyTorch 2.3: CPU and CUDA apart

    def _is_on_apart(device: str) -> bool:
        return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()

    def _set_apart(device: str, enabled: bool) -> None:
        (torch.set_autocast_cpu_enabled if device == "cpu" else torch.set_autocast_enabled)(enabled)

    def _dtype_apart(device: str) -> torch.dtype:
        return torch.get_autocast_cpu_dtype() if device == "cpu" else torch.get_autocast_gpu_dtype()

    _is_on, _set, _dtype = _is_on_apart, _set_apart, _dtype_apart


def enabled_devices() -> tuple[str, ...]:
    """The devices (of CPU and CUDA) whose autocast is on."""
    return tuple(d for d in _DEVICES if _is_on(d))


_HAS_POLICY: dict[tuple[str, str], bool] = REGISTRY.register(
    "autocast.policies", dict, "whether an op has an autocast policy, by op and device")


def _has_policy(op: str, device: str) -> bool:
    """Whether autocast has a kernel (a policy) for aten ``op`` on ``device`` (else it passes the op through)."""
    key = (op, device)
    found = _HAS_POLICY.get(key)
    if found is None:
        try:
            found = torch._C._dispatch_has_kernel_for_dispatch_key(op, f"Autocast{device.upper()}")
        except RuntimeError:  # an op or key this PyTorch does not know
            found = False
        _HAS_POLICY[key] = found
    return found


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _cast(value: Any, dtype: torch.dtype, device: str) -> Any:
    """``value`` as autocast casts an op's argument (ATen's ``cached_cast``): floating tensors on ``device``,
    except float64 ones, to ``dtype``. Through ``Tensor.to``, a torch call the modes below this one see."""
    if (
        isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype
        and value.dtype != torch.float64 and value.device.type == device
    ):
        return value.to(dtype)
    return value


@contextlib.contextmanager
def _off(device: str) -> Iterator[None]:
    _set(device, False)
    try:
        yield
    finally:
        _set(device, True)


def _policy(target: str) -> Callable[..., Any]:
    """The rule of an op whose autocast policy casts to ``target`` ("lower": the autocast dtype; "fp32")."""

    def rule(mode: AutocastOnce, device: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        dtype = _dtype(device) if target == "lower" else torch.float32
        args = tuple(_cast(a, dtype, device) for a in args)
        kwargs = {k: _cast(v, dtype, device) for k, v in kwargs.items()}
        with _off(device):
            return func(*args, **kwargs)

    return rule


_fp32 = _policy("fp32")
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _attention(mode: AutocastOnce, device: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Scaled-dot-product attention: cast once; its value from the plain call's kernel, its tangents from the
    math kernel (see the module docstring)."""
    dtype = _dtype(device)
    args = tuple(_cast(a, dtype, device) for a in args)
    kwargs = {k: _cast(v, dtype, device) for k, v in kwargs.items()}
    with _off(device):
        out = func(*args, **kwargs)  # the math kernel (reference_kernels): float32 inside, on CPU
        named = dict(zip(_SDPA_NAMES, args, strict=False)) | {k: v for k, v in kwargs.items() if k in _SDPA_NAMES}
        dropout = named.get("dropout_p", 0.0)
        if mode.backends is None or not isinstance(out, torch.Tensor) or (
            not isinstance(dropout, (int, float)) or dropout != 0  # the plain kernel would draw its own numbers
        ):
            return out
        try:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(mode.backends):
                plain = func(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                             **{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        except (RuntimeError, NotImplementedError):  # (e.g. under a vmap of the caller's): the math kernel's value
            return out
        if not isinstance(plain, torch.Tensor) or plain.shape != out.shape or plain.dtype != out.dtype:
            return out
        return plain + (out - out.detach())


def _python_body(mode: AutocastOnce, device: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """A torch function written in Python that calls others (``F.multi_head_attention_forward`` calls
    scaled-dot-product attention): its body runs under this mode, which then sees those calls (a mode is
    paused while it handles a call)."""
    namespace = dict(func.__globals__)
    namespace["has_torch_function"] = lambda *a: False
    body = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    body.__kwdefaults__ = func.__kwdefaults__
    with mode:
        return body(*args, **kwargs)


# Torch functions (as the body calls them) -> (aten op whose autocast policy they follow, rule). Those whose
# plain-autocast value or tangents differ under torch.func's transforms (composite ops with float32 or
# matmul internals); ops autocast passes through, or whose kernels are single ATen kernels, need nothing.
_POLICIES: dict[Any, tuple[str, Callable[..., Any]]] = {
    F.scaled_dot_product_attention: ("aten::scaled_dot_product_attention", _attention),
    torch.cdist: ("aten::cdist", _fp32),
    torch.pinverse: ("aten::pinverse", _fp32),
    torch.Tensor.pinverse: ("aten::pinverse", _fp32),
    F.multi_head_attention_forward: ("", _python_body),
}


class AutocastOnce(TorchFunctionMode):
    """Active around a forward segment's body while autocast is on: see the module docstring."""

    def __init__(self, devices: tuple[str, ...]) -> None:
        super().__init__()
        self.devices = devices
        try:  # the scaled-dot-product backends the caller allows (the segment's body runs the math kernel)
            from torch.nn.attention import _cur_sdpa_kernel_backends

            self.backends = _cur_sdpa_kernel_backends() or None
        except ImportError:  # pragma: no cover - other PyTorch versions: the math kernel's value
            self.backends = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if kwargs is None:
            kwargs = {}
        entry = _POLICIES.get(func)
        if entry is not None:
            first = _first_tensor(args, kwargs)
            device = None if first is None else first.device.type
            op, rule = entry
            if device in self.devices and _is_on(device) and (not op or _has_policy(op, device)):
                return rule(self, device, func, args, kwargs)
        return func(*args, **kwargs)


def autocast_once() -> contextlib.AbstractContextManager:
    """``AutocastOnce`` if autocast is on for a device (else nothing: the float32 path is unchanged)."""
    devices = enabled_devices()
    return AutocastOnce(devices) if devices else contextlib.nullcontext()


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Autocast off for madfunc's own arithmetic on tangents: contractions ``<ydot_j, ybar>``, combines
    ``sum_j s_j v_j``, projections. Backward often runs inside the caller's autocast block, where their
    matmuls ran in the autocast dtype although their operands were float32 (``_contract.accumulation_dtype``):
    in float16 the contraction alone had 4x the error of a float64 contraction of the same output tangents (one
    OPT decoder layer, input gradient: 4e-4 against 1e-4; backprop's 1e-4). Now they accumulate in float32, or in
    the tensors' own dtype when that is wider."""
    on = enabled_devices()
    if not on:
        yield
        return
    for device in on:
        _set(device, False)
    try:
        yield
    finally:
        for device in on:
            _set(device, True)


def without_autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run under ``no_autocast``; without autocast, one check per call (the float32 path)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not enabled_devices():
            return fn(*args, **kwargs)
        with no_autocast():
            return fn(*args, **kwargs)

    return wrapper
