"""One eager tangent pass of a forward segment: the body under ``jvp``, vmapped over the tangent batch.

The engine (``runner.Engine``) decides which passes run and keeps their bookkeeping; this module runs one:
``push_pass`` under the op seam (or bare, once the seam met no op that needed it), with the all-zero
check and the recovery of ``passes`` (a strict pass that finds ops dropping tangents), and ``push_loop``,
one tangent at a time where vmap cannot batch the body. The first eager pass after ``Engine.read_inputs``
also watches the differentiated inputs it does not seed, to check that answer (see engine/reads.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.func import vmap

from madfunc.engine import reads as _reads
from madfunc.engine.passes import (
    BARE,
    Bare,
    all_zero_tangents,
    batching_warnings,
    diagnosed,
    vmap_may_be_at_fault,
    warn_loop,
)
from madfunc.ops.rules import OpRules
from madfunc.ops.scalars import seam_pays

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
    # Per differentiated input, whether the body reads it (Engine.read_inputs), until an eager pass checked it.
    expected_reads: list[bool] | None

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

    def _after_seam(self, rules: Sequence[Any]) -> None:
        """What a pass under the op seam tells the later ones: whether they may go bare (a body whose arithmetic
        with numbers the seam runs faster keeps it: scalars.seam_pays), and its size in torch calls."""
        self.untouched = not any(mode.touched for mode in rules)
        self.bare = self.untouched and not seam_pays(rules)
        self.op_count = max((getattr(mode, "calls", 0) for mode in rules), default=0)

    def _push_pass(self, tensors, which, tangents, watch: bool, diagnose, bare: bool, check: bool = True):
        buffers = self._pass_buffers()
        rules: list[OpRules | Bare] = []
        # Checking read_inputs' answer: the inputs this pass does not seed are watched too (after the seeded).
        expected = None if bare else self.expected_reads
        others = [] if expected is None else [j for j in self.diff if j not in which]
        returned: set[int] = set()

        def single(*tangent):
            def body(*seeded, passed):
                watched = (*seeded, *(tensors[j] for j in others)) if others else seeded if watch else ()
                mode = BARE if bare else OpRules(self.name, watched, strict=bool(diagnose), plain_rng=self.plain_call)
                rules.append(mode)
                with mode:
                    outs = self.seeded_call(tensors, which, seeded, passed)
                # An input returned as it is reaches no op, yet the output's cotangent is its gradient.
                returned.update(slot for slot, j in enumerate(others) if any(o is tensors[j] for o in outs))
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
        if expected is not None:  # checked once per call: a read outside the answer runs the segment again
            self._check_reads(tensors, which, others, expected, rules, returned)
        suspicious = all_zero_tangents(self._zero_key(which), ys, ydots) if check else []
        if suspicious:  # a dropped tangent comes back as zeros: look closer, once
            self.snapshot.restore()
            self.push(tensors, which, [t[:1] for t in tangents], watch=watch, diagnose=suspicious)
        self.fallbacks.update(*(mode.fallbacks for mode in rules))
        if not bare:
            self._after_seam(rules)
        self.clean = self.untouched and not self.fallbacks and check
        if watch:
            used = set().union(*(mode.used for mode in rules))
            for slot, j in enumerate(which):
                if slot not in used:
                    self.used[self.diff.index(j)] = False
        return ys, list(ydots), buffers

    def _check_reads(self, tensors, which, others: list[int], expected: list[bool], rules: list,
                     returned: set[int]) -> None:
        """After the pass that watched the inputs it did not seed (``others``, watched after the seeded ones):
        one read outside ``expected`` (read_inputs' answer) is remembered, and the segment runs again."""
        self.expected_reads = None
        seen = set().union(*(mode.used for mode in rules)) | {len(which) + slot for slot in returned}
        read = {self.diff.index(others[slot - len(which)]) for slot in seen if slot >= len(which)}
        _reads.missed(self, tensors, expected, read)

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
