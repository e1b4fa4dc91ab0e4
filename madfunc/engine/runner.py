"""One forward segment call's passes: the body run under jvp (vmapped over tangent batches), seeded
eagerly (``push``: basis blocks for ``Exact``, drawn tangents for ``Random``) or lazily (``_lazy.push_lazy``,
``LazySeeds``). Which tangents, and how many passes, the strategy decides (``Strategy.push``).

The body may run several times (``Exact``: one pass per leaf group; ``Random``: a lazy try, then an
eager pass; a retry after an op that dropped tangents was routed to the fallback; one pass per tangent
where vmap fails). Each pass must see what one plain call sees: torch's RNG states are restored before it
(``_rng.Snapshot``), module buffers are fresh copies (``_captured``), grad mode is the caller's.

A pass that ran cleanly before with the same key is replayed from its recording (``_replay``) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import optree
import torch
from torch.func import jvp

from madfunc.core.checks import (
    _check_not_mutated,
    _flatten_output,
    _translate_error,
    _versions,
)
from madfunc.core.functorch import outside_transforms
from madfunc.core.guards import check_finite, check_no_hidden_inputs, check_strided, hidden_input_error
from madfunc.engine import context as _context
from madfunc.engine import reads as _reads
from madfunc.engine import replay as _replay
from madfunc.engine.captured import Captured
from madfunc.engine.context import SegmentCall
from madfunc.engine.lazy import push_lazy
from madfunc.engine.passes import (
    Retry,
    all_zero_tangents,
)
from madfunc.engine.perturb import perturbed_pass
from madfunc.engine.pushes import PassRunner
from madfunc.engine.rng import Snapshot
from madfunc.engine.state import State, containers_changed
from madfunc.ops.rules import reference_kernels
from madfunc.strategies.base import Passes, SegmentStats, Strategy, StrategyState

NO_STATE = StrategyState()

__all__ = ["Engine"]


class Engine(PassRunner):
    """Everything one forward-segment call needs, passed to the autograd.Function as a constant.

    The tensors given to ``apply`` are the segment's argument tensors followed by the differentiable
    tensors it reads from outside its arguments (``captured``); ``diff`` indexes those that get tangents.
    """

    def __init__(self, name: str, strategy: Strategy, fn: Callable[..., Any], leaves: list, spec: Any,
                 positions: list[int], captured: Captured, diff: list[int], record: SegmentCall, seed: int | None,
                 measure: bool, state: State | None = None, mutable_args: bool = False, *, owner: Any = None,
                 own_module: torch.nn.Module | None = None, record_passes: bool = True,
                 data_parallel: bool = False) -> None:
        self.name = name
        self.strategy = strategy
        self.fn = fn
        self.leaves = leaves
        self.spec = spec
        self.positions = positions  # where the argument tensors sit among ``leaves``
        self.captured: Captured = captured
        self.diff = diff
        self.record = record
        self.stats: SegmentStats = record.stats
        self.seed = seed
        self.data_parallel = data_parallel  # under a process group (EngineView)
        self.measure = measure  # inspect: report a costly Exact segment's size instead of computing it
        self.grad_mode = torch.is_grad_enabled()
        # Called outside torch.func's transforms (use_plan): its random ops draw as eager kernels do (_dropout).
        self.plain_call = outside_transforms()
        self.out_spec: Any = None
        self.n_out = 0
        self.diff_out: list[int] = []
        self.used: list[bool] = [True] * len(diff)
        self.expected_reads: list[bool] | None = None  # read_inputs' answer, until a pass checked it (pushes.py)
        self.fallbacks: set[str] = set()
        self.bare = False  # later passes of this call may skip the op seam (see _push)
        self.strategy_state: StrategyState = NO_STATE  # what the strategy keeps from its passes for backward
        self.empty = False  # no differentiated scalar (an empty batch): the strategy was not asked to push
        # Per differentiated input: computed upstream (it has a grad_fn), not a leaf. An estimate of its
        # cotangent reaches the upstream leaves through the Jacobians above, where the segment's variance
        # law no longer applies; Activity perturbs exactly these per example. Read here, before the
        # autograd.Function: inside it (and under torch.compile) the wrappers' grad_fn cannot be read.
        self.activation = [i < len(positions) and leaves[positions[i]].grad_fn is not None for i in diff]
        # Module buffers may be updated in place (BatchNorm's running statistics and batch counter).
        # torch.func forbids mutating a tensor captured from outside a transform, so they enter each pass
        # as jvp primals (zero tangent); jvp takes only floating primals, so integer counters travel as
        # float64 (exact below 2**53). Every pass gets fresh copies of the values on entry.
        self.buffers = captured.buffer_tensors()
        self.primal_buffers = [i for i, b in enumerate(self.buffers) if b.dtype != torch.bool]
        # For the replay key (_replay): what the user marked, and whether recording is allowed.
        self.owner = owner
        self.own_module = own_module
        self.record_passes = record_passes
        # What the body is, for per-segment caches (EngineView.identity; see _zero_key).
        self.identity = (name, id(fn), id(getattr(fn, "__self__", None)))
        self.positions_set = frozenset(positions)
        self.clean = False  # the last eager pass met no rule, fallback or dropped tangent
        # Side effects (_state): the Python objects the body reaches, restored before every pass, and whether
        # a pass changed them or the argument containers it was given (a list it appends to); then the
        # caller runs the body once more as plain code, so they end as one plain call leaves them.
        self.state = state
        self.mutable_args = mutable_args
        self.args_changed = False
        self.side_effects = False

    def modules(self) -> list[torch.nn.Module]:
        """The modules whose ``training`` flags the body may read: the segment's own and its parameters' owners."""
        found = {id(m): m for m, _, _ in self.captured.params}
        if self.own_module is not None:
            found.update((id(m), m) for m in self.own_module.modules())
        return list(found.values())

    # -- the computation -------------------------------------------------------------------------
    def _call(self, tensors: Sequence[torch.Tensor], diff_values: Sequence[torch.Tensor], buffers) -> tuple:
        values = list(tensors)
        for i, value in zip(self.diff, diff_values, strict=True):
            values[i] = value
        assert self.leaves is not None  # (None only after release(), once the call is over)
        leaves = list(self.leaves)
        for pos, t in zip(self.positions, values, strict=False):
            leaves[pos] = t
        args, kwargs = optree.tree_unflatten(self.spec, leaves)
        with (
            _context.inside_forward_segment(self.name),
            reference_kernels(),
            torch.set_grad_enabled(self.grad_mode),
            self.captured.installed(values[len(self.positions) :], buffers),
        ):
            out = self.fn(*args, **kwargs)
        if self.mutable_args and not self.args_changed:
            self.args_changed = containers_changed((args, kwargs), leaves)
        out_leaves, out_spec = _flatten_output(self.name, out)
        self.out_spec = out_spec
        return tuple(out_leaves)

    def seeded_call(self, tensors, which: Sequence[int], seeded: Sequence[torch.Tensor], buffers) -> tuple:
        """The body on ``tensors`` with the inputs ``which`` replaced by ``seeded`` (their dual values)."""
        values = [tensors[i] for i in self.diff]
        for j, x in zip(which, seeded, strict=True):
            values[self.diff.index(j)] = x
        return self._call(tensors, values, buffers)

    def _jvp(self, body, primals: tuple, tangents: tuple, buffers: list[torch.Tensor]) -> tuple:
        """``jvp`` of ``body(*primals, passed=buffers)`` with the pass's buffers entering as extra primals (zero
        tangents), so that in-place updates of them happen at the jvp's own level (see __init__)."""
        count = len(primals)

        def f(*xs):
            passed = list(buffers)
            for i, b in zip(self.primal_buffers, xs[count:], strict=True):
                passed[i] = b
            return body(*xs[:count], passed=passed)

        extra = tuple(buffers[i] for i in self.primal_buffers)
        return jvp(f, (*primals, *extra), (*tangents, *(torch.zeros_like(b) for b in extra)))

    def _pass_buffers(self) -> list[torch.Tensor]:
        return [
            b if b.dtype == torch.bool else b.clone() if b.is_floating_point() or b.is_complex() else b.double()
            for b in self.buffers
        ]

    def push(
        self, tensors: Sequence[torch.Tensor], which: Sequence[int], tangents: Sequence[torch.Tensor], *,
        watch: bool = False, diagnose: Sequence[int] = (), check: bool = True, record: bool = True,
    ) -> Passes:
        """Primal outputs and output tangents for tangent batches ``tangents`` seeded on leaves ``which``.

        Returns ``(ys, ydots, buffers)``: ``buffers`` are the module buffers as the pass left them.

        Every pass of one call runs the same primal program (same inputs, same RNG state), so once a pass
        under the op seam (OpRules) met no op that needed it, the call's later passes run without it: the
        seam's dispatch costs ~25 us per torch call. An op without a forward rule fails only once a seeded
        input reaches it, so a bare pass that fails runs again under the seam. With ``record``, a clean pass
        is remembered for ``_replay`` (a caller that records several passes as one passes False).
        """
        key = None
        if not diagnose and record:
            passes = [(which, tangents)]
            key = _replay.key_of(self, tensors, passes, watch)
            replayed = self.replay(key, tensors, passes, check, which if watch else None)
            if replayed is not None:
                return (*replayed, self.buffers)
        result = self._push_eager(tensors, which, tangents, watch, diagnose, check)
        if key is not None and self.clean and not self.had_effects():  # a replay would skip the effects
            used = [self.used[self.diff.index(j)] for j in which] if watch else None
            _replay.note_clean(self, key, tensors, passes, result[:2], used)
        return result

    def push_groups(self, tensors: Sequence[torch.Tensor],
                    groups: Sequence[tuple[Sequence[int], Callable[[], Sequence[torch.Tensor]]]],
                    together: Sequence[Sequence[torch.Tensor]] | None = None) -> Passes:
        """One pass per group ``(which, make_tangents)``, output tangents concatenated (EngineView). With
        ``together`` (the groups' tangents, built already), the passes are recorded and replayed as one
        graph, so that their common primal work is done once."""
        passes = None if together is None else [(which, t) for (which, _), t in zip(groups, together, strict=True)]
        key = _replay.key_of(self, tensors, passes) if passes else None
        replayed = self.replay(key, tensors, passes) if key is not None and passes else None
        if replayed is not None:
            return (*replayed, self.buffers)
        per_group: list[list[torch.Tensor]] = []
        clean = True
        for i, (which, make) in enumerate(groups):
            self.begin_pass()
            ys, ydots, buffers = self.push(tensors, which, make() if together is None else together[i],
                                           record=key is None)
            clean = clean and self.clean
            per_group.append(ydots)
        ydots = [torch.cat(parts) if len(per_group) > 1 else parts[0] for parts in zip(*per_group, strict=True)]
        if key is not None and passes and clean:
            _replay.note_clean(self, key, tensors, passes, (ys, ydots))
        return ys, ydots, buffers

    def push_lazy(self, tensors: Sequence[torch.Tensor], device: torch.device, k: int,
                  make: Callable[[int, torch.Tensor], torch.Tensor]) -> Passes | None:
        """``k`` tangents per input seeded where each is first used (EngineView; see engine/lazy.py)."""
        return push_lazy(self, tensors, device, k, make)

    def perturbed_pass(self, tensors: Sequence[torch.Tensor],
                       perturb: Callable[[int, torch.Tensor], torch.Tensor] | None,
                       at_use: bool = True, watch: bool = False) -> tuple[Sequence[torch.Tensor], list[torch.Tensor]]:
        """One pass without tangents on perturbed inputs (EngineView; see engine/perturb.py)."""
        return perturbed_pass(self, tensors, perturb, at_use, watch)

    def read_inputs(self, tensors: Sequence[torch.Tensor]) -> list[bool]:
        """Per differentiated input, whether the body reads it; ``used`` becomes that (EngineView; see
        engine/reads.py: remembered per segment, or found by one plain pass, and checked by the first eager pass)."""
        read = _reads.read_inputs(self, tensors)
        self.used = list(read)
        self.expected_reads = read
        return read

    def arguments(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """The segment's ``(args, kwargs)`` with its argument tensors replaced by ``tensors`` (EngineView)."""
        assert self.leaves is not None  # (None only after release(), once the call is over)
        leaves = list(self.leaves)
        for pos, t in zip(self.positions, tensors, strict=False):
            leaves[pos] = t
        return cast(tuple[tuple, dict], optree.tree_unflatten(self.spec, leaves))  # spec: of (args, kwargs)

    def replay(self, key, tensors, passes, check: bool = True, watched=None) -> tuple[tuple, list] | None:
        """``(ys, ydots)`` of ``passes`` from the recording under ``key``, or None (no recording, or its
        outputs came back with all-zero tangents: then the eager passes look closer). ``watched``: the
        seeded inputs whose use the recording reports (into ``self.used``)."""
        recording = _replay.lookup(key)
        if recording is None or (watched is not None and recording.used is None):
            return None
        replayed = recording.run(tensors, passes)
        if replayed is None:
            return None
        ys, ydots = replayed
        self.out_spec = recording.out_spec
        which = [j for w, _ in passes for j in w]
        if check and all_zero_tangents(self._zero_key(which), ys, ydots):
            return None
        for j, used in zip(watched or (), recording.used or (), strict=True):
            if not used:
                self.used[self.diff.index(j)] = False
        return ys, ydots

    def _push_eager(self, tensors, which, tangents, watch: bool, diagnose, check: bool):
        self.clean = False
        if self.bare and not watch and not diagnose:
            try:
                return self._push_pass(tensors, which, tangents, watch, diagnose, bare=True, check=check)
            except (RuntimeError, NotImplementedError):
                self.bare = False
                self.snapshot.restore()
        return self._push_pass(tensors, which, tangents, watch, diagnose, bare=False, check=check)

    def _zero_key(self, which: Sequence[int]) -> tuple:
        """What an output's known-real zero tangents are remembered under: the segment's name, the function
        object (and module) it runs, and the seeded inputs. Not the code alone: one wrapper function can run
        different ops (a closure per op), and a name can be reused; a closure re-created per call is then
        diagnosed again on each call (slower, never wrong)."""
        fn = self.fn
        return (self.name, id(fn), id(getattr(fn, "__self__", None)), tuple(which))

    def forward(self, tensors: Sequence[torch.Tensor]) -> tuple:
        # Detached: with the caller's grad mode on inside the body, autograd must not record the body's
        # work on the inputs (forward mode carries the derivative; recording would keep activations).
        tensors = [t.detach() for t in tensors]
        before = _versions(tensors)
        self.snapshot = Snapshot({t.device for t in tensors}, self.state)
        try:
            ys, ydots, buffers = self._attempts(tensors)
        finally:  # also after an error: the user's objects must not keep a failed pass's functorch wrappers
            self.snapshot.restore_state()
        self.side_effects = self.args_changed or self.snapshot.dirty  # (the state was just restored)
        _check_not_mutated(self.name, tensors, before)
        return self._finish(ys, ydots, buffers)

    def release(self) -> None:
        """After the call: drop what backward does not need, the arguments (a KV cache among them) and the state
        copies. The engine lives as long as the autograd graph (``ctx.engine``), and a cache holding tensors
        whose graph leads back to this node would keep itself alive through it: a cycle through autograd's C++
        nodes, which Python's collector cannot see (2.5 MB per step leaked on a tiny Llama)."""
        self.leaves = self.state = self.snapshot.state = None

    def had_effects(self) -> bool:
        """Whether a pass so far changed the state it reaches or its argument containers."""
        return self.args_changed or self.snapshot.dirty or (self.state is not None and self.state.changed())

    def _attempts(self, tensors: Sequence[torch.Tensor]):
        try:
            for attempt in range(_ATTEMPTS):
                self.passes = 0
                self.bare = False
                self.used = [True] * len(self.diff)
                try:
                    ys, ydots, buffers = self._forward(tensors)
                    break
                except Retry:  # an op that drops tangents was found and routed to the fallback: again
                    self.snapshot.restore()
                    if attempt == _ATTEMPTS - 1:
                        raise RuntimeError(
                            f"segment {self.name!r}: forward mode kept losing output tangents after routing the "
                            "ops found to the fallback; please report this. Give the segment Reverse() meanwhile."
                        ) from None
        except (NotImplementedError, RuntimeError) as error:
            if "wrapper == nullptr" in str(error):  # a grad-level tensor read from outside the arguments
                raise hidden_input_error(self.name) from error
            translated = _translate_error(self.name, error)
            if translated is None:
                raise  # ForwardModeError from the op seam, or an error that says what to do already
            raise translated from error
        return ys, ydots, buffers

    def _finish(self, ys, ydots, buffers) -> tuple:
        check_no_hidden_inputs(self.name, ys, self.grad_mode)
        for real, updated in zip(self.buffers, buffers, strict=True):
            if updated is not real and not updated.to(real.dtype).equal(real):
                real.copy_(updated)  # the state one plain call leaves (e.g. running statistics)
        check_strided(self.name, ys)
        self.n_out = len(ys)
        self.diff_out = [i for i, y in enumerate(ys) if y.is_floating_point() or y.is_complex()]
        ydots = [ydots[i] for i in self.diff_out]
        check_finite(self.name, [ys[i] for i in self.diff_out], ydots, self.diff_out)
        if not self.empty:  # (nothing was pushed: the strategy has no state to finish)
            self.strategy_state = self.strategy.finish(self, self.strategy_state, ydots)
        stats = self.stats
        stats.output_numel = sum(ys[i].numel() for i in self.diff_out)
        saved = sum(t.numel() * t.element_size() for t in ydots)
        # ... plus input tangents a strategy keeps for backward instead of regenerating them
        saved += sum(t.numel() * t.element_size() for t in self.strategy_state.kept() if t is not None)
        if stats.predicted:
            saved = (stats.tangents or 0) * sum(ys[i].numel() * ys[i].element_size() for i in self.diff_out)
        stats.saved_bytes = saved
        if self.fallbacks:
            stats.fallbacks = sorted(self.fallbacks)
        # n counts the inputs the body reads only (a strategy that never asks, or watches, leaves them all read)
        used = zip(self.diff_tensors, self.used, strict=True)
        stats.differentiated_numel = sum(t.numel() for t, u in used if u)
        return (*ys, *ydots)

    def begin_pass(self) -> None:
        """Every pass after the first starts from the RNG states the first one started from."""
        if self.passes:
            self.snapshot.restore()
        self.passes += 1

    def plain_pass(self, tensors: Sequence[torch.Tensor]):
        """One pass without tangents: ``(ys, empty ydots, buffers)`` (nothing to push, or sizes only)."""
        self.begin_pass()
        ys = self._call(tensors, [tensors[i] for i in self.diff], self._pass_buffers())
        return ys, [y.new_zeros((0, *y.shape)) for y in ys], self.buffers

    def _forward(self, tensors: Sequence[torch.Tensor]):
        diff_tensors = self.diff_tensors = [tensors[i] for i in self.diff]
        n = sum(t.numel() for t in diff_tensors)
        stats = self.stats
        stats.differentiated_numel = n
        stats.activation_numel = sum(t.numel() for t, a in zip(diff_tensors, self.activation, strict=True) if a)
        self.strategy_state = NO_STATE
        self.empty = n == 0
        if n == 0:  # e.g. an empty batch: nothing to push; every gradient is an (empty) zero
            stats.tangents = 0
            return self.plain_pass(tensors)
        passes, self.strategy_state = self.strategy.push(self, tensors, diff_tensors, n)
        return passes


# Runs of a segment's passes before giving up on ops that drop tangents (each run routes those it finds).
_ATTEMPTS = 4
