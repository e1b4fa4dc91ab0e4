"""The op seam: what happens when an op runs inside a forward segment's tangent pass.

One ``TorchFunctionMode`` (``OpRules``) sees every torch function a segment's body calls. It
1. routes ops whose forward-mode rule in PyTorch is missing or wrong (it disagrees with the op's
   backward rule, or yields no tangent at all) to a rule from ``RULES``; an op with no rule there
   raises ``ForwardModeError`` naming segment and op rather than contract a wrong tangent;
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

from ._checks import ForwardModeError

__all__ = ["OpRules", "RULES", "reference_kernels"]

# Tensor queries that read metadata only: a tensor passed to them is not "used" by the segment.
_METADATA = frozenset(
    (getattr(torch.Tensor, name).__get__ if hasattr(getattr(torch.Tensor, name), "__get__")
     and not callable(getattr(torch.Tensor, name)) else getattr(torch.Tensor, name))
    for name in ("size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "element_size",
                 "data_ptr", "__len__", "shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout",
                 "is_complex", "storage_offset")
)


def _why_wrong(reason: str) -> Callable[..., Any]:
    """A rule for an op whose forward-mode result in PyTorch cannot be trusted: refuse, saying why."""

    def rule(segment: str, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        raise ForwardModeError(
            f"segment {segment!r} runs in forward mode, but op {name!r} inside it {reason} in PyTorch "
            f"{torch.__version__}, so its forward-mode gradient would be silently wrong. Mark the part that "
            f"uses it rev() (or give segment {segment!r} the strategy Reverse() in the plan)."
        )

    return rule


def _scatter_reduce(segment: str, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    reduce = kwargs.get("reduce", args[4] if len(args) > 4 else args[3] if len(args) > 3 else None)
    if reduce == "prod":
        return _why_wrong("(with reduce='prod') has a forward rule that yields no tangent")(
            segment, name, func, args, kwargs
        )
    return func(*args, **kwargs)


def _native_rnn(segment: str, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # The oneDNN RNN kernel (mkldnn_rnn_layer, float32 on CPU) has no forward rule; the native one does.
    # Switched off for this op alone: oneDNN convolutions elsewhere in the segment keep their speed.
    # (torch.backends.mkldnn.flags() would also touch the TF32 setting, which warns on CPU builds.)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return func(*args, **kwargs)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


_UNPOOL = "has a forward rule that disagrees with its backward rule (where pooled indices repeat)"

# op -> rule(segment, op name, func, args, kwargs). Found by the op_db sweep (tests/test_opdb_sweep.py).
RULES: dict[Any, Callable[..., Any]] = {
    torch.scatter_reduce: _scatter_reduce,
    torch.Tensor.scatter_reduce: _scatter_reduce,
    torch.Tensor.scatter_reduce_: _scatter_reduce,
    F.max_unpool1d: _why_wrong(_UNPOOL),
    F.max_unpool2d: _why_wrong(_UNPOOL),
    F.max_unpool3d: _why_wrong(_UNPOOL),
    torch.lstm: _native_rnn,
    torch.gru: _native_rnn,
    torch.rnn_tanh: _native_rnn,
    torch.rnn_relu: _native_rnn,
}


class OpRules(TorchFunctionMode):
    """Active around a forward segment's body in every tangent pass; see the module docstring."""

    def __init__(self, segment: str, watched: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.segment = segment
        self.watched = {id(t): i for i, t in enumerate(watched)}
        self.used: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        rule = RULES.get(func)
        if self.watched and func not in _METADATA:
            self._record(args)
            self._record(kwargs.values())
        if rule is not None:
            return rule(self.segment, getattr(func, "__name__", str(func)), func, args, kwargs)
        return func(*args, **kwargs)

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
