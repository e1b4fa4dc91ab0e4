"""Randomness: the model's own draws inside forward segments, and the tangents' separate stream.

Two promises (docs/guides/randomness.md):

1. A forward segment computes exactly what a plain call computes, *including its random draws*
   (dropout masks, ``torch.randn`` in the body): one draw per call, shared by the primal and every
   tangent. The engine runs the body several times (one pass per leaf group for ``Exact``, a lazy then
   an eager try for ``Random``), so :class:`Snapshot` saves torch's RNG states on entry, restores them
   before every pass after the first, and so leaves them where one plain pass leaves them. Vmapped passes
   run with ``randomness="same"`` (one draw for the whole tangent batch, the same one a plain call makes).

2. Tangents come from a stream the model cannot freeze or shift. :class:`TangentStream` gives each
   transform call (one ``mixed_grad`` call, one ``use_plan`` block) a base seed derived from the state of
   torch's default generator *at entry*, without drawing from it, so the model's own draws inside the
   call are those of a plain call. Only on exit, and only if a ``Random`` segment ran, does it advance
   torch's default generator by one 64-bit draw, so that the next call's tangents are fresh. A model
   that calls ``torch.manual_seed`` inside its forward would make every call start from the same state;
   a counter of calls entered exactly where the previous one left off keeps those tangents fresh too.
   With an explicit ``generator``, one number is drawn from it per call and torch's generator is untouched.
"""

from __future__ import annotations

import torch

from madfunc.engine.state import State
from madfunc.strategies.tangents import leaf_seed

__all__ = ["Snapshot", "TangentStream"]


def _vmap_error(where: str) -> RuntimeError:
    return RuntimeError(
        f"{where}: a Random strategy under torch.func.vmap needs vmap(..., randomness='same') (one set of "
        "tangents shared by the whole vmapped batch); with randomness='error' or 'different' madfunc cannot "
        "draw them. Or use Exact() / Reverse() for per-example gradients."
    )


class Snapshot:
    """torch's RNG states (CPU, and each CUDA device in ``devices``) at one moment, restorable; with
    ``state``, also the Python objects the body reaches (``_state.State``), so every pass starts from the
    state before the call. ``dirty``: a restore found that a pass had changed that state."""

    __slots__ = ("cpu", "cuda", "state", "dirty")

    def __init__(self, devices: set[torch.device], state: State | None = None) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
        self.state = state
        self.dirty = False

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)
        self.restore_state()

    def restore_state(self) -> None:
        if self.state is not None and self.state.restore():
            self.dirty = True


class TangentStream:
    """The base seed of one transform call's tangents; see the module docstring."""

    # The default generator's state where the last call that drew tangents left it, and how many calls
    # in a row began exactly there (process-wide, like torch's default generator itself).
    _last_exit: torch.Tensor | None = None
    _repeats = 0

    def __init__(self, where: str, generator: torch.Generator | None = None) -> None:
        self.where = where
        self.generator = generator
        # Captured before the model runs: its own draws (or re-seeding) must not decide the tangents.
        self.entry = torch.get_rng_state() if generator is None else None
        self._base: int | None = None
        self._calls = 0

    def segment_seed(self, segment: str) -> int:
        """The seed of the next Random segment call in this transform call (distinct per call)."""
        if self._base is None:
            try:
                self._base = self._draw_base()
            except RuntimeError as error:
                if "vmap" not in str(error):
                    raise
                raise _vmap_error(f"segment {segment!r}") from error
        self._calls += 1
        return leaf_seed(self._base, self._calls)

    def _draw_base(self) -> int:
        if self.generator is not None:
            return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=self.generator))
        entry = self.entry
        assert entry is not None  # (taken whenever there is no generator of its own)
        cls = TangentStream
        last = cls._last_exit
        cls._repeats = cls._repeats + 1 if last is not None and torch.equal(last, entry) else 0
        # A private copy of the entry state: the same state gives the same base, and the default
        # generator itself is not advanced here (the model's draws stay those of a plain call).
        copy = torch.Generator()
        copy.set_state(entry)
        drawn = int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=copy))
        return leaf_seed(drawn, cls._repeats)

    def finish(self) -> None:
        """On leaving the transform call: advance torch's generator once if tangents were drawn."""
        if self._base is None or self.generator is not None:
            return
        try:
            torch.randint(0, 2**62, (), dtype=torch.int64)
        except RuntimeError as error:
            if "vmap" not in str(error):
                raise
            raise _vmap_error(self.where) from error
        TangentStream._last_exit = torch.get_rng_state()
