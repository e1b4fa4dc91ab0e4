"""Lazy seeding: ``k`` tangents per leaf, seeded where an op first uses the leaf (``LazySeeds``), so at most one
leaf's tangents exist at a time. One pass of an ``Engine`` (``engine``), used by ``Random``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.func import vmap

from madfunc.engine.passes import all_zero_tangents, batching_warnings, vmap_may_be_at_fault
from madfunc.ops.rules import OpRules
from madfunc.strategies.tangents import LazySeeds

__all__ = ["push_lazy"]


def push_lazy(engine: Any, tensors: Sequence[torch.Tensor], device: torch.device, k: int, make: Any):
    """``k`` tangents per leaf, ``make(index, leaf)``, seeded where each leaf is first used (see LazySeeds);
    None if a leaf is returned as it is, or if the segment ran an in-place op (then the caller seeds
    eagerly)."""
    values = [tensors[i] for i in engine.diff]
    buffers = engine._pass_buffers()

    # The jvp needs a primal of its own; the seeded leaves become duals at its level inside the body.
    anchor = torch.zeros(1, device=device)
    modes: list[LazySeeds] = []
    rules: list[OpRules] = []
    returned_leaf = [False]

    def single(pick: torch.Tensor | None) -> tuple:
        def body(_anchor: torch.Tensor, passed) -> tuple:
            mode = LazySeeds(values, pick, lambda i: make(i, values[i]))
            rule = OpRules(engine.name, plain_rng=engine.plain_call)
            modes.append(mode)
            rules.append(rule)
            with mode, rule:
                outs = engine._call(tensors, values, passed)
            # A leaf returned as it is never passed through an op, so it carries no tangent here.
            returned_leaf[0] |= any(o is v for o in outs for v in values)
            return outs

        return engine._jvp(body, (anchor,), (torch.zeros_like(anchor),), buffers)

    if k == 1:
        ys, ydots = single(None)
        ydots = tuple(d.unsqueeze(0) for d in ydots)
    else:  # randomness="same": tangents (and the body's own draws) once, outside the batch of k directions
        try:
            with batching_warnings(engine.name):
                ys, ydots = vmap(single, out_dims=0, randomness="same")(torch.arange(k, device=device))
        except (RuntimeError, NotImplementedError) as error:
            if not vmap_may_be_at_fault(error):
                raise
            return None  # the eager path pushes one tangent at a time if vmap fails there too
        ys = tuple(y[0] for y in ys)
    if returned_leaf[0] or any(mode.saw_inplace for mode in modes) or all_zero_tangents(
        engine._zero_key(engine.diff), ys, ydots
    ):
        return None  # (all-zero tangents: the eager pass looks closer)
    engine.fallbacks.update(*(rule.fallbacks for rule in rules))
    seeded = set().union(*(mode.seeded for mode in modes))
    engine.used = [i in seeded for i in range(len(values))]
    return ys, list(ydots), buffers
