"""MeZO, the reference zeroth-order optimizer that ``benchmarks/finetune.py`` compares madfunc against.

A straight reimplementation of Algorithm 1 of Malladi et al., "Fine-Tuning Language Models with Just
Forward Passes" (NeurIPS 2023, arXiv 2305.17333), written from the paper, not from its code. Per step and
per probe, draw a seed ``s``; with ``z`` drawn again from ``s`` leaf by leaf every time it is needed:

    theta += eps z                  l+ = L(theta + eps z)
    theta -= 2 eps z                l- = L(theta - eps z)
    theta += eps z                  (theta restored, up to float rounding)
    g = (l+ - l-) / (2 eps)         the projected gradient, one scalar
    theta -= lr (g z + wd theta)    leaf by leaf, z drawn again from s

so ``z`` is never stored and the step's memory is that of inference plus one leaf's ``z``. With ``n``
probes (the paper's "n-SPSA" variant) each probe gets its own seed and two forward passes, and the update
is ``theta -= lr ((1/n) sum_j g_j z_j + wd theta)``: ``n = 16`` costs 32 forward passes.

Where ``z`` comes from is a :class:`Directions` object, so that a test can hand MeZO and madfunc's
``SPSA``/``Random`` the same directions: :class:`MezoDirections` draws as MeZO does (a Gaussian stream
restarted from the probe's seed, parameters in order), :class:`TangentStreamDirections` reproduces the
tangents that madfunc draws for a segment holding the same parameters.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch

__all__ = ["Directions", "MeZO", "MezoDirections", "MezoStep", "TangentStreamDirections"]


class Directions(Protocol):
    """Where MeZO's perturbation directions come from.

    ``seeds(n)`` is called once per step and returns one token per probe; ``leaves(token, params)``
    yields that probe's direction for each parameter in turn, the same values every time it is called
    with the same token (MeZO draws each direction four times and never stores it).
    """

    def seeds(self, n_probes: int) -> list[Any]: ...

    def leaves(self, token: Any, params: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]: ...


class MezoDirections:
    """MeZO's own directions: a seed per probe from a Python RNG, then standard normal entries drawn
    parameter after parameter from a generator seeded with it.

    MeZO reseeds torch's global generator (``torch.manual_seed(s)``); a private generator per device
    draws the same kind of stream without touching the model's own randomness (dropout).
    """

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def seeds(self, n_probes: int) -> list[int]:
        return [self._rng.randrange(2**31) for _ in range(n_probes)]

    def leaves(self, token: int, params: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        generators: dict[torch.device, torch.Generator] = {}
        for p in params:
            gen = generators.get(p.device)
            if gen is None:
                gen = generators[p.device] = torch.Generator(device=p.device)
                gen.manual_seed(token)
            yield torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=gen)


class TangentStreamDirections:
    """The tangents madfunc draws for one ``Random(k)``/``SPSA(k)`` segment per transform call, given the
    same ``generator``.

    madfunc draws one base number per transform call from ``generator``; the call's first random segment
    gets the seed ``SPSA.call_seed(generator)`` (``leaf_seed(base, 1)``), and its leaf ``i`` the ``k`` rows of
    ``draw_leaf(distribution, k, shape, dtype, device, seed, i)`` (``madfunc/engine/rng.py``,
    ``madfunc/strategies/tangents.py``). Leaves are numbered in the order the segment flattens its
    parameters: a module segment passes a dict of them, which optree flattens in sorted key order, so
    ``names`` (each parameter's name, in the order MeZO is given them) fixes each one's index.
    Probe ``j`` of a step is row ``j``. So: one segment per step, holding exactly these parameters, and
    ``n_probes == k``.
    """

    def __init__(self, generator: torch.Generator, names: Sequence[str], k: int = 1,
                 distribution: str = "gaussian") -> None:
        self.generator = generator
        self.k = k
        self.distribution = distribution
        ranks = {name: i for i, name in enumerate(sorted(names))}
        self.index = [ranks[name] for name in names]

    def seeds(self, n_probes: int) -> list[tuple[int, int]]:
        from madfunc.strategies.spsa import call_seed

        if n_probes != self.k:
            raise ValueError(f"TangentStreamDirections(k={self.k}): MeZO asked for {n_probes} probes; use n_probes=k.")
        seed = call_seed(self.generator)  # (read without advancing the generator: advance it as a call does)
        torch.randint(0, 2**62, (), dtype=torch.int64, generator=self.generator)
        return [(seed, j) for j in range(n_probes)]

    def leaves(self, token: tuple[int, int], params: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        from madfunc.strategies.tangents import draw_leaf

        seed, row = token
        if len(params) != len(self.index):
            raise ValueError(f"TangentStreamDirections: built for {len(self.index)} parameters, given {len(params)}.")
        for p, index in zip(params, self.index, strict=True):
            yield draw_leaf(self.distribution, self.k, p.shape, p.dtype, p.device, seed, index)[row]


@dataclasses.dataclass(frozen=True)
class MezoStep:
    """What one MeZO step measured: per probe, its token, ``l+``, ``l-`` and ``g = (l+ - l-) / (2 eps)``."""

    tokens: list[Any]
    plus: list[float]
    minus: list[float]
    projected: list[float]

    @property
    def loss(self) -> float:
        """The loss MeZO logs: the mean of ``l+`` and ``l-`` over the probes (``L(theta)`` up to O(eps^2))."""
        return (sum(self.plus) + sum(self.minus)) / (2 * len(self.plus))


class MeZO:
    """MeZO's zeroth-order SGD (Malladi et al. 2023, Algorithm 1), in place on ``params``.

    Args:
        params: the parameters to train, in the order directions are drawn for them.
        lr: learning rate.
        eps: the perturbation scale. Default: ``1e-3`` (the paper's).
        weight_decay: L2 penalty, added to the projected gradient as ``torch.optim.SGD`` does. Default: ``0``.
        n_probes: directions per step (2 forward passes each). Default: ``1``.
        directions: where the directions come from. Default: :class:`MezoDirections` ``(seed=0)``.

    Examples:
        >>> w = torch.zeros(3, dtype=torch.float64)
        >>> opt = MeZO([w], lr=0.1)
        >>> info = opt.step(lambda: ((w - 1) ** 2).sum())
        >>> abs(info.loss - 3.0) < 1e-4  # the mean of l+ and l- is L(theta) + O(eps^2)
        True
        >>> bool(w.abs().sum() > 0)  # one step moved w along z
        True
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_probes: int = 1, directions: Directions | None = None) -> None:
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("MeZO: no parameters given.")
        if n_probes < 1:
            raise ValueError(f"MeZO(n_probes={n_probes}): needs at least one probe.")
        if not eps > 0:
            raise ValueError(f"MeZO(eps={eps}): eps must be > 0.")
        self.lr, self.eps, self.weight_decay, self.n_probes = lr, eps, weight_decay, n_probes
        self.directions: Directions = directions if directions is not None else MezoDirections()

    @torch.no_grad()
    def _perturb(self, token: Any, scale: float) -> None:
        for p, z in zip(self.params, self.directions.leaves(token, self.params), strict=True):
            p.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> MezoStep:
        """One step: ``2 n_probes`` calls of ``closure`` (the loss at the perturbed parameters), then the update."""
        tokens = self.directions.seeds(self.n_probes)
        plus, minus, projected = [], [], []
        for token in tokens:
            self._perturb(token, self.eps)
            lp = float(closure())
            self._perturb(token, -2 * self.eps)
            lm = float(closure())
            self._perturb(token, self.eps)
            if not (math.isfinite(lp) and math.isfinite(lm)):
                raise FloatingPointError(f"MeZO: the loss is not finite (l+ = {lp}, l- = {lm}); lower lr or eps.")
            plus.append(lp)
            minus.append(lm)
            projected.append((lp - lm) / (2 * self.eps))
        self._update(tokens, projected)
        return MezoStep(tokens, plus, minus, projected)

    def _update(self, tokens: list[Any], projected: list[float]) -> None:
        """``theta -= lr ((1/n) sum_j g_j z_j + wd theta)``, leaf by leaf, each ``z_j`` drawn again."""
        n = len(tokens)
        if n == 1:  # one probe: one pass, ``d = g z + wd theta`` formed per leaf as torch.optim.SGD forms it
            for p, z in zip(self.params, self.directions.leaves(tokens[0], self.params), strict=True):
                d = z.mul_(projected[0])
                if self.weight_decay:
                    d.add_(p, alpha=self.weight_decay)
                p.add_(d, alpha=-self.lr)
            return
        if self.weight_decay:
            for p in self.params:
                p.mul_(1 - self.lr * self.weight_decay)
        for token, g in zip(tokens, projected, strict=True):
            for p, z in zip(self.params, self.directions.leaves(token, self.params), strict=True):
                p.add_(z, alpha=-self.lr * g / n)
