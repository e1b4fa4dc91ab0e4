"""Checkpointed reverse mode: a segment that keeps only its inputs and recomputes its body in backward.

The semantics of ``torch.utils.checkpoint(use_reentrant=False)``, by a mechanism that also works under
``torch.func.grad`` (which refuses the saved-tensor hooks that torch's checkpoint is built on): an
autograd.Function (``setup_context`` style, like the forward engine's) whose forward runs the body without
recording a graph and saves only the input tensors, and whose backward runs the body again with autograd
recording, on detached copies of those inputs, and takes ``torch.autograd.grad`` of it.

What one plain call promises, the recomputation keeps:

* the same random numbers: torch's RNG states on entry are restored before the recomputation (a dropout
  mask is redrawn identically), and the states backward found are put back after it;
* side effects once: module buffers (BatchNorm's running statistics) are replaced by copies of their
  entry values while it runs, so the real ones are updated by the forward call only; and the Python
  objects the body reaches (a KV cache) are put back to their entry state before it runs and to the state
  backward found after it (``_state.State``), so it sees what the forward call saw and leaves nothing.

A body whose forward call changed the objects it reaches (appended keys to a cache) runs once more right
after the call as plain code, from the entry state, as a forward segment's does (``forward._apply_side_
effects``): the objects then hold tensors with their graph, as one plain call leaves them. Such a call
keeps the entry state of those objects until its backward, and releases it there: a cache holding later
layers' keys, whose graph leads back to this call's node, would otherwise keep itself alive through it (a
cycle through autograd's C++ nodes that Python's collector cannot see). A second backward through that call
(``retain_graph=True``) is then refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

from madfunc.core.checks import _check_not_mutated, _flatten_output, _needs_grad, refuse_complex
from madfunc.core.functorch import differentiating_transforms, run_below_grad
from madfunc.engine import context as _context
from madfunc.engine.captured import Captured, discover
from madfunc.engine.forward import _reachable
from madfunc.engine.reverse import differentiated_per_argument, run_reverse
from madfunc.engine.rng import Snapshot
from madfunc.engine.state import State, containers_changed
from madfunc.strategies.base import SegmentStats

__all__ = ["run_checkpointed"]


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Recompute:
    """One checkpointed call: what its forward and backward need (passed to the autograd.Function as a
    constant, like the forward engine's ``Engine``). ``tensors`` given to ``apply`` are the argument tensors
    followed by the differentiable tensors the body reads from outside its arguments (``captured``)."""

    def __init__(self, name: str, fn: Callable[..., Any], leaves: list, spec: Any, positions: list[int],
                 captured: Captured, diff: list[int], roots: list | None, stats: SegmentStats | None) -> None:
        self.name, self.fn, self.leaves, self.spec = name, fn, leaves, spec
        self.positions, self.captured, self.diff = positions, captured, diff
        self.roots = roots  # what the body can change (``_state``); None once the call no longer needs it
        self.stats = stats  # inspect's record (None outside diagnostics)
        self.grad_mode = torch.is_grad_enabled()
        self.buffers = captured.buffer_tensors()  # buffers of modules in training mode: updated in place
        self.entry_buffers: list[torch.Tensor] = []
        self.snapshot: Snapshot | None = None
        self.out_spec: Any = None
        self.n_out = 0
        self.diff_out: list[int] = []
        self.side_effects = False

    def call(self, tensors: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]) -> tuple:
        """The body on ``tensors`` (arguments, then captured ones installed in place), with ``buffers``
        installed in place of the training-mode buffers; its flat output."""
        assert self.leaves is not None  # (None only after backward)
        leaves = list(self.leaves)
        for pos, t in zip(self.positions, tensors, strict=False):
            leaves[pos] = t
        args, kwargs = optree.tree_unflatten(self.spec, leaves)
        with _context.inside_forward_segment(self.name), self.captured.installed(tensors[len(self.positions):],
                                                                                   buffers):
            out = self.fn(*args, **kwargs)
        if self.roots is not None and not self.side_effects and containers_changed((args, kwargs), leaves):
            self.side_effects = True  # it appended to a list it was given: rerun on the caller's own
        out_leaves, self.out_spec = _flatten_output(self.name, out)
        return tuple(out_leaves)

    def forward(self, tensors: Sequence[torch.Tensor]) -> tuple:
        # Detached, so that no graph is recorded even with the caller's grad mode on inside the body (a body
        # may branch on torch.is_grad_enabled()); the graph is recorded in backward, by the recomputation.
        tensors = [t.detach() for t in tensors]
        before = [t._version for t in tensors]
        state = State(self.roots) if self.roots is not None else None
        self.snapshot = Snapshot({t.device for t in tensors}, state)
        self.entry_buffers = [b.clone() for b in self.buffers]
        with torch.set_grad_enabled(self.grad_mode):
            if self.stats is not None and self.grad_mode:  # inspect: what the recomputation will keep
                ys = self._measured(tensors)
            else:
                ys = self.call(tensors, self.buffers)
        if state is not None:
            self.side_effects = self.side_effects or state.changed()
            if not self.side_effects:  # nothing to put back in backward: drop the copies now
                self.snapshot.state = self.roots = None
        _check_not_mutated(self.name, tensors, before)
        self.n_out = len(ys)
        self.diff_out = [i for i, y in enumerate(ys) if y.is_floating_point() or y.is_complex()]
        if self.stats is not None:
            self.stats.output_numel = sum(ys[i].numel() for i in self.diff_out)
        return ys

    def _measured(self, tensors: Sequence[torch.Tensor]) -> tuple:
        """The call with autograd recording, counting the bytes it saves (the recomputation's transient)."""
        assert self.stats is not None
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        inputs = [t.requires_grad_(t.is_floating_point()) if i in self.diff else t
                  for i, t in enumerate(t.detach() for t in tensors)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ys = self.call(inputs, self.buffers)
        self.stats.recompute_bytes = saved[0]
        return tuple(y.detach() for y in ys)

    def backward(self, saved: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> list:
        """The gradients of the ``diff`` inputs: the body recomputed from the call's entry state."""
        if self.snapshot is None:
            raise RuntimeError(
                f"segment {self.name!r}: backward ran twice through a Checkpointed call whose body changed the "
                "objects it reaches (a KV cache); its entry state was released after the first backward. Give "
                "the segment Reverse() to backpropagate through it again (retain_graph=True)."
            )
        if not self.diff_out:  # no floating output: nothing flows back
            return [torch.zeros_like(saved[i]) for i in self.diff]
        now_state = State(self.roots) if self.roots is not None else None
        now = Snapshot({t.device for t in saved}, now_state)
        # torch.func.vjp, not autograd.grad: inside a Function's backward under torch.func.grad, requires_grad_
        # is refused. Floating buffers (copies of their entry values) enter as primals too, so that in-place
        # updates of them happen at the vjp's own level (torch.func refuses to mutate a captured tensor); vjp
        # takes floating primals only, so integer counters travel as float64 (exact below 2**53), as in the
        # forward engine's passes. Their values are dropped after: the real buffers were updated once, in forward.
        buffers = [b if b.dtype == torch.bool else b.clone() if b.is_floating_point() else b.double()
                   for b in self.entry_buffers]
        floating = [i for i, b in enumerate(buffers) if b.is_floating_point()]
        count = len(self.diff)

        def body(*xs: torch.Tensor) -> tuple:
            values, passed = list(saved), list(buffers)
            for i, x in zip(self.diff, xs[:count], strict=True):
                values[i] = x
            for i, b in zip(floating, xs[count:], strict=True):
                passed[i] = b.detach()  # at the vjp's level, but not differentiated (batch_norm refuses that)
            ys = self.call(values, passed)
            return tuple(ys[i] for i in self.diff_out)

        self.snapshot.restore()  # the RNG states (and reachable objects) the forward call started from
        try:
            ys, pullback = torch.func.vjp(body, *(saved[i] for i in self.diff), *(buffers[i] for i in floating))[:2]
        finally:
            now.restore()
        cotangents = tuple(torch.zeros_like(y) if g is None else g for y, g in zip(ys, grads, strict=True))
        found = pullback(cotangents)[:count]
        if self.side_effects:  # release what a cache holds: see the module docstring
            self.leaves = self.roots = self.snapshot = None
        return list(found)


class _CheckpointSegment(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(runner: Recompute, *tensors: torch.Tensor) -> tuple:  # type: ignore[override]
        return runner.forward(tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        runner: Recompute = inputs[0]
        ctx.runner = runner
        ctx.n_tensors = len(inputs) - 1
        ctx.save_for_backward(*inputs[1:])  # the inputs only: the body's activations are recomputed
        ctx.mark_non_differentiable(*(y for i, y in enumerate(output) if i not in runner.diff_out))

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise NotImplementedError(
            f"segment {ctx.runner.name!r}: forward-mode AD (torch.func.jvp/jacfwd) over a Checkpointed segment "
            "is not supported; differentiate the plain model instead, or give the segment Reverse()."
        )

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:  # type: ignore[override]
        # torch.compiler.disable is unannotated: pyright takes its result for its one-argument wrapper
        return _backward(ctx, grads)  # pyright: ignore[reportCallIssue]


@torch.compiler.disable  # eager, like the forward engine's backward (see forward._backward)
def _backward(ctx: Any, grads: tuple) -> tuple:
    runner: Recompute = ctx.runner
    levels = differentiating_transforms()
    if levels >= 2 or (levels == 0 and torch.is_grad_enabled()):
        raise NotImplementedError(
            f"segment {runner.name!r}: a Checkpointed segment's gradient was differentiated again (torch.func."
            "grad over mixed_grad, or backward(create_graph=True) under use_plan). Its recomputed gradient is "
            "first order only; give the segment Reverse() for higher-order derivatives."
        )
    saved = list(ctx.saved_tensors)
    count = len(saved)
    # Below torch.func.grad's level: its backward records with create_graph, so the recomputation's graph (its
    # activations) would otherwise live as long as the gradients, to the end of the step (first order only:
    # checked above).
    diff_grads = run_below_grad(lambda ts: runner.backward(ts[:count], ts[count:]),
                                [*saved, *(grads[i] for i in runner.diff_out)])
    result: list[torch.Tensor | None] = [None] * ctx.n_tensors
    for i, g in zip(runner.diff, diff_grads, strict=True):
        result[i] = g
    return (None, *result)


def run_checkpointed(name: str, fn: Callable[..., Any], args: tuple, kwargs: dict, record: _context.SegmentCall,
                     measure: bool = False, own_module: torch.nn.Module | None = None, owner: Any = None) -> Any:
    """Run segment ``fn`` in checkpointed reverse mode (see the module docstring); its output pytree.

    ``owner`` is what the user marked (searched for captured tensors), ``own_module`` a module segment's
    module; with ``measure`` (diagnostics), ``record.stats`` gets the bytes kept and recomputed.
    """
    # optree's PyTree is a class to type checkers, so no plain tuple matches it (a stub limit)
    leaves, spec = optree.tree_flatten((args, kwargs))  # pyright: ignore[reportArgumentType]
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    captured = discover(fn if owner is None else owner, leaves, own_module)
    tensors = [leaves[i] for i in positions] + captured.tensors()
    diff = [j for j, t in enumerate(tensors) if _needs_grad(t)] if torch.is_grad_enabled() else []
    if not diff:  # nothing to differentiate (evaluation, or no input needs a gradient): a plain call
        return run_reverse(name, fn, args, kwargs, record if measure else None)
    refuse_complex(name, tensors)
    # (saved-tensor hooks measure the recomputation: only under plain autograd, as for Reverse)
    stats = record.stats if measure and differentiating_transforms() == 0 else None
    _record_inputs(record.stats, tensors, diff)
    if measure:  # a second flatten per call: only for inspect
        record.stats.differentiated_per_argument = differentiated_per_argument(args, kwargs)
    roots = _reachable(fn, owner, own_module, leaves, positions)
    runner = Recompute(name, fn, leaves, spec, positions, captured, diff, roots, stats)
    outputs = _CheckpointSegment.apply(runner, *tensors)
    # The argument tensors are saved by the Function (unwrapped under torch.func); the runner keeps only the
    # non-tensor leaves the recomputation needs.
    taken = set(positions)
    runner.leaves = [None if i in taken else leaf for i, leaf in enumerate(leaves)]
    out = optree.tree_unflatten(runner.out_spec, list(outputs))
    if runner.side_effects:
        _rerun_for_effects(runner, args, kwargs)
    return out


def _record_inputs(stats: SegmentStats, tensors: Sequence[torch.Tensor], diff: list[int]) -> None:
    """The sizes of one call (``compare``, ``inspect``, the planner). A Checkpointed segment keeps its input
    tensors; those that cost memory are its activation inputs (computed upstream, which would be freed
    otherwise): leaves (parameters, data, constants) exist anyway. Read here, before the autograd.Function
    hides ``grad_fn``."""
    stats.differentiated_numel = sum(tensors[i].numel() for i in diff)
    stats.tangents = 0
    stats.saved_bytes = _nbytes([t for t in tensors if t.grad_fn is not None])


def _rerun_for_effects(runner: Recompute, args: tuple, kwargs: dict) -> None:
    """The body changed what it reaches: rerun it as plain code on the caller's own arguments from the entry
    state (as the forward engine's ``_apply_side_effects``), so that the objects hold tensors with their graph,
    as after one plain call; module buffers keep the values the call wrote (updated once)."""
    assert runner.snapshot is not None
    runner.snapshot.restore()
    written = [b.clone() for b in runner.buffers]
    with _context.inside_forward_segment(runner.name):
        runner.fn(*args, **kwargs)
    for real, value in zip(runner.buffers, written, strict=True):
        if not value.equal(real):
            real.copy_(value)
