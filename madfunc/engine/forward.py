"""The forward-mode engine: a segment run as an autograd.Function whose backward is forward mode.

``forward`` computes the primal output ``y`` and output tangents ``ydot_j = J v_j`` (vmap over jvp)
for tangents seeded on every input leaf that needs a gradient; ``backward(ybar)`` contracts
``s_j = <ydot_j, ybar>`` and combines (``_contract``). Outer autograd (or torch.func.grad) carries
cotangents between segments in any order, so no glue layers are needed. The passes themselves are
``_engine.Engine``'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optree
import torch

from madfunc.core.checks import _needs_grad, _refuse_higher_order, refuse_complex
from madfunc.engine import context as _context
from madfunc.engine import deferral as _deferral
from madfunc.engine import distributed as _distributed
from madfunc.engine.captured import discover
from madfunc.engine.reverse import differentiated_per_argument, run_reverse
from madfunc.engine.runner import Engine
from madfunc.engine.state import State
from madfunc.strategies.base import SeedRecord, SegmentStats, Shared, Strategy, zeros

__all__ = ["run_forward"]


class _ForwardSegment(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(engine: Engine, *tensors: torch.Tensor) -> tuple:  # type: ignore[override]
        return engine.forward(tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        engine: Engine = inputs[0]
        tensors = inputs[1:]
        ydots = output[engine.n_out :]
        ctx.engine = engine
        ctx.meta = [(tensors[i].shape, tensors[i].dtype, tensors[i].device) for i in engine.diff]
        ctx.n_tensors = len(tensors)
        ctx.save_for_backward(*ydots)
        non_diff = [output[i] for i in range(engine.n_out) if i not in engine.diff_out]
        ctx.mark_non_differentiable(*ydots, *non_diff)
        ctx.data_parallel = _distributed.prepare(engine, _context.active())  # None without a process group
        # Parameters a seed-fused optimizer claimed (engine/deferral): their gradients may be deferred to it.
        claimed = _deferral.claims_of([tensors[i] for i in engine.diff]) if engine.strategy.stochastic else None
        ctx.claimed = None if claimed is None else [tensors[i] for i in engine.diff]

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise NotImplementedError(
            f"segment {ctx.engine.name!r}: forward-mode AD (torch.func.jvp/jacfwd) over a madfunc transform is "
            "not supported; madfunc gives first-order gradients only. Differentiate the plain model instead."
        )

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:  # type: ignore[override]
        # torch.compiler.disable is unannotated: pyright takes its result for its one-argument wrapper
        return _backward(ctx, grads)  # pyright: ignore[reportCallIssue]


# Eager even when the autograd engine calls it from inside a torch.compile'd step (loss.backward() under
# use_plan): traced, it guarded on the tangents' seed and recompiled every step (see _transforms._eager).
@torch.compiler.disable
def _backward(ctx: Any, grads: tuple) -> tuple:
    engine: Engine = ctx.engine
    _refuse_higher_order(engine.name)
    strategy = engine.strategy
    if engine.empty:  # nothing was pushed (no differentiated scalar): the strategy has no state to read
        s, state = None, engine.strategy_state
    else:
        s, state = strategy.contract(engine, engine.strategy_state, ctx.saved_tensors,
                                     [grads[i] for i in engine.diff_out])
    dp = ctx.data_parallel  # parameters take s reduced over ranks, activation inputs this rank's s
    shared = None
    if dp is not None:  # (every rank takes part in the reduction, an empty one too)
        assert engine.seed is not None
        shared = Shared(dp.reduce(engine.name, s, engine.seed, engine.stats.tangents or 0), dp.params, dp)
    claimed, records = ctx.claimed, None
    if claimed is not None and not engine.empty:  # None: the strategy cannot defer (it combines)
        records = strategy.seed_records(engine, state, s, ctx.meta, shared)
    if claimed is not None and records is not None:
        diff_grads = _defer(claimed, records, shared)
    else:
        diff_grads = zeros(ctx.meta) if engine.empty else strategy.combine(engine, state, s, ctx.meta, shared)
    result: list[torch.Tensor | None] = [None] * ctx.n_tensors
    for i, g in zip(engine.diff, diff_grads, strict=True):
        result[i] = g
    return (None, *result)


def _defer(inputs: list[torch.Tensor], records: list[SeedRecord | None],
           shared: Shared | None) -> list[torch.Tensor | None]:
    """``combine``'s gradients with those of claimed parameters handed to their optimizer as records (autograd
    gets None for them: no parameter-sized buffer); the others are built from their records one at a time."""
    grads: list[torch.Tensor | None] = []
    for tensor, record in zip(inputs, records, strict=True):
        owner = None if record is None else _deferral.claimant(tensor)  # (re-read: the optimizer may be gone)
        if owner is not None:
            assert record is not None
            owner.defer(tensor, record)
        grads.append(None if record is None or owner is not None else record.gradient())
    if shared is not None:  # what is reduced already (a deferred one: nothing of it reaches autograd)
        shared.reduction.record(grads)
    return grads


def run_forward(
    name: str,
    strategy: Strategy,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    record: _context.SegmentCall,
    measure: bool = False,
    own_module: torch.nn.Module | None = None,
    owner: Any = None,
    record_passes: bool = True,
) -> Any:
    """Run segment ``fn`` in forward mode under ``strategy`` and return its output pytree.

    ``owner`` is what the user marked (the function or module, searched for captured tensors);
    ``own_module`` a module segment's module; ``record_passes`` whether its passes may be recorded and
    replayed (``_replay``). With ``measure`` (diagnostics), also record the
    differentiated sizes per argument.
    """
    # optree's PyTree is a class to type checkers, so no plain tuple matches it (a stub limit)
    leaves, spec = optree.tree_flatten((args, kwargs))  # pyright: ignore[reportArgumentType]
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    captured = discover(fn if owner is None else owner, leaves, own_module)
    tensors = [leaves[i] for i in positions] + captured.tensors()
    # Under torch.no_grad() (evaluation) nothing needs a gradient, even parameters that require one.
    diff = [j for j, t in enumerate(tensors) if _needs_grad(t)] if torch.is_grad_enabled() else []
    if any(t.layout != torch.strided for t in tensors if _needs_grad(t)):
        raise TypeError(
            f"segment {name!r}: a sparse (non-strided) input needs a gradient; forward segments differentiate dense "
            "tensors only. Pass x.to_dense(), or mark the segment rev()."
        )
    refuse_complex(name, tensors)
    if not diff:  # nothing upstream needs a gradient: a plain call, still a pure one
        record.stats = SegmentStats(differentiated_numel=0, differentiated_per_argument={}, tangents=0, saved_bytes=0)
        with _context.inside_forward_segment(name):
            return run_reverse(name, fn, args, kwargs)
    if measure:  # a second flatten per call: only for inspect, not in every training step
        record.stats.differentiated_per_argument = differentiated_per_argument(args, kwargs)
    call = _context.active()
    seed = call.tangents.segment_seed(name) if strategy.stochastic and call is not None else None
    if seed is not None and strategy.per_rank_tangents:
        seed = _distributed.rank_seed(seed)
    data_parallel = call is not None and call.replicas is not None
    state = State(_reachable(fn, owner, own_module, leaves, positions))
    engine = Engine(name, strategy, fn, leaves, spec, positions, captured, diff, record, seed, measure, state,
                    _has_containers((args, kwargs)), owner=owner, own_module=own_module,
                    record_passes=record_passes, data_parallel=data_parallel)
    outputs = _ForwardSegment.apply(engine, *tensors)
    if engine.side_effects:
        _apply_side_effects(engine, fn, args, kwargs)
    engine.release()
    return optree.tree_unflatten(engine.out_spec, list(outputs[: engine.n_out]))


def _reachable(fn: Any, owner: Any, own_module: torch.nn.Module | None, leaves: list, positions: list[int]):
    """The roots of what the body can change (see _state): non-tensor arguments (a KV cache), the segment's
    module, a method's owner, a partial's arguments and closure cells."""
    taken = set(positions)
    roots = [leaf for i, leaf in enumerate(leaves) if i not in taken]
    if own_module is not None:
        roots.append(own_module)
    functions = [fn] if owner is None or owner is fn else [fn, owner]
    while functions:
        f = functions.pop()
        if isinstance(f, functools.partial):
            roots += [*f.args, *f.keywords.values()]
            functions.append(f.func)
            continue
        if getattr(f, "__self__", None) is not None:
            roots.append(f.__self__)
        for cell in getattr(f, "__closure__", None) or ():
            try:
                roots.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    return roots


def _has_containers(tree: Any) -> bool:
    """Whether the arguments hold a list or dict the body could append to (rebuilt per pass, so watched)."""
    if isinstance(tree, (list, dict)):
        return True
    return isinstance(tree, tuple) and any(_has_containers(x) for x in tree)


def _apply_side_effects(engine: Engine, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Run the body once as plain code on the call's own arguments, from the state and RNG states of the call's
    entry: its effects on Python objects (a KV cache's keys and values) are then those of one plain call, with
    primal tensors, and the body sees the caller's grad mode as in every pass. What the effects hold is then
    differentiated by reverse mode, as a plain call's would be (a later loss that reads a cached key gets
    its gradient); the output is dropped, and with it the graph of everything the effects do not hold.
    Module buffers keep the value the engine wrote (updated once)."""
    engine.snapshot.restore()
    buffers = [b.clone() for b in engine.buffers]
    with _context.inside_forward_segment(engine.name):
        fn(*args, **kwargs)
    for real, value in zip(engine.buffers, buffers, strict=True):
        if not value.equal(real):
            real.copy_(value)
