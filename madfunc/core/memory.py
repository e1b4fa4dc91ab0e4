"""Deterministic peak memory: the most bytes of tensor storage alive at once inside a block.

A ``TorchDispatchMode`` sees every aten op's outputs, also inside torch.func transforms (vmap, jvp,
grad: the mode runs below their wrappers, on plain tensors) and in autograd's backward, whose engine
carries the dispatch mode over as thread-local state. An output whose storage is not one of the op's
inputs' storages is a fresh allocation; its bytes count until the storage is freed, which a
``weakref.finalize`` on the storage's Python object reports (PyTorch keeps that object alive exactly as
long as the C++ storage). Views and in-place ops share an input's storage, so nothing counts twice, and
tensors that existed before the block (parameters, inputs) never count.

The figure depends only on the ops a step runs, not on the allocator, the device or the load, which is
what tests and the planner need. On CUDA, :class:`PeakMemory` also reads the caching allocator's peak.
"""

from __future__ import annotations

import threading
import weakref
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory", "format_bytes", "measure_peak"]


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it at least 1 (``1536 -> '1.5 KiB'``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    """The tensor's storage if it has one that holds real memory (not meta, sparse or a wrapper)."""
    if t.device.type == "meta" or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
        return None


class _Tracker(TorchDispatchMode):
    """The mode :class:`PeakMemory` installs: counts fresh storages until they are freed."""

    def __init__(self, meter: PeakMemory) -> None:
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.meter._op_start()
        out = func(*args, **(kwargs or {}))
        outputs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if outputs:
            inputs = {
                s._cdata
                for x in tree_flatten((args, kwargs))[0]
                if isinstance(x, torch.Tensor) and (s := _storage_of(x)) is not None
            }
            for t in outputs:
                self.meter._see(_storage_of(t), inputs)
        self.meter._op_end()
        return out


class PeakMemory:
    """Live and peak bytes of the tensor storages allocated inside a ``with`` block.

    Made by :func:`measure_peak`. While the block runs and after it ends:

    Attributes:
        peak_bytes: the most bytes of storage allocated inside the block that were alive at once.
            Tensors that existed before the block (parameters, inputs, a model's buffers) never count;
            a view or an in-place result counts no bytes of its own.
        live_bytes: the bytes allocated inside the block still alive (at the end of the block, once it
            has ended: frees after the block no longer change it).
        allocated_bytes: the total bytes allocated inside the block, freed or not.
        cuda_peak_bytes: when the allocator is read (see :func:`measure_peak`), the caching allocator's peak during the
            block above its allocation at the start (``torch.cuda.max_memory_allocated``); else ``None``.
            It includes allocator rounding and workspaces, so it is at least ``peak_bytes`` of CUDA
            tensors.
    """

    def __init__(self, cuda: bool | None = None) -> None:
        self.peak_bytes = 0
        self.live_bytes = 0
        self.allocated_bytes = 0
        self.cuda_peak_bytes: int | None = None
        self._sizes: dict[int, int] = {}  # storage id (its C++ address) -> bytes counted
        self._finalizers: list[weakref.finalize] = []
        self._lock = threading.Lock()  # finalizers may run on autograd's device threads
        self._mode: _Tracker | None = None
        self._cuda_start = 0
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized() if cuda is None else cuda

    def _see(self, storage: torch.UntypedStorage | None, inputs: set[int]) -> None:
        if storage is None:
            return
        key, nbytes = storage._cdata, storage.nbytes()
        with self._lock:
            if key in self._sizes:  # ours already: an in-place op may have resized it
                grown = nbytes - self._sizes[key]
                if grown:
                    self._sizes[key] = nbytes
                    self._add(grown)
                return
            if key in inputs or nbytes == 0:  # a view or in-place result of an input, or empty
                return
            self._sizes[key] = nbytes
            self._add(nbytes)
        self._finalizers.append(weakref.finalize(storage, self._free, key))

    def _op_start(self) -> None:
        """Called before each op runs (``live_bytes`` then includes every free so far): for subclasses that
        keep a timeline (the planner's profile)."""

    def _op_end(self) -> None:
        """Called after each op, its outputs counted."""

    def _add(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.allocated_bytes += max(nbytes, 0)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _free(self, key: int) -> None:
        with self._lock:
            self.live_bytes -= self._sizes.pop(key, 0)

    def __enter__(self) -> PeakMemory:
        if self._mode is not None:
            raise RuntimeError("measure_peak: this meter was already used; make a new one per block")
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        self._mode = _Tracker(self)
        self._mode.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        assert self._mode is not None
        self._mode.__exit__(kind, value, tb)
        if self._cuda:
            torch.cuda.synchronize()
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated() - self._cuda_start
        for finalizer in self._finalizers:  # the figures stay those of the block
            finalizer.detach()
        self._finalizers.clear()
        self._sizes.clear()

    def __repr__(self) -> str:
        cuda = "" if self.cuda_peak_bytes is None else f", cuda_peak={format_bytes(self.cuda_peak_bytes)}"
        return f"PeakMemory(peak={format_bytes(self.peak_bytes)}, live={format_bytes(self.live_bytes)}{cuda})"


def measure_peak(cuda: bool | None = None) -> PeakMemory:
    """Measure the peak of live tensor bytes that a block of code allocates, deterministically.

    Use it as a context manager around one step: every tensor storage the block allocates counts from
    its allocation until it is freed, and ``peak_bytes`` is the most that were alive at once. The
    figure is exact and repeatable (it counts storages, not allocator blocks), covers ops inside
    torch.func transforms and autograd's backward, and excludes what existed before the block
    (parameters, inputs): the memory a step adds. It costs a Python call per op, so measure a step,
    not a training run. Storages made by code that bypasses PyTorch's dispatcher (NumPy, custom C++
    allocations) are not seen.

    Args:
        cuda: also read the CUDA caching allocator's peak (``torch.cuda.max_memory_allocated``, reset on
            entering the block) into ``cuda_peak_bytes``. Default: ``None``, which reads it when CUDA is
            initialized.

    Returns:
        A :class:`PeakMemory` to use in a ``with`` statement; read its ``peak_bytes`` and
        ``live_bytes`` during or after the block.

    Examples:
        >>> import torch
        >>> import madfunc as mf
        >>> w = torch.zeros(1000, requires_grad=True)  # exists before: not counted
        >>> with mf.measure_peak() as m:
        ...     a = torch.ones(1000)  # 4000 bytes
        ...     loss = (w * a).sum()  # w * a: 4000 bytes, freed after the sum (4 bytes)
        ...     del a  # still alive: autograd saved it for w's gradient
        ...     loss.backward()  # the gradient (4000 bytes) becomes w.grad; the graph frees a
        >>> m.peak_bytes, m.live_bytes  # peak: a, loss, backward's seed (4 bytes) and w.grad
        (8008, 4004)
    """
    return PeakMemory(cuda)
