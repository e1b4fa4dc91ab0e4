"""The forward-mode engine: a segment run as an autograd.Function whose backward is forward mode.

``forward`` computes the primal output ``y`` and output tangents ``ydot_j = J v_j`` (vmap over jvp)
for tangents seeded on every input leaf that needs a gradient; ``backward(ybar)`` contracts
``s_j = <ydot_j, ybar>`` and returns ``scale * sum_j s_j v_j`` to those leaves. Outer autograd (or
torch.func.grad) carries cotangents between segments in any order, so no glue layers are needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from torch.func import jvp, vmap

from . import _context
from ._checks import (
    _check_not_mutated,
    _common_device,
    _differentiated_per_argument,
    _flatten_output,
    _is_batched,
    _math_attention,
    _needs_grad,
    _refuse_higher_order,
    _translate_error,
    _versions,
    run_reverse,
)
from ._plan import Exact, Random, Strategy
from ._tangents import LazySeeds, basis_block, draw_leaf, draw_seed, draw_tangents, group_leaves

__all__ = ["run_forward"]


def _seed_for(name: str) -> int:
    try:
        return draw_seed()
    except RuntimeError as error:
        if "vmap" not in str(error):
            raise
        raise RuntimeError(
            f"segment {name!r}: a Random strategy under torch.func.vmap needs vmap(..., randomness='same') "
            "(one set of tangents shared by the whole vmapped batch); with randomness='error' or 'different' "
            "madfunc cannot draw them. Or use Exact() / Reverse() for per-example gradients."
        ) from error


class _Engine:
    """Everything one forward-segment call needs, passed to the autograd.Function as a constant."""

    def __init__(
        self,
        name: str,
        strategy: Strategy,
        fn: Callable[..., Any],
        leaves: list[Any],
        spec: Any,
        tensor_positions: list[int],
        diff: list[int],
        record: _context.SegmentCall,
    ) -> None:
        self.name = name
        self.strategy = strategy
        self.fn = fn
        self.leaves = leaves
        self.spec = spec
        self.tensor_positions = tensor_positions
        self.diff = diff  # indices into the tensors passed to apply
        self.record = record
        self.seed = _seed_for(name) if isinstance(strategy, Random) else None
        self.out_spec: Any = None
        self.n_out = 0
        self.float_out: list[int] = []

    # -- the computation -------------------------------------------------------------------------
    def _call(self, tensors: Sequence[torch.Tensor], diff_values: Sequence[torch.Tensor]) -> tuple:
        leaves = list(self.leaves)
        for pos, t in zip(self.tensor_positions, tensors, strict=False):
            leaves[pos] = t
        for i, value in zip(self.diff, diff_values, strict=False):
            leaves[self.tensor_positions[i]] = value
        args, kwargs = optree.tree_unflatten(self.spec, leaves)
        with _context.inside_forward_segment(self.name), _math_attention():
            out = self.fn(*args, **kwargs)
        out_leaves, out_spec = _flatten_output(self.name, out)
        self.out_spec = out_spec
        return tuple(out_leaves)

    def _push(self, tensors, which: Sequence[int], tangents: Sequence[torch.Tensor], chunk: int | None):
        """Primal outputs and output tangents for tangent batches ``tangents`` seeded on leaves ``which``."""

        def single(*tangent):
            def f(*xs):
                values = [tensors[i] for i in self.diff]
                for j, x in zip(which, xs, strict=False):
                    values[self.diff.index(j)] = x
                return self._call(tensors, values)

            return jvp(f, tuple(tensors[i] for i in which), tangent)

        if tangents[0].shape[0] == 1:  # one tangent: a vmap of size 1 would only add overhead
            ys, ydots = single(*(t[0] for t in tangents))
            return ys, tuple(d.unsqueeze(0) for d in ydots)
        # out_dims=0 for the primal too: under an outer vmap (per-example gradients) it may carry our
        # batch level; when it does not, vmap returns an expanded view, and [0] undoes that for free.
        ys, ydots = vmap(single, in_dims=0, out_dims=0, chunk_size=chunk)(*tangents)
        return tuple(y[0] for y in ys), ydots

    def _push_lazy(self, tensors, device: torch.device) -> tuple[tuple, list[torch.Tensor]] | None:
        """Random tangents seeded where each leaf is first used (see LazySeeds); None if a leaf was
        never reached through a torch function or is returned as it is, or if the segment ran an
        in-place op (then the caller seeds eagerly, which is always right)."""
        strategy = self.strategy
        assert isinstance(strategy, Random)
        k = strategy.k
        values = [tensors[i] for i in self.diff]

        def make(index: int) -> torch.Tensor:
            leaf = values[index]
            return draw_leaf(strategy.distribution, k, leaf.shape, leaf.dtype, device, self.seed, index)

        token = torch.zeros(k, device=device)
        modes: list[LazySeeds] = []

        returned_leaf = [False]

        def single(direction: torch.Tensor) -> tuple:
            def f(tok: torch.Tensor) -> tuple:
                mode = LazySeeds(values, tok, make)
                modes.append(mode)
                with mode:
                    outs = self._call(tensors, values)
                # A leaf returned as it is never passed through an op, so it carries no tangent here.
                returned_leaf[0] |= any(o is v for o in outs for v in values)
                return outs

            return jvp(f, (token,), (direction,))

        if k == 1:
            ys, ydots = single(torch.ones(1, device=device))
            ydots = tuple(d.unsqueeze(0) for d in ydots)
        else:  # randomness="same": tangents are drawn once, outside the batch of k directions
            ys, ydots = vmap(single, out_dims=0, randomness="same")(torch.eye(k, device=device))
            ys = tuple(y[0] for y in ys)
        if returned_leaf[0] or any(len(mode.seeded) < len(values) or mode.saw_inplace for mode in modes):
            return None
        return ys, list(ydots)

    def forward(self, tensors: Sequence[torch.Tensor]) -> tuple:
        before = _versions(tensors)
        try:
            ys, ydots = self._forward(tensors)
        except (NotImplementedError, RuntimeError) as error:
            translated = _translate_error(self.name, error)
            if translated is None:
                raise
            raise translated from error
        _check_not_mutated(self.name, tensors, before)
        self.n_out = len(ys)
        self.float_out = [i for i, y in enumerate(ys) if y.is_floating_point()]
        ydots = [ydots[i] for i in self.float_out]
        self._check_finite(ys, ydots)
        stats = self.record.stats
        stats["output_numel"] = sum(ys[i].numel() for i in self.float_out)
        stats["saved_bytes"] = sum(t.numel() * t.element_size() for t in ydots)
        return (*ys, *ydots)

    def _forward(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, list[torch.Tensor]]:
        diff_tensors = [tensors[i] for i in self.diff]
        n = sum(t.numel() for t in diff_tensors)
        stats = self.record.stats
        stats["differentiated_numel"] = n
        if isinstance(self.strategy, Random):
            strategy = self.strategy
            if strategy.distribution == "orthogonal" and strategy.k > n:
                raise ValueError(
                    f"segment {self.name!r}: Random(k={strategy.k}, distribution='orthogonal') needs k <= n, "
                    f"the number of differentiated scalars, which is {n}; use k <= {n} (k == {n} is exact)."
                )
            stats["tangents"] = strategy.k
            device = _common_device(self.name, diff_tensors)
            tangent_bytes = strategy.k * sum(t.numel() * t.element_size() for t in diff_tensors)
            lazy_wanted = strategy.seeding == "lazy" or (
                strategy.seeding == "auto" and tangent_bytes >= LAZY_SEEDING_BYTES
            )
            if strategy.distribution != "orthogonal" and lazy_wanted:
                lazy = self._push_lazy(tensors, device)
                if lazy is not None:
                    return lazy
            tangents = draw_tangents(
                strategy.distribution,
                strategy.k,
                [t.shape for t in diff_tensors],
                [t.dtype for t in diff_tensors],
                device,
                self.seed,
            )
            ys, ydots = self._push(tensors, self.diff, tangents, None)
            return ys, list(ydots)
        assert isinstance(self.strategy, Exact)
        stats["tangents"] = n
        chunk = self.strategy.chunk_size
        ys = None
        per_leaf: list[tuple] = []
        # Lazy seeding: one group of leaves at a time, so forward AD does no tangent work before the
        # group's first use; small leaves (biases) ride along with their neighbour (see group_leaves).
        for group in group_leaves([tensors[i].numel() for i in self.diff], chunk):
            which = [self.diff[g] for g, _, _ in group]
            count = sum(stop - start for _, start, stop in group)
            self._check_basis_size(tensors, which, count)
            ys, ydots = self._push(tensors, which, basis_block(tensors, which, group, count), None)
            per_leaf.append(ydots)
        ydots = [torch.cat(parts) if len(per_leaf) > 1 else parts[0] for parts in zip(*per_leaf, strict=False)]
        return ys, ydots

    def _check_basis_size(self, tensors: Sequence[torch.Tensor], which: Sequence[int], count: int) -> None:
        """Refuse, before allocating, an Exact basis block that could not fit (rather than dying of OOM)."""
        nbytes = count * sum(tensors[i].numel() * tensors[i].element_size() for i in which)
        if nbytes > EXACT_BASIS_BYTES:
            raise MemoryError(
                f"segment {self.name!r}: Exact() would push {count} basis tangents at once, "
                f"{nbytes / 2**30:.1f} GiB for the tangents alone (and {count} times the segment's activations). "
                f"Bound it with Exact(chunk_size=...) (each leaf's n tangents are then pushed chunk_size at a "
                "time), or use Random(k) / Reverse() for a segment this large."
            )

    def _check_finite(self, ys: Sequence[torch.Tensor], ydots: Sequence[torch.Tensor]) -> None:
        """Non-finite output tangents poison every differentiated input's gradient: refuse them.

        In forward mode one NaN/inf entry of ``J v_j`` makes ``s_j = <J v_j, ybar>`` NaN (0 * inf = NaN
        even where ``ybar`` is 0), so unlike backprop no gradient entry would survive.
        """
        for i, ydot in zip(self.float_out, ydots, strict=False):
            y = ys[i]
            if _is_batched(y) or _is_batched(ydot):
                continue  # data-dependent checks cannot run under vmap
            finite = torch.isfinite(ydot)
            if bool(finite.all()):
                continue
            bad = ~finite
            at_finite = bad & torch.isfinite(y)
            if bool(at_finite.any()):
                raise FloatingPointError(
                    f"segment {self.name!r}: forward mode produced non-finite output tangents where the "
                    f"output itself is finite (output leaf {i}, {int(at_finite.sum())} entries). Some ops' "
                    "forward-mode rules give NaN where backprop is finite (e.g. LPPool or sqrt at 0). "
                    f"Mark the op rev(), or give segment {self.name!r} the strategy Reverse()."
                )
            raise FloatingPointError(
                f"segment {self.name!r}: its output has non-finite entries (output leaf {i}, e.g. log(0) or "
                "a division by zero) and so do its output tangents there. In forward mode these make the "
                "gradient of every differentiated input NaN (0 * inf = NaN), even where backprop's stays "
                f"finite. Keep the output finite (clamp or mask before the op), or give segment {self.name!r} "
                "the strategy Reverse()."
            )

    # -- the backward contraction ----------------------------------------------------------------
    def backward(self, ydots: Sequence[torch.Tensor], tensors_meta, grads: Sequence[torch.Tensor]) -> list:
        s = None
        for i, ydot in zip(self.float_out, ydots, strict=False):
            ybar = grads[i]
            if ybar is None:
                continue
            acc = _accumulation_dtype(ydot.dtype)
            term = ydot.reshape(ydot.shape[0], -1).to(acc) @ ybar.reshape(-1).to(acc)
            s = term if s is None else s + term.to(s.dtype)
        shapes = [meta[0] for meta in tensors_meta]
        dtypes = [meta[1] for meta in tensors_meta]
        if s is None:
            return [
                torch.zeros(shape, dtype=dtype, device=meta[2])
                for shape, dtype, meta in zip(shapes, dtypes, tensors_meta, strict=False)
            ]
        if isinstance(self.strategy, Exact):
            pieces = torch.split(s, [math.prod(shape) for shape in shapes])
            return [p.reshape(shape).to(dtype) for p, shape, dtype in zip(pieces, shapes, dtypes, strict=False)]
        strategy = self.strategy
        assert isinstance(strategy, Random)
        coef = s * (1.0 / strategy.k)  # scale the k coefficients, not the n-element gradients
        if strategy.distribution == "orthogonal":  # orthogonal jointly over all leaves: drawn together
            tangents = draw_tangents(strategy.distribution, strategy.k, shapes, dtypes, s.device, self.seed)
            return [_combine(coef, v, dtype, reuse=False) for v, dtype in zip(tangents, dtypes, strict=False)]
        # Regenerate one leaf at a time (each has its own stream), so at most one leaf's tangents
        # exist next to the gradients.
        return [
            _combine(
                coef, draw_leaf(strategy.distribution, strategy.k, shape, dtype, s.device, self.seed, index), dtype
            )
            for index, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=False))
        ]


# Random tangents this large (k x the differentiated inputs) are seeded lazily, where each leaf is first
# used, so that they need not all exist at once: memory then stops growing with the number of leaves
# (benchmarks/RESULTS.md, target 5). Below it, eager seeding is faster: lazy seeding costs an extra
# pass over every leaf (the seeding op) and a Python hook on every op of the segment.
LAZY_SEEDING_BYTES = 32 * 2**20
# The largest block of Exact basis tangents pushed at once before we refuse (see _check_basis_size).
EXACT_BASIS_BYTES = 2 * 2**30


def _combine(coef: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, reuse: bool = True) -> torch.Tensor:
    """``sum_j coef_j v_j`` for tangents ``v`` of shape ``(k, *shape)``, as ``dtype``; with ``reuse``
    (``v`` is a fresh tensor of our own), it may be overwritten."""
    acc = _accumulation_dtype(v.dtype)
    if reuse and v.shape[0] == 1 and acc == v.dtype and not _is_batched(coef):
        return v[0].mul_(coef[0].to(acc))  # in place: the regenerated tangent becomes the gradient
    return torch.tensordot(coef.to(acc), v.to(acc), dims=1).to(dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
        non_float = [output[i] for i in range(engine.n_out) if i not in engine.float_out]
        ctx.mark_non_differentiable(*ydots, *non_float)

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
        ydots = ctx.saved_tensors
        diff_grads = engine.backward(ydots, ctx.meta, grads[: engine.n_out])
        result: list[torch.Tensor | None] = [None] * ctx.n_tensors
        for i, g in zip(engine.diff, diff_grads, strict=False):
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
) -> Any:
    """Run segment ``fn`` in forward mode under ``strategy`` and return its output pytree.

    With ``measure`` (diagnostics), also record the differentiated sizes per argument.
    """
    leaves, spec = optree.tree_flatten((args, kwargs))
    tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    tensors = [leaves[i] for i in tensor_positions]
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
    engine = _Engine(name, strategy, fn, leaves, spec, tensor_positions, diff, record)
    outputs = _ForwardSegment.apply(engine, *tensors)
    return optree.tree_unflatten(engine.out_spec, list(outputs[: engine.n_out]))
