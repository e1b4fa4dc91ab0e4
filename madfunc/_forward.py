"""The forward-mode engine: a segment run as an autograd.Function whose backward is forward mode.

``forward`` computes the primal output ``y`` and output tangents ``ydot_j = J v_j`` (vmap over jvp)
for tangents seeded on every input leaf that needs a gradient; ``backward(ybar)`` contracts
``s_j = <ydot_j, ybar>`` and combines (``_contract``). Outer autograd (or torch.func.grad) carries
cotangents between segments in any order, so no glue layers are needed.

The body may run several times (``Exact``: one pass per leaf group; ``Random``: a lazy try, then an
eager pass). Each pass must see what one plain call sees: torch's RNG states are restored before it
(``_rng.Snapshot``), module buffers are fresh copies (``_captured``), grad mode is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from torch.func import jvp, vmap

from . import _context
from ._captured import Captured, discover
from ._checks import (
    _check_not_mutated,
    _common_device,
    _differentiated_per_argument,
    _flatten_output,
    _needs_grad,
    _refuse_higher_order,
    _translate_error,
    _versions,
    run_reverse,
)
from ._contract import combine, contract
from ._guards import (
    EXACT_WARN_TANGENTS,
    check_basis_size,
    check_finite,
    check_no_hidden_inputs,
    hidden_input_error,
    warn_exact_cost,
)
from ._ops import OpRules, reference_kernels
from ._plan import Exact, Random, Strategy
from ._rng import Snapshot
from ._tangents import LazySeeds, basis_block, draw_leaf, draw_tangents, group_leaves

__all__ = ["run_forward"]

# Random tangents this large (k x the differentiated inputs) are seeded lazily, where each leaf is first
# used, so that they need not all exist at once: memory then stops growing with the number of leaves
# (benchmarks/RESULTS.md, target 5). Below it, eager seeding is faster: lazy seeding costs an extra
# pass over every leaf (the seeding op) and a Python hook on every op of the segment.
LAZY_SEEDING_BYTES = 32 * 2**20


class _Engine:
    """Everything one forward-segment call needs, passed to the autograd.Function as a constant.

    The tensors given to ``apply`` are the segment's argument tensors followed by the differentiable
    tensors it reads from outside its arguments (``captured``); ``diff`` indexes those that get tangents.
    """

    def __init__(self, name, strategy, fn, leaves, spec, positions, captured, diff, record, seed, measure) -> None:
        self.name = name
        self.strategy = strategy
        self.fn = fn
        self.leaves = leaves
        self.spec = spec
        self.positions = positions  # where the argument tensors sit among ``leaves``
        self.captured: Captured = captured
        self.diff = diff
        self.record = record
        self.seed = seed
        self.measure = measure  # inspect: report a costly Exact segment's size instead of computing it
        self.grad_mode = torch.is_grad_enabled()
        self.out_spec: Any = None
        self.n_out = 0
        self.diff_out: list[int] = []
        self.used: list[bool] = [True] * len(diff)
        self.fallbacks: set[str] = set()
        # Module buffers may be updated in place (BatchNorm's running statistics and batch counter).
        # torch.func forbids mutating a tensor captured from outside a transform, so they enter each pass
        # as jvp primals (zero tangent); jvp takes only floating primals, so integer counters travel as
        # float64 (exact below 2**53). Every pass gets fresh copies of the values on entry.
        self.buffers = captured.buffer_tensors()
        self.float_buffers = [i for i, b in enumerate(self.buffers) if b.dtype != torch.bool]

    # -- the computation -------------------------------------------------------------------------
    def _call(self, tensors: Sequence[torch.Tensor], diff_values: Sequence[torch.Tensor], buffers) -> tuple:
        values = list(tensors)
        for i, value in zip(self.diff, diff_values, strict=True):
            values[i] = value
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
        out_leaves, out_spec = _flatten_output(self.name, out)
        self.out_spec = out_spec
        return tuple(out_leaves)

    def _pass_buffers(self) -> list[torch.Tensor]:
        return [
            b if b.dtype == torch.bool else b.clone() if b.is_floating_point() or b.is_complex() else b.double()
            for b in self.buffers
        ]

    def _push(self, tensors, which: Sequence[int], tangents: Sequence[torch.Tensor], watch: bool = False):
        """Primal outputs and output tangents for tangent batches ``tangents`` seeded on leaves ``which``.

        Returns ``(ys, ydots, buffers)``: ``buffers`` are the module buffers as the pass left them.
        """
        buffers = self._pass_buffers()
        primal_buffers = [buffers[i] for i in self.float_buffers]
        rules: list[OpRules] = []

        def single(*tangent):
            def f(*xs):
                seeded = xs[: len(which)]
                passed = list(buffers)
                for i, b in zip(self.float_buffers, xs[len(which) :], strict=True):
                    passed[i] = b
                values = [tensors[i] for i in self.diff]
                for j, x in zip(which, seeded, strict=True):
                    values[self.diff.index(j)] = x
                mode = OpRules(self.name, seeded if watch else ())
                rules.append(mode)
                with mode:
                    return self._call(tensors, values, passed)

            primals = (*(tensors[i] for i in which), *primal_buffers)
            zeros = tuple(torch.zeros_like(b) for b in primal_buffers)
            return jvp(f, primals, (*tangent, *zeros))

        if tangents[0].shape[0] == 1:  # one tangent: a vmap of size 1 would only add overhead
            ys, ydots = single(*(t[0] for t in tangents))
            ydots = tuple(d.unsqueeze(0) for d in ydots)
        else:
            # out_dims=0 for the primal too: under an outer vmap (per-example gradients) it may carry our
            # batch level; when it does not, vmap returns an expanded view, and [0] undoes that for free.
            # randomness="same": one draw for the whole tangent batch, the one a plain call makes.
            ys, ydots = vmap(single, in_dims=0, out_dims=0, randomness="same")(*tangents)
            ys = tuple(y[0] for y in ys)
        self.fallbacks.update(*(mode.fallbacks for mode in rules))
        if watch:
            used = set().union(*(mode.used for mode in rules))
            for slot, j in enumerate(which):
                if slot not in used:
                    self.used[self.diff.index(j)] = False
        return ys, list(ydots), buffers

    def _push_lazy(self, tensors, device: torch.device):
        """Random tangents seeded where each leaf is first used (see LazySeeds); None if a leaf is
        returned as it is, or if the segment ran an in-place op (then the caller seeds eagerly)."""
        strategy = self.strategy
        k = strategy.k
        values = [tensors[i] for i in self.diff]
        buffers = self._pass_buffers()

        def make(index: int) -> torch.Tensor:
            leaf = values[index]
            return draw_leaf(strategy.distribution, k, leaf.shape, leaf.dtype, device, self.seed, index)

        token = torch.zeros(k, device=device)
        modes: list[LazySeeds] = []
        rules: list[OpRules] = []
        returned_leaf = [False]

        def single(direction: torch.Tensor) -> tuple:
            def f(tok: torch.Tensor, *primal_buffers: torch.Tensor) -> tuple:
                passed = list(buffers)
                for i, b in zip(self.float_buffers, primal_buffers, strict=True):
                    passed[i] = b
                mode, rule = LazySeeds(values, tok, make), OpRules(self.name)
                modes.append(mode)
                rules.append(rule)
                with mode, rule:
                    outs = self._call(tensors, values, passed)
                # A leaf returned as it is never passed through an op, so it carries no tangent here.
                returned_leaf[0] |= any(o is v for o in outs for v in values)
                return outs

            primal_buffers = [buffers[i] for i in self.float_buffers]
            zeros = tuple(torch.zeros_like(b) for b in primal_buffers)
            return jvp(f, (token, *primal_buffers), (direction, *zeros))

        if k == 1:
            ys, ydots = single(torch.ones(1, device=device))
            ydots = tuple(d.unsqueeze(0) for d in ydots)
        else:  # randomness="same": tangents (and the body's own draws) once, outside the batch of k directions
            ys, ydots = vmap(single, out_dims=0, randomness="same")(torch.eye(k, device=device))
            ys = tuple(y[0] for y in ys)
        if returned_leaf[0] or any(mode.saw_inplace for mode in modes):
            return None
        self.fallbacks.update(*(rule.fallbacks for rule in rules))
        seeded = set().union(*(mode.seeded for mode in modes))
        self.used = [i in seeded for i in range(len(values))]
        return ys, list(ydots), buffers

    def forward(self, tensors: Sequence[torch.Tensor]) -> tuple:
        # Detached: with the caller's grad mode on inside the body, autograd must not record the body's
        # work on the inputs (forward mode carries the derivative; recording would keep activations).
        tensors = [t.detach() for t in tensors]
        before = _versions(tensors)
        self.snapshot = Snapshot({t.device for t in tensors})
        self.passes = 0
        try:
            ys, ydots, buffers = self._forward(tensors)
        except (NotImplementedError, RuntimeError) as error:
            if "wrapper == nullptr" in str(error):  # a grad-level tensor read from outside the arguments
                raise hidden_input_error(self.name) from error
            translated = _translate_error(self.name, error)
            if translated is None:
                raise  # ForwardModeError from the op seam, or an error that says what to do already
            raise translated from error
        _check_not_mutated(self.name, tensors, before)
        check_no_hidden_inputs(self.name, ys, self.grad_mode)
        for real, updated in zip(self.buffers, buffers, strict=True):
            if updated is not real and not updated.to(real.dtype).equal(real):
                real.copy_(updated)  # the state one plain call leaves (e.g. running statistics)
        self.n_out = len(ys)
        self.diff_out = [i for i, y in enumerate(ys) if y.is_floating_point() or y.is_complex()]
        ydots = [ydots[i] for i in self.diff_out]
        check_finite(self.name, [ys[i] for i in self.diff_out], ydots, self.diff_out)
        stats = self.record.stats
        stats["output_numel"] = sum(ys[i].numel() for i in self.diff_out)
        stats["saved_bytes"] = sum(t.numel() * t.element_size() for t in ydots)
        if stats.get("predicted"):
            stats["saved_bytes"] = stats["tangents"] * sum(ys[i].numel() * ys[i].element_size() for i in self.diff_out)
        if self.fallbacks:
            stats["fallbacks"] = sorted(self.fallbacks)
        if isinstance(self.strategy, Random):
            used = zip(self.diff_tensors, self.used, strict=True)
            stats["differentiated_numel"] = sum(t.numel() for t, u in used if u)  # n counts used inputs only
        return (*ys, *ydots)

    def _begin_pass(self) -> None:
        """Every pass after the first starts from the RNG states the first one started from."""
        if self.passes:
            self.snapshot.restore()
        self.passes += 1

    def _forward(self, tensors: Sequence[torch.Tensor]):
        diff_tensors = self.diff_tensors = [tensors[i] for i in self.diff]
        n = sum(t.numel() for t in diff_tensors)
        stats = self.record.stats
        stats["differentiated_numel"] = n
        if n == 0:  # e.g. an empty batch: nothing to push; every gradient is an (empty) zero
            self._begin_pass()
            ys = self._call(tensors, diff_tensors, self._pass_buffers())
            stats["tangents"] = 0
            return ys, [y.new_zeros((0, *y.shape)) for y in ys], self.buffers
        if isinstance(self.strategy, Random):
            return self._forward_random(tensors, diff_tensors, n)
        assert isinstance(self.strategy, Exact)
        stats["tangents"] = n
        if self.measure and n > EXACT_WARN_TANGENTS:
            # inspect() only needs the sizes: one plain pass, and what n tangents would keep, predicted.
            self._begin_pass()
            ys = self._call(tensors, diff_tensors, self._pass_buffers())
            stats["predicted"] = True
            return ys, [y.new_zeros((0, *y.shape)) for y in ys], self.buffers
        chunk = self.strategy.chunk_size
        per_leaf: list[list[torch.Tensor]] = []
        # Lazy seeding: one group of leaves at a time, so forward AD does no tangent work before the
        # group's first use; small leaves (biases) ride along with their neighbour (see group_leaves).
        for group in group_leaves([t.numel() for t in diff_tensors], chunk):
            which = [self.diff[g] for g, _, _ in group]
            count = sum(stop - start for _, start, stop in group)
            check_basis_size(self.name, tensors, which, count)
            self._begin_pass()
            ys, ydots, buffers = self._push(tensors, which, basis_block(tensors, which, group, count))
            per_leaf.append(ydots)
        ydots = [torch.cat(parts) if len(per_leaf) > 1 else parts[0] for parts in zip(*per_leaf, strict=True)]
        warn_exact_cost(self.name, n)  # after the passes: a refusal (check_basis_size) says more
        return ys, ydots, buffers

    def _forward_random(self, tensors, diff_tensors, n: int):
        strategy = self.strategy
        if strategy.distribution == "orthogonal" and strategy.k > n:
            raise ValueError(
                f"segment {self.name!r}: Random(k={strategy.k}, distribution='orthogonal') needs k <= n, "
                f"the number of differentiated scalars, which is {n}; use k <= {n} (k == {n} is exact)."
            )
        self.record.stats["tangents"] = strategy.k
        device = _common_device(self.name, diff_tensors)
        tangent_bytes = strategy.k * sum(t.numel() * t.element_size() for t in diff_tensors)
        lazy_wanted = strategy.seeding == "lazy" or (strategy.seeding == "auto" and tangent_bytes >= LAZY_SEEDING_BYTES)
        if strategy.distribution != "orthogonal" and lazy_wanted:
            self._begin_pass()
            lazy = self._push_lazy(tensors, device)
            if lazy is not None:
                return lazy
        tangents = draw_tangents(
            strategy.distribution, strategy.k, [t.shape for t in diff_tensors], [t.dtype for t in diff_tensors],
            device, self.seed,
        )
        self._begin_pass()
        return self._push(tensors, self.diff, tangents, watch=True)


class _ForwardSegment(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(engine: _Engine, *tensors: torch.Tensor) -> tuple:  # type: ignore[override]
        return engine.forward(tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        engine: _Engine = inputs[0]
        tensors = inputs[1:]
        ydots = output[engine.n_out :]
        ctx.engine = engine
        ctx.meta = [(tensors[i].shape, tensors[i].dtype, tensors[i].device) for i in engine.diff]
        ctx.n_tensors = len(tensors)
        ctx.save_for_backward(*ydots)
        non_diff = [output[i] for i in range(engine.n_out) if i not in engine.diff_out]
        ctx.mark_non_differentiable(*ydots, *non_diff)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise NotImplementedError(
            f"segment {ctx.engine.name!r}: forward-mode AD (torch.func.jvp/jacfwd) over a madfunc transform is "
            "not supported; madfunc gives first-order gradients only. Differentiate the plain model instead."
        )

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:  # type: ignore[override]
        engine: _Engine = ctx.engine
        _refuse_higher_order(engine.name)
        s = contract(ctx.saved_tensors, [grads[i] for i in engine.diff_out])
        diff_grads = combine(engine.strategy, engine.seed, s, ctx.meta, engine.used)
        result: list[torch.Tensor | None] = [None] * ctx.n_tensors
        for i, g in zip(engine.diff, diff_grads, strict=True):
            result[i] = g
        return (None, *result)


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
) -> Any:
    """Run segment ``fn`` in forward mode under ``strategy`` and return its output pytree.

    ``owner`` is what the user marked (the function or module, searched for captured tensors);
    ``own_module`` a module segment's module. With ``measure`` (diagnostics), also record the
    differentiated sizes per argument.
    """
    leaves, spec = optree.tree_flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    captured = discover(fn if owner is None else owner, leaves, own_module)
    tensors = [leaves[i] for i in positions] + captured.tensors()
    # Under torch.no_grad() (evaluation) nothing needs a gradient, even parameters that require one.
    diff = [j for j, t in enumerate(tensors) if _needs_grad(t)] if torch.is_grad_enabled() else []
    if any(t.is_complex() and t.requires_grad for t in tensors):
        raise TypeError(
            f"segment {name!r}: complex inputs that need gradients are not supported in forward mode; "
            "pass real and imaginary parts as separate real tensors, or mark the segment rev()."
        )
    if not diff:  # nothing upstream needs a gradient: a plain call, still a pure one
        record.stats.update(differentiated_numel=0, differentiated_per_argument={}, tangents=0, saved_bytes=0)
        with _context.inside_forward_segment(name):
            return run_reverse(name, fn, args, kwargs)
    if measure:  # a second flatten per call: only for inspect, not in every training step
        record.stats["differentiated_per_argument"] = _differentiated_per_argument(args, kwargs)
    state = _context.active()
    seed = state.tangents.segment_seed(name) if isinstance(strategy, Random) and state is not None else None
    engine = _Engine(name, strategy, fn, leaves, spec, positions, captured, diff, record, seed, measure)
    outputs = _ForwardSegment.apply(engine, *tensors)
    return optree.tree_unflatten(engine.out_spec, list(outputs[: engine.n_out]))
