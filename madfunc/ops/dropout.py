"""Dropout in forward segments draws the mask the plain code draws from the same RNG state.

A segment's passes run its body under ``vmap(jvp(...), randomness="same")`` (the engine restores the RNG
states before each pass, so every pass starts where the plain call starts). Two ways the body's dropout
could still draw another mask than the plain code it wraps, so that its output and gradient silently
differ from the plain code's under the same seed:

1. Memory order. ATen's composite dropout (``_dropout_impl``: CPU; in-place and alpha dropout everywhere)
   fills ``empty_like(input).bernoulli_(1 - p)`` in the *memory order* of ``input``, while under torch.func's
   transforms the draw comes in *logical* (contiguous) order. On a non-contiguous activation (the output of
   ``nn.MultiheadAttention`` with ``batch_first=True``, so every ``TransformerEncoderLayer``) the masks
   differed. Called from plain autograd (``use_plan``), the segment draws the noise as the plain kernel
   does, on a plain tensor laid out as the plain call's ``empty_like(input)`` (``_noisy``: bit for bit the
   same, checked against ``F.dropout`` and ``F.alpha_dropout`` for contiguous, transposed, permuted, sliced,
   expanded and channels-last inputs, ``p`` in {0, 0.1, 0.5, 1}, in place or not). Under ``mixed_grad`` the
   plain code is itself run by torch.func (``torch.func.grad``), whose draws the segment's passes share.
2. The fused kernel. On CUDA (and XPU), ``F.dropout`` / ``torch.dropout`` with ``0 < p < 1`` run the fused
   Philox kernel ``native_dropout`` in the plain call *and* under ``torch.func.grad`` / ``jvp`` (neither has
   a batching rule to apply), but vmap's batching rule for ``native_dropout`` draws the mask with
   ``bernoulli_``, which maps the same generator state to other numbers: a different mask under both
   ``use_plan`` and ``mixed_grad`` (an O(1) error in the gradient). ``_fused`` runs the plain kernel on a
   tensor of ones laid out as the input, outside functorch, and multiplies. Scaled-dot-product attention
   with ``dropout_p > 0`` drops its attention weights inside one ATen call the op seam cannot look into;
   in float64 (no fused attention kernel takes float64, so the plain call runs the math kernel, which
   calls that same fused dropout) ``_attention`` runs the math kernel's steps with ``_fused`` as its
   dropout. ``F.multi_head_attention_forward`` calls both from Python, out of the seam's sight: its body
   runs under the seam (``_multi_head_attention``). All apply only where the plain code would run the
   kernel itself: not under a vmap of the caller's (its batching rule draws there, in the plain code and
   in the segment alike). Attention in other dtypes runs fused attention kernels with their own random
   numbers in the plain call, which a segment (forward mode: the math kernel) cannot reproduce.

The rules return ``None`` where the op's own draw already is the plain call's (CPU under ``mixed_grad``,
``p`` outside (0, 1), invalid arguments: torch's own checks raise): the op then runs as any other op.
"""

from __future__ import annotations

import math
import struct
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from madfunc.core.functorch import TransformType, interpreter_stack, plain_value, vmap_randomness_same

__all__ = ["RNG_RULES"]

_SELU_ALPHA = 1.7580993408473766  # -selu's negative saturation value, as alpha_dropout's kernel uses it
# Devices whose at::dropout takes the fused kernel (ATen's is_fused_kernel_acceptable); other accelerators
# keep their own draws (untested here).
_FUSED = frozenset(("cuda", "xpu"))
_COMPOSITE = frozenset(("cpu", *_FUSED))  # where _dropout_impl is known to be the plain call's code
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # not subclasses (fake tensors while tracing, DTensor)
# The fused kernel vectorizes on aligned memory and maps random numbers to elements differently on its
# vectorized and elementwise paths: the mask's tensor mirrors the input's address modulo this (the CUDA
# allocator's minimum alignment; the kernels need at most 16-32 bytes).
_ALIGNMENT = 256
_TT = TransformType


def _arguments(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list:
    """The call's arguments by position: ``args``, then ``kwargs`` or the defaults for the rest."""
    rest = zip(names[len(args) :], defaults[len(args) :], strict=True)
    return [*args, *(kwargs.get(name, default) for name, default in rest)]


def _probability(p: Any) -> float | None:
    """``p`` as a float if it is a valid probability, else None (torch's own check then raises)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0):
        return None
    return float(p)


def _noisy(input: torch.Tensor, p: float, train: bool, inplace: bool, alpha: bool) -> torch.Tensor:
    """ATen's composite dropout (``_dropout_impl``) with its noise drawn on a plain tensor in ``input``'s layout."""
    if not train or p == 0 or input.numel() == 0:
        return input
    if p == 1:
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return input.mul_(zero) if inplace else input * zero
    # empty_like of a plain tensor with input's strides: the layout rule of the plain call's empty_like(input)
    layout = torch.empty_strided(input.shape, input.stride(), dtype=input.dtype, device=input.device)
    noise = torch.empty_like(layout).bernoulli_(1 - p)
    if not alpha:
        noise.div_(1 - p)
        return input.mul_(noise) if inplace else input * noise
    a = 1.0 / math.sqrt((_SELU_ALPHA**2 * p + 1) * (1 - p))
    shift = noise.add(-1).mul_(_SELU_ALPHA * a).add_(_SELU_ALPHA * a * p)
    noise.mul_(a)
    return (input.mul_(noise) if inplace else input * noise).add_(shift)


def _kernels_as_plain(plain_call: bool) -> bool:
    """Whether the plain code, run where the segment was called, would run the device's own dropout kernel.

    Inside a pass the interpreter stack is the caller's transforms, then the segment's own (a ``vmap`` with
    ``randomness="same"`` and the ``jvp`` right inside it, or that ``jvp`` alone), then any the body runs.
    Any other vmap draws through its batching rule in the plain code too. (A caller's vmap(randomness="same")
    right around a one-tangent pass cannot be told from the segment's own: there the segment draws with the
    kernel, a valid mask but not the one the caller's vmap would draw.)
    """
    stack = interpreter_stack()
    vmaps = [i for i, level in enumerate(stack) if level.key() == _TT.Vmap]
    if not vmaps:
        return True
    if len(vmaps) > 1 or (plain_call and vmaps[0] != 0):  # a plain call's own vmap is the outermost level
        return False
    i = vmaps[0]
    same = vmap_randomness_same(stack[i])
    return same and i + 1 < len(stack) and stack[i + 1].key() == _TT.Jvp


def _plain(t: torch.Tensor) -> torch.Tensor | None:
    """The plain tensor under ``t``'s functorch wrappers (the value the plain call's kernel would read), or
    None where there is none to read (a batched value, a tensor subclass)."""
    p = plain_value(t)
    return p if p is not None and type(p) in _PLAIN_TYPES and p.layout == torch.strided else None


def _ones_like(plain: torch.Tensor) -> torch.Tensor:
    """Ones with ``plain``'s shape, strides and address modulo _ALIGNMENT (call with functorch disabled)."""
    offset = plain.data_ptr() % _ALIGNMENT // plain.element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(plain.shape, plain.stride(), strict=True))
    base = torch.ones(offset + extent, dtype=plain.dtype, device=plain.device)
    return base.as_strided(plain.shape, plain.stride(), offset)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _fused(input: torch.Tensor, p: float) -> torch.Tensor | None:
    """``F.dropout(input, p)`` with the mask the plain call's fused kernel draws (see the module docstring)."""
    plain = _plain(input)
    if plain is None:
        return None
    # Outside functorch: the device's kernel itself, not vmap's batching rule. It advances the generator as
    # the plain call does (its offset depends on the element count alone), once per pass; the engine
    # restores the RNG state before each pass.
    with torch._C._DisableFuncTorch():
        noise, mask = torch.native_dropout(_ones_like(plain), p, True)
    if input.dtype not in (torch.float16, torch.bfloat16):
        # The kernel's own 1 * mask * scale, rounded as it rounds x * mask * scale (in the input's dtype).
        return input * noise
    # Half precision: the kernel multiplies in float32 and rounds once; noise in half would round the scale.
    scale = _f32(1.0 / _f32(1.0 - p))  # the kernel's scale: float32(1.0 / float32(1 - p))
    return (input.float() * mask.to(torch.float32).mul_(scale)).to(input.dtype)


def _dropout_rule(names: tuple[str, ...], defaults: tuple, alpha: bool, inplace: bool | None) -> Callable[..., Any]:
    def rule(mode: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        values = _arguments(args, kwargs, names, defaults)
        input, p, train = values[0], _probability(values[1]), bool(values[2])
        in_place = bool(values[3] if inplace is None else inplace)
        if not isinstance(input, torch.Tensor) or not input.is_floating_point() or p is None:
            return None
        device = input.device.type
        fused = not alpha and not in_place and train and 0 < p < 1 and input.numel() > 0  # at::dropout's test
        if fused and device in _FUSED and _kernels_as_plain(mode.plain_rng):
            out = _fused(input, p)
            if out is not None:
                return out
        if mode.plain_rng and device in _COMPOSITE and not (fused and device in _FUSED):
            return _noisy(input, p, train, in_place, alpha)
        return None

    return rule


_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def _attention(mode: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention`` with dropout, in float64 on CUDA: see the module docstring."""
    q, k, v, attn_mask, p, is_causal, scale, gqa = _arguments(args, kwargs, _SDPA_NAMES, _SDPA_DEFAULTS)
    p = _probability(p)
    if (
        p is None or not 0 < p < 1 or not all(isinstance(t, torch.Tensor) for t in (q, k, v))
        or any(t.dtype != torch.float64 or t.device.type not in _FUSED or t.is_nested or t.dim() < 3 for t in (q, k, v))
        or (attn_mask is not None and not isinstance(attn_mask, torch.Tensor))
        or (scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))))
        or not _kernels_as_plain(mode.plain_rng)
    ):
        return None  # (invalid arguments: torch's own call raises its own error)
    return _math_attention(q, k, v, attn_mask, p, bool(is_causal), scale, bool(gqa))


def _math_attention(q, k, v, attn_mask, p: float, is_causal: bool, scale, gqa: bool) -> torch.Tensor | None:
    """ATen's math kernel (``_scaled_dot_product_attention_math``, what a plain float64 call on CUDA runs), with
    its dropout drawn by ``_fused``. (The kernel's own ``dropout_mask`` argument would do, but warns.)"""
    if is_causal:
        if attn_mask is not None:
            return None
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # True takes part: the others get -inf
        zero = torch.zeros((), dtype=q.dtype, device=attn_mask.device)
        attn_mask = torch.where(attn_mask.logical_not(), -math.inf, zero)
    if gqa and k.shape[-3] != q.shape[-3]:
        if k.shape[-3] == 0 or q.shape[-3] % k.shape[-3]:
            return None
        repeats = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeats, -3), v.repeat_interleave(repeats, -3)
    # The kernel scales query and key by sqrt(scale) each, before the product, for stability.
    negative = scale is not None and scale < 0
    root = math.sqrt(abs(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    attn = torch.matmul(q * (0.0 - root if negative else root), k.transpose(-2, -1) * root)
    if attn_mask is not None:
        attn = attn + attn_mask
    attn = _fused(_SOFTMAX(attn, -1), p)
    return None if attn is None else torch.matmul(attn, v)


# The math kernel's softmax: rows masked entirely give zeros, not NaN (torch >= 2.5; before, plain softmax).
_SOFTMAX = getattr(torch, "_safe_softmax", None) or torch.softmax


_MHA_NAMES = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
              "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training")
_MHA_DEFAULTS = (*(None,) * 13, True)


def _multi_head_attention(mode: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.multi_head_attention_forward`` with dropout on CUDA: its body, with the op seam seeing its calls.

    A TorchFunctionMode is paused while it handles a call, so the calls a Python-level torch function makes
    (this one's ``dropout`` and ``scaled_dot_product_attention``) would run past the rules above. Its body runs
    instead (its own code, with its torch-function check off) under the mode, which then sees each call.
    """
    values = _arguments(args[:14], kwargs, _MHA_NAMES, _MHA_DEFAULTS)
    query, p, training = values[0], _probability(values[10]), values[13]
    if (
        not isinstance(query, torch.Tensor) or query.device.type not in _FUSED or not training or not p
        or not _kernels_as_plain(mode.plain_rng)
    ):
        return None
    function = F.multi_head_attention_forward
    namespace = dict(function.__globals__)  # (a copy per call: functions patched meanwhile are seen)
    namespace["has_torch_function"] = lambda *args: False
    body = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                              function.__closure__)
    body.__kwdefaults__ = function.__kwdefaults__
    with mode:
        return body(*args, **kwargs)


_F_NAMES = ("input", "p", "training", "inplace")
_TORCH_NAMES = ("input", "p", "train")

# Torch functions (what the op seam sees) -> rule(mode, args, kwargs): the op's output drawn as the plain
# call draws it, or None where the op's own draw already is that (see the module docstring). OpRules consults
# it in every pass; ``mode.plain_rng``: the segment was called outside torch.func's transforms.
RNG_RULES: dict[Any, Callable[..., Any]] = {
    F.dropout: _dropout_rule(_F_NAMES, (None, 0.5, True, False), alpha=False, inplace=None),
    F.alpha_dropout: _dropout_rule(_F_NAMES, (None, 0.5, False, False), alpha=True, inplace=None),
    torch.dropout: _dropout_rule(_TORCH_NAMES, (None, None, None), alpha=False, inplace=False),
    torch.dropout_: _dropout_rule(_TORCH_NAMES, (None, None, None), alpha=False, inplace=True),
    torch.alpha_dropout: _dropout_rule(_TORCH_NAMES, (None, None, None), alpha=True, inplace=False),
    torch.alpha_dropout_: _dropout_rule(_TORCH_NAMES, (None, None, None), alpha=True, inplace=True),
    F.scaled_dot_product_attention: _attention,
    F.multi_head_attention_forward: _multi_head_attention,
}
