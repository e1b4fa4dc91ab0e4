"""One eager tangent pass of a forward segment: the body under ``jvp``, vmapped over the tangent batch.

The engine (``runner.Engine``) decides which passes run and keeps their bookkeeping; this module runs one:
``push_pass`` under the op seam (or bare, once the seam met no op that needed it), with the all-zero
check and the recovery of ``passes`` (a strict pass that finds ops dropping tangents), and ``push_loop``,
one tangent at a time where vmap cannot batch the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.func import vmap

from madfunc.engine.passes import (
    BARE,
    Bare,
    all_zero_tangents,
    batching_warnings,
    diagnosed,
    vmap_may_be_at_fault,
    warn_loop,
)
from madfunc.ops.rules import OpRules, seam_pays

__all__ = ["PassRunner"]


class PassRunner:
    """The eager passes of one segment call; ``runner.Engine`` derives from it and provides the body.

    The attributes and methods declared here are the engine's (set in ``Engine.__init__``): they are what a
    pass reads and updates."""

    name: str
    diff: list[int]
    used: list[bool]
    fallbacks: set[str]
    bare: bool  # later passes of this call may skip the op seam
    untouched: bool = False  # the last pass under the seam met no rule, fallback or custom Function
    op_count: int = 0  # torch calls of the body in the last pass under the seam (a recording's size: _replay)
    clean: bool  # the last eager pass met no rule, fallback or dropped tangent
    plain_call: bool
    snapshot: Any  # rng.Snapshot, restored before a pass that repeats an earlier one

    def seeded_call(self, tensors: Sequence[torch.Tensor], which: Sequence[int], seeded: Sequence[torch.Tensor],
                    buffers: list[torch.Tensor]) -> tuple:
        raise NotImplementedError

    def push(self, tensors: Sequence[torch.Tensor], which: Sequence[int], tangents: Sequence[torch.Tensor], *,
             watch: bool = False, diagnose: Sequence[int] = (), check: bool = True, record: bool = True) -> Any:
        raise NotImplementedError

    def _jvp(self, body: Any, primals: tuple, tangents: tuple, buffers: list[torch.Tensor]) -> tuple:
        raise NotImplementedError

    def _pass_buffers(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _zero_key(self, which: Sequence[int]) -> tuple:
        raise NotImplementedError

    def _push_pass(self, tensors, which, tangents, watch: bool, diagnose, bare: bool, check: bool = True):
        buffers = self._pass_buffers()
        rules: list[OpRules | Bare] = []

        def single(*tangent):
            def body(*seeded, passed):
                mode = BARE if bare else OpRules(self.name, seeded if watch else (), strict=bool(diagnose),
                                                 plain_rng=self.plain_call)
                rules.append(mode)
                with mode:
                    outs = self.seeded_call(tensors, which, seeded, passed)
                if diagnose:
                    diagnosed(self._zero_key(which), diagnose, mode.learned)  # Retry if it routed an op
                return outs

            return self._jvp(body, tuple(tensors[i] for i in which), tangent, buffers)

        count = tangents[0].shape[0]
        if count == 1:  # one tangent: a vmap of size 1 would only add overhead
            ys, ydots = single(*(t[0] for t in tangents))
            ydots = tuple(d.unsqueeze(0) for d in ydots)
        else:
            # out_dims=0 for the primal too: under an outer vmap (per-example gradients) it may carry our
            # batch level; when it does not, vmap returns an expanded view, and [0] undoes that for free.
            # randomness="same": one draw for the whole tangent batch, the one a plain call makes.
            try:
                with batching_warnings(self.name):
                    ys, ydots = vmap(single, in_dims=0, out_dims=0, randomness="same")(*tangents)
            except (RuntimeError, NotImplementedError) as error:
                if bare or not vmap_may_be_at_fault(error):
                    raise  # (a bare pass that fails runs again under the seam first: see _push)
                result = self._push_loop(tensors, which, tangents, watch)
                warn_loop(self.name, count, error)  # only once it worked: a failure says enough
                return result
            ys = tuple(y[0] for y in ys)
        suspicious = all_zero_tangents(self._zero_key(which), ys, ydots) if check else []
        if suspicious:  # a dropped tangent comes back as zeros: look closer, once
            self.snapshot.restore()
            self.push(tensors, which, [t[:1] for t in tangents], watch=watch, diagnose=suspicious)
        self.fallbacks.update(*(mode.fallbacks for mode in rules))
        if not bare:
            self.untouched = not any(mode.touched for mode in rules)
            # (a body whose arithmetic with numbers the seam runs faster keeps it: rules.seam_pays)
            self.bare = self.untouched and not seam_pays(rules)
            self.op_count = max((getattr(mode, "calls", 0) for mode in rules), default=0)
        self.clean = self.untouched and not self.fallbacks and check
        if watch:
            used = set().union(*(mode.used for mode in rules))
            for slot, j in enumerate(which):
                if slot not in used:
                    self.used[self.diff.index(j)] = False
        return ys, list(ydots), buffers

    def _push_loop(self, tensors, which, tangents, watch: bool):
        """The pass vmap could not batch, one tangent at a time (each from the same RNG state)."""
        parts = []
        for j in range(tangents[0].shape[0]):
            self.snapshot.restore()
            # One basis tangent may well give zeros: the all-zero check belongs to the whole batch (below).
            ys, ydots, buffers = self.push(tensors, which, [t[j : j + 1] for t in tangents], watch=watch, check=False)
            parts.append(ydots)
        ydots = [torch.cat(p) for p in zip(*parts, strict=True)]
        suspicious = all_zero_tangents(self._zero_key(which), ys, ydots)
        if suspicious:
            self.snapshot.restore()
            self.push(tensors, which, [t[:1] for t in tangents], watch=watch, diagnose=suspicious)
        return ys, ydots, buffers
