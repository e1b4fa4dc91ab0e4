"""``Guessed``: forward gradients along a guessed direction (Fournier, Rivaud, Belilovsky, Eickenberg and
Oyallon, ICML 2023, "Can forward gradient match backpropagation?"), optionally completed by random ones.

With ``d`` the unit guess and ``w_j = v_j - (d . v_j) d`` random directions projected off it, the estimate is
``(g . d) d + (1/k) sum_j (g . w_j) w_j``. Its first term is the projection of ``g`` on the guess; the second
is an unbiased forward gradient of the rest, ``P g`` with ``P = I - d d^T``, since ``E[w w^T] = P``. So:

* ``k = 0``: deterministic and biased, ``g^ = (g . d) d``: cosine with ``g`` is ``cos t`` (``t`` the angle
  between guess and gradient), relative squared bias ``sin^2 t``;
* ``k >= 1``: unbiased, relative variance ``(n/k) sin^2 t`` for Gaussian ``v`` (``w`` is Gaussian in the
  ``n - 1`` dimensions orthogonal to ``d``, where a forward gradient's relative variance is ``(n-1+1)/k``)
  instead of ``(n+1)/k`` without the guess.

With ``G`` guesses (``directions=G``, e.g. one per layer) ``d d^T`` becomes ``Q Q^T``, ``Q`` an orthonormal
basis of their span (``G'`` columns): the projection is on the span, and the random part's relative variance
is ``((n - G' + 1)/k) ||P g||^2 / ||g||^2``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from madfunc.core.autocast import no_autocast, without_autocast
from madfunc.core.checks import _common_device
from madfunc.strategies.base import EngineView, Meta, Passes, SegmentStats, Shared, Strategy, StrategyState, zeros
from madfunc.strategies.random import check_distribution
from madfunc.strategies.tangents import DISTRIBUTIONS, draw_tangents

__all__ = ["Guessed"]


@dataclasses.dataclass(frozen=True)
class GuessedState(StrategyState):
    """The tangents of one ``Guessed`` call (the guesses' orthonormal rows first, then the random ones)."""

    tangents: tuple[torch.Tensor, ...] | None
    guided: int  # how many of them are guesses

    def kept(self) -> Sequence[torch.Tensor | None]:
        return self.tangents or ()


@dataclasses.dataclass(frozen=True)
class Guessed(Strategy):
    """Estimate the gradient along a guessed direction, plus ``k`` random directions orthogonal to it.

    ``guess`` is called each time the segment runs with what the segment's function receives (detached):
    its arguments, or for a module segment ``mf.fwd(module)`` its parameters as a dict followed by its
    inputs. It returns one direction per tensor the segment differentiates, in this order: the tensor
    arguments that need a gradient in ``optree.tree_leaves((args, kwargs))`` order (dict keys sorted, so
    ``"l.bias"`` before ``"l.weight"``), then parameters the function reads from a closure or ``self``.
    ``None`` is a zero direction; a wrong list is an error that names the expected shapes. Typical
    guesses: the gradient of a cheap local loss, or the previous step's estimate.

    With ``k = 0`` the estimate is the projection of the gradient on the guess: deterministic and biased
    (``madfunc.compare`` reports its bias and cosine). With ``k >= 1`` random directions orthogonal to the
    guess complete it: unbiased, with relative variance ``(n/k) sin^2 t`` (Gaussian; ``t`` the angle
    between guess and gradient) instead of ``(n+1)/k``. A zero guess leaves the random part alone.

    Args:
        guess: ``guess(*args, **kwargs) -> sequence of tensors or None``, as above.
        k: number of random directions next to the guess. Default: ``0``.
        distribution: ``"gaussian"`` or ``"rademacher"`` for the random directions. Default: ``"gaussian"``.
        directions: guesses per call: with ``G > 1``, each returned tensor has a leading dimension ``G``
            (e.g. one guess per layer, zero elsewhere), and the estimate uses the projection on their span
            (orthonormalised; dependent guesses are dropped). Default: ``1``.

    Examples:
        >>> import torch, madfunc as mf
        >>> layer = mf.fwd(lambda w, x: torch.tanh(x @ w), name="layer")
        >>> x, w = torch.randn(4, 3), torch.randn(3, 2)
        >>> exact = torch.func.grad(lambda w: torch.tanh(x @ w).sum())(w)
        >>> along_exact = mf.Guessed(lambda w, x: [exact])  # a perfect guess gives the exact gradient
        >>> g = mf.mixed_grad(lambda w: layer(w, x).sum(), {"layer": along_exact})(w)
        >>> torch.allclose(g, exact, atol=1e-5)
        True
    """

    guess: Callable[..., Sequence[torch.Tensor | None]]
    k: int = 0
    distribution: str = "gaussian"
    directions: int = 1

    def __post_init__(self) -> None:
        if not callable(self.guess):
            raise TypeError(
                f"Guessed(guess=...): expected a callable returning one direction per differentiated tensor, got "
                f"{type(self.guess).__name__}."
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"Guessed(k={self.k!r}): k must be an int >= 0 (random directions next to the guess).")
        if self.k != 0:
            check_distribution("Guessed", self.distribution, "auto", self.k)
        if isinstance(self.directions, bool) or not isinstance(self.directions, int) or self.directions < 1:
            raise ValueError(f"Guessed(directions={self.directions!r}): expected an int >= 1 (guesses per call).")
        if DISTRIBUTIONS.get(self.distribution) is None or DISTRIBUTIONS[self.distribution].draw is None:
            raise ValueError(f"Guessed(distribution={self.distribution!r}): expected 'gaussian' or 'rademacher'.")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.k > 0

    def __repr__(self) -> str:
        name = getattr(self.guess, "__qualname__", type(self.guess).__name__)
        extra = "" if self.directions == 1 else f", directions={self.directions}"
        return f"Guessed(guess={name}, k={self.k}, distribution={self.distribution!r}{extra})"

    def to_string(self) -> str:
        raise TypeError(f"{self!r} has no string form: it holds a Python callable. Build plans with it in Python.")

    # -- the passes ----------------------------------------------------------------------------------
    def push(self, engine: EngineView, tensors: Sequence[torch.Tensor], diff_tensors: Sequence[torch.Tensor],
             n: int) -> tuple[Passes, StrategyState]:
        device = _common_device(engine.name, diff_tensors)
        sizes = [t.numel() for t in diff_tensors]
        work = torch.float64 if any(t.dtype == torch.float64 for t in diff_tensors) else torch.float32
        basis = self._basis(engine, tensors, diff_tensors, work)  # (G', n) orthonormal rows, or None
        rows = [] if basis is None else [basis]
        if self.k:
            assert engine.seed is not None  # (k > 0: stochastic, and a stochastic strategy's call always has one)
            v = draw_tangents(self.distribution, self.k, [t.shape for t in diff_tensors],
                              [t.dtype for t in diff_tensors], device, engine.seed)
            v = torch.cat([vi.reshape(self.k, -1).to(work) for vi in v], dim=1)
            if basis is not None:  # w_j = v_j - Q Q^T v_j: the random part lives off the guesses' span
                with no_autocast():  # (in the working dtype, even inside an autocast block)
                    v = v - (v @ basis.T) @ basis
            rows.append(v)
        guided = 0 if basis is None else basis.shape[0]
        if not rows:  # k = 0 and a zero guess: nothing to estimate with
            engine.stats.tangents = 0
            return engine.plain_pass(tensors), GuessedState(None, guided)
        flat = torch.cat(rows)
        parts = [p.reshape(flat.shape[0], *t.shape).to(t.dtype) for p, t in
                 zip(torch.split(flat, sizes, dim=1), diff_tensors, strict=True)]
        engine.stats.tangents = flat.shape[0]
        engine.begin_pass()
        return engine.push(tensors, engine.diff, parts, watch=True), GuessedState(tuple(parts), guided)

    def _basis(self, engine: EngineView, tensors: Sequence[torch.Tensor], diff_tensors: Sequence[torch.Tensor],
               work: torch.dtype) -> torch.Tensor | None:
        """The guesses as orthonormal rows ``(G', n)`` (G' <= directions: dependent guesses and zeros dropped)."""
        args, kwargs = engine.arguments(tensors)
        with torch.enable_grad():
            directions = list(self.guess(*args, **kwargs))
        lead = () if self.directions == 1 else (self.directions,)
        if len(directions) != len(diff_tensors) or any(
            d is not None and (not isinstance(d, torch.Tensor) or d.shape != (*lead, *t.shape))
            for d, t in zip(directions, diff_tensors, strict=False)
        ):
            got = [None if d is None else list(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
                   for d in directions]
            raise ValueError(
                f"segment {engine.name!r}: Guessed's guess must return one direction (a tensor of the same shape, "
                f"or None) per differentiated tensor, i.e. shapes {[[*lead, *t.shape] for t in diff_tensors]} "
                f"(tensor arguments that need a gradient, then parameters); got {got}."
            )
        count = self.directions
        flat = torch.cat([
            torch.zeros(count, t.numel(), dtype=work, device=t.device) if d is None
            else d.detach().reshape(count, -1).to(work) for d, t in zip(directions, diff_tensors, strict=True)
        ], dim=1)
        if not torch.isfinite(flat).all():
            raise FloatingPointError(f"segment {engine.name!r}: Guessed's guess returned a non-finite direction.")
        q, r = torch.linalg.qr(flat.T, mode="reduced")  # (n, G): orthonormal columns spanning the guesses
        diag = r.diagonal().abs()
        keep = diag > diag.max().clamp_min(torch.finfo(work).tiny) * count * torch.finfo(work).eps
        keep &= diag > 0
        return q.T[keep] if bool(keep.any()) else None

    # -- backward ------------------------------------------------------------------------------------
    @without_autocast
    def combine(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                shared: Shared | None = None) -> list[torch.Tensor | None]:
        assert isinstance(state, GuessedState)
        tangents = state.tangents
        if s is None or s.numel() == 0 or tangents is None:
            return zeros(meta)
        coef = s.clone()
        if self.k:  # the random coefficients average; the guesses' are projections
            first = state.guided
            coef[first:] = coef[first:] / self.k
        return [
            torch.tensordot(coef.to(v.dtype), v, dims=1).to(dtype) if u else torch.zeros(shape, dtype=dtype,
                                                                                        device=s.device)
            for v, u, (shape, dtype, _) in zip(tangents, engine.used, meta, strict=True)
        ]

    def variance(self, stats: SegmentStats) -> float | None:
        return None  # depends on the angle between guess and gradient (module docstring)
