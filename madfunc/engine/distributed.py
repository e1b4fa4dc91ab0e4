"""Data parallelism on torch.distributed: a ``Random`` segment all-reduces its k coefficients, not n gradients.

With tangents shared by every rank (the same seed), a ``Random`` segment's parameter gradient
``(1/k) sum_j s_j v_j`` is fixed by its k numbers ``s_j = <J v_j, ybar>``, and averaging gradients over
ranks is averaging the ``s_j``: the data-parallel gradient is ``(1/k) sum_j mean_r(s_j^r) v_j``. So with a
process group, each ``Random`` segment call's backward all-reduces ``s`` (k numbers plus a seed
fingerprint) and every rank rebuilds the same parameter gradient from the seed. Only *parameters* take
the all-reduced ``s``: an *activation input*'s cotangent belongs to this rank's shard (it flows on into
this rank's upstream graph, which the usual reduction averages later), so it takes the local ``s``;
the global one would mix other ranks' data into it and bias the upstream gradient.

What counts as a parameter: under plain autograd (``use_plan``), a leaf tensor (an ``nn.Parameter``, or
any tensor created with ``requires_grad=True``); under ``mixed_grad``, a leaf of the differentiated
arguments passed to the segment as it is (a tensor computed from it, ``w * 1``, is an activation).

Which gradients are then reduced already. A parameter's gradient is the sum of what every use of it
contributes; only the contribution of a segment call that *read* it, ``R``, is reduced (identical on every
rank). The rest (a tied weight's use outside the segment, e.g. GPT-2's LM head; a parameter handed to
the segment in a dict but read elsewhere) is this rank's own and still needs the ordinary reduction. So:

* a parameter the segment does not read gets no contribution from it under a process group (``None``,
  not zeros: the ordinary reduction handles it as any other gradient; one that nothing reads then has no
  gradient, as under plain autograd, and DDP fills in zeros);
* a parameter it reads is skipped by the later reduction only if ``R`` was its *only* contribution. That
  is decided by identity, not by value: the gradient autograd delivers for the parameter is then the very
  tensor the segment returned (a sum with anything else is a new tensor; we hold ``R``, so autograd cannot
  add into it in place, and its version counter is checked as well). Which contributions exist is fixed
  by the graph, the same on every rank, so ranks agree without exchanging a flag; a test by value
  (``grad == R``) could not promise that (another rank's outside part may be exactly zero, or round away).
* any other parameter a segment read (also used outside, or read by two segment calls) has the rest
  reduced: under ``mixed_grad``, ``R + reduce(g - R)`` in the same all-reduce as the other gradients
  (exact, for "mean" and "sum", and identical on every rank since ``R`` is); under DDP, where
  :func:`ddp_comm_hook` averages, its whole gradient ``mean_r(R + g_r) = R + mean_r(g_r)``. Those send
  their n numbers, as they must: only a parameter whose whole gradient comes from one segment call is
  cheap.

Under ``mixed_grad`` the check runs after the transform, on the gradients it returns (torch.func.grad
hands back the tensor autograd captured). Under ``use_plan`` the segment's backward puts a one-shot hook
on the parameter that sees the summed incoming gradient before it is accumulated into ``.grad`` (and
before DDP marks it ready), and leaves its verdict for :func:`ddp_comm_hook`.
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook inspects ddp_comm_hook's
# annotations and accepts only the objects dist.GradBucket and torch.futures.Future[torch.Tensor].
import contextvars
import functools
import weakref
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from madfunc.core.functorch import is_batched, unwrap
from madfunc.engine.replicas import Replicas, resolve
from madfunc.strategies.tangents import leaf_seed

__all__ = ["Replicas", "ddp_comm_hook", "prepare", "reducing", "resolve"]

# The seed fingerprint rides in the same float64 all-reduce as s: 4 chunks h of 12 bits, and their
# squares. Ranks agree iff N * sum(h^2) == (sum h)^2 for every chunk (the gap is the sum of (h_a - h_b)^2
# over pairs of ranks), and with h < 2^12 every such number is an integer below 2^53, so the test is exact
# in float64 for N < 2^14.5 ranks. 48 bits: two different seeds share a fingerprint with chance 2^-48.
_CHUNKS, _BITS = 4, 12
FINGERPRINT_NUMBERS = 2 * _CHUNKS

# use_plan: parameters a Random segment read under a process group, for ddp_comm_hook (weakly held, popped by
# the hook): True while every gradient they received since the last hook was a segment's reduced one alone.
_REDUCED: WeakIdKeyDictionary = WeakIdKeyDictionary()
# ... and those whose incoming gradient of the running backward is still to be seen (see _Arrival).
_PENDING: WeakIdKeyDictionary = WeakIdKeyDictionary()


def fingerprint(seed: int) -> list[float]:
    """The seed's 4 x 12-bit chunks (a SplitMix64 hash of it) and their squares."""
    z = leaf_seed(seed, 0x5EED)  # decorrelated from the leaf seeds (indices 0, 1, ...)
    chunks = [float((z >> (_BITS * i)) & ((1 << _BITS) - 1)) for i in range(_CHUNKS)]
    return chunks + [h * h for h in chunks]


def _disagreement_error(name: str, world_size: int) -> RuntimeError:
    return RuntimeError(
        f"segment {name!r}: the {world_size} ranks of the process group drew different Random tangents (the "
        "fingerprints of their tangent seeds differ), so all-reducing the coefficients would mix unrelated "
        "directions. Seed torch identically on every rank before the step (torch.manual_seed(seed), not "
        "seed + rank), or give use_plan/mixed_grad generator=torch.Generator().manual_seed(seed) with the "
        "same seed on every rank (then torch's own RNG may differ per rank, e.g. for dropout)."
    )




class SegmentReduction:
    """What one ``Random`` segment call's backward does under a process group (see the module docstring)."""

    def __init__(
        self,
        replicas: Replicas,
        params: list[bool],
        read: list[bool],
        record: Callable[[list[torch.Tensor | None]], None],
    ) -> None:
        self.replicas = replicas
        self.params = params  # per differentiated input: a parameter (global s) or an activation (local s)
        self.read = read  # per differentiated input: a parameter the segment read (its gradient is reduced)
        self._record = record

    def record(self, grads: list[torch.Tensor | None]) -> None:
        """Called by the strategy's ``combine`` with the gradients it returns: tells the later reduction
        (DDP hook, mixed_grad) which part of the parameters' gradients is reduced already."""
        self._record(grads)

    def reduce(self, name: str, s: torch.Tensor | None, seed: int, k: int) -> torch.Tensor:
        """``s`` averaged (or summed) over ranks: one all-reduce of k + 8 float64 numbers."""
        if s is not None and is_batched(s):
            raise RuntimeError(
                f"segment {name!r}: process_group is not supported under torch.func.vmap (per-example "
                "gradients have no data-parallel reduction); drop process_group inside vmap."
            )
        local = torch.zeros(k, dtype=torch.float64) if s is None else s.detach().to(torch.float64).reshape(-1)
        # float64 whatever the model's dtype: the fingerprint test must be exact (see _CHUNKS).
        buffer = torch.cat([local.cpu(), torch.tensor(fingerprint(seed), dtype=torch.float64)])
        if s is not None and s.device.type != "cpu":
            buffer = buffer.to(s.device)
        dist.all_reduce(buffer, group=self.replicas.group)
        n_ranks = self.replicas.world_size
        sums, squares = buffer[-FINGERPRINT_NUMBERS:].double().cpu().split(_CHUNKS)
        if not torch.equal(n_ranks * squares, sums * sums):
            raise _disagreement_error(name, n_ranks)
        total = buffer[: local.numel()]
        if self.replicas.reduction == "mean":
            total = total / n_ranks
        return total.to(local.dtype if s is None else s.dtype)


class FunctionalCall:
    """One ``mixed_grad`` call under a process group: argument leaves, and the reduced parts of their gradients."""

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.slots: dict[int, int] = {}  # id of a differentiated argument leaf -> its index among the leaves
        # index -> the (tensor, version) each segment call that read the leaf returned for it, reduced already
        self.parts: dict[int, list[tuple[torch.Tensor, int]]] = {}

    def bind(self, args: tuple, argnums: int | tuple[int, ...]) -> None:
        chosen = args[argnums] if isinstance(argnums, int) else tuple(args[i] for i in argnums)
        leaves = optree.tree_leaves(chosen)  # pyright: ignore[reportArgumentType]  (optree's PyTree: a stub limit)
        self.slots = {id(t): i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)}

    def add(self, slot: int, grad: torch.Tensor) -> None:
        part = unwrap(grad)  # without torch.func.grad's wrappers: the tensor the transform hands back
        self.parts.setdefault(slot, []).append((part, part._version))


_CALL: contextvars.ContextVar[FunctionalCall | None] = contextvars.ContextVar("madfunc_dp_call", default=None)


def current_call() -> FunctionalCall | None:
    """The ``mixed_grad`` call under a process group now running, or None."""
    return _CALL.get()


def _graph_task() -> int | None:
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else current()


class _Arrival:
    """``use_plan``: the reduced parts a parameter received in the running backward, and the one-shot hook
    that sees its summed incoming gradient, before ``.grad`` accumulates it (and before DDP's hooks)."""

    def __init__(self, param: torch.Tensor, task: int | None) -> None:
        self.param = weakref.ref(param)  # the hook lives on the parameter: no reference cycle through it
        self.task = task
        self.parts: list[tuple[torch.Tensor, int]] = []
        self.handle = param.register_hook(self.arrived)

    def arrived(self, grad: torch.Tensor) -> None:
        self.handle.remove()  # safe inside the hook: torch iterates over a copy of the hooks
        param = self.param()
        if param is None:
            return
        if _PENDING.get(param) is self:
            del _PENDING[param]
        alone = len(self.parts) == 1 and grad is self.parts[0][0] and grad._version == self.parts[0][1]
        _REDUCED[param] = _REDUCED.get(param, True) and alone
        self.parts.clear()


def _arrive(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Record a segment's reduced gradient ``grad`` of ``param`` (``use_plan``), for ``_Arrival.arrived``."""
    task = _graph_task()
    arrival = _PENDING.get(param)
    if arrival is None or arrival.task != task:  # none yet, or one whose backward never reached the parameter
        if arrival is not None:
            arrival.handle.remove()
        arrival = _PENDING[param] = _Arrival(param, task)
    arrival.parts.append((grad, grad._version))


def prepare(engine: Any, state: Any) -> SegmentReduction | None:
    """The backward's reduction for one forward segment call (None: no process group, or nothing to share).

    Called from ``_ForwardSegment.setup_context``; ``engine.leaves``/``captured`` are the tensors as the
    caller passed them (under torch.func.grad, the differentiated arguments' own wrappers). The strategy's
    ``combine`` gets it in ``Shared.reduction`` and records there the gradients it returns.
    """
    if state is None or state.replicas is None or not engine.strategy.shares_coefficients:
        return None
    objects = [engine.leaves[p] for p in engine.positions] + engine.captured.tensors()
    inputs = [objects[i] for i in engine.diff]
    call: FunctionalCall | None = state.functional
    if call is not None:
        slots = [call.slots.get(id(t)) for t in inputs]
        params = [slot is not None for slot in slots]
    else:
        params = [t.is_leaf for t in inputs]
    if not any(params):  # activations only: the local s is all this segment needs
        return None
    read = [p and bool(u) for p, u in zip(params, engine.used, strict=True)]

    if call is not None:

        def record(grads: list[torch.Tensor | None]) -> None:
            for slot, r, g in zip(slots, read, grads, strict=True):
                if r and slot is not None and g is not None:  # (r: a parameter, which has a slot)
                    call.add(slot, g)
    else:

        def record(grads: list[torch.Tensor | None]) -> None:
            for t, r, g in zip(inputs, read, grads, strict=True):
                if r and g is not None:
                    _arrive(t, g)

    return SegmentReduction(state.replicas, params, read, record)


def _reduce_functional(grads: Any, call: FunctionalCall) -> None:
    """All-reduce, in place and in one call per dtype, what is not reduced yet of the gradient leaves: whole
    gradients, and ``g - R`` of a leaf whose reduced part ``R`` was not its only contribution (then
    ``g = R + reduce(g - R)``); a leaf whose gradient is its reduced part alone is left as it is."""
    replicas = call.replicas
    sends: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (leaf, what to send, its R)
    for slot, g in enumerate(optree.tree_leaves(grads)):
        parts = call.parts.get(slot)
        if parts is None:
            sends.append((g, g, None))
            continue
        if any(part._version != version for part, version in parts):
            raise RuntimeError(
                "madfunc internal error: a Random segment's reduced gradient was modified in place before "
                "mixed_grad(process_group=...) could reduce the rest; please report this."
            )
        if len(parts) == 1 and g is parts[0][0]:
            continue  # its whole gradient is one segment call's, reduced already
        reduced = functools.reduce(torch.add, [part for part, _ in parts])
        sends.append((g, g - reduced, reduced))
    for dtype in dict.fromkeys(sent.dtype for _, sent, _ in sends):
        group = [entry for entry in sends if entry[1].dtype == dtype]
        flat = torch.cat([sent.reshape(-1) for _, sent, _ in group])
        dist.all_reduce(flat, group=replicas.group)
        if replicas.reduction == "mean":
            flat /= replicas.world_size
        for (g, _, reduced), piece in zip(group, flat.split([s.numel() for _, s, _ in group]), strict=True):
            piece = piece.view_as(g)
            g.copy_(piece if reduced is None else reduced + piece)


def reducing(
    grad_fn: Callable[..., Any], where: str, process_group: Any, reduction: str, grads_of: Callable[[Any], Any]
) -> Callable[..., Any]:
    """``grad_fn`` (a torch.func gradient transform of a planned function) whose gradients are reduced
    over ``process_group``: what Random segments reduced already is left as it is."""

    def call(*args: Any, **kwargs: Any) -> Any:
        replicas = resolve(where, process_group, reduction)
        current = FunctionalCall(replicas) if replicas is not None else None
        token = _CALL.set(current)
        try:
            out = grad_fn(*args, **kwargs)
        finally:
            _CALL.reset(token)
        if current is not None:
            _reduce_functional(grads_of(out), current)
        return out

    return call


def ddp_comm_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook: all-reduce (mean) a bucket's gradients except those a ``Random`` segment
    has already reduced over ranks (``use_plan(..., process_group=...)``), which it leaves as they are.

    A parameter is left alone only when its whole gradient came from one ``Random`` segment call that read
    it; one also used elsewhere (a tied weight) or read by several calls is averaged in full, which keeps
    the reduced part (identical on every rank) and averages the rest. Register it with
    ``ddp_model.register_comm_hook(process_group, mf.ddp_comm_hook)``. Without ``Random`` segments under a
    process group it is DDP's default all-reduce hook; buckets whose parameters were all reduced already
    send nothing. It averages, as DDP does: keep ``use_plan``'s default ``reduction="mean"``.
    Forgetting it is safe: DDP then averages the already-reduced gradients too (identical on every rank,
    so unchanged), at the full cost in bytes.

    Args:
        state: the process group to all-reduce over; ``None`` for the default group. Default: none (DDP
            passes what ``register_comm_hook`` was given).
        bucket: the gradient bucket, from DDP.

    Returns:
        A future holding the bucket's buffer with the reduced gradients, as DDP expects.

    Examples:
        >>> import torch, torch.distributed as dist, madfunc as mf
        >>> from torch.nn.parallel import DistributedDataParallel as DDP
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # torchrun: no store
        >>> model = DDP(torch.nn.Sequential(mf.fwd(torch.nn.Linear(3, 4), name="stem"), torch.nn.Linear(4, 1)))
        >>> model.register_comm_hook(dist.group.WORLD, mf.ddp_comm_hook)
        >>> with mf.use_plan({"stem": mf.Random(k=2)}, process_group=dist.group.WORLD):
        ...     model(torch.ones(5, 3)).sum().backward()
        >>> model.module[0].module.weight.grad.shape
        torch.Size([4, 3])
        >>> dist.destroy_process_group()
    """
    group = dist.group.WORLD if state is None else state
    world_size = dist.get_world_size(group)
    buffer = bucket.buffer()
    grads = bucket.gradients()  # views into ``buffer``
    keep = [not _REDUCED.pop(p, False) for p in bucket.parameters()]  # False: a part is this rank's own
    whole = all(keep)
    if whole:
        flat = buffer.div_(world_size)
    elif not any(keep):
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    else:
        flat = torch.cat([g.reshape(-1) for g, kept in zip(grads, keep, strict=True) if kept]).div_(world_size)
    work = dist.all_reduce(flat, group=group, async_op=True)
    assert work is not None

    def write_back(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        if not whole:
            offset = 0
            for g, kept in zip(grads, keep, strict=True):
                if kept:
                    g.copy_(reduced[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        return buffer

    return work.get_future().then(write_back)


def split_grads(has_aux: bool, with_value: bool) -> Callable[[Any], Any]:
    """Where the gradients sit in a transform's result: ``grad``, ``(grad, aux)`` or ``(grad, value)``."""
    return (lambda out: out[0]) if (has_aux or with_value) else (lambda out: out)


def rank_seed(seed: int) -> int:
    """``seed`` made distinct per rank when torch.distributed runs (ranks usually share torch's seed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return seed
    return leaf_seed(seed, 0x5EED0000 + dist.get_rank())
