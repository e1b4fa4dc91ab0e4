"""The strategies under test: one row per estimator, read by every generic test in tests/strategies/test_base.py.

A new strategy is tested everywhere by adding a row here: how to build it for a setting (``make``), and
its theoretical relative variance ``E||g^ - g||^2 / ||g||^2`` in that setting (``theory``; ``None``: not
derived, the variance test skips it; exact and deterministic rows give ``0.0``).

The settings (see ``Setting``): a segment ``seg(z, W2) = tanh(z) @ W2`` with per-example outputs, where
``z`` is an activation (computed upstream) of ``B`` examples of width ``m``; "activations" differentiates
``z`` only, "joint" also the parameter ``W2`` (``n_W`` scalars).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

import madfunc as mf
from madfunc.strategies.frog import Frog
from madfunc.strategies.tangents import DISTRIBUTIONS

DT = torch.float64
B, M, OUT = 6, 4, 3


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def body(z: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z) @ w2


@dataclasses.dataclass
class Setting:
    name: str  # "activations" or "joint"
    z0: torch.Tensor
    w2: torch.Tensor
    c: torch.Tensor  # the loss is sum(seg(z, W2) * c)
    a: torch.Tensor  # per-example activation gradients, (B, m)
    w: torch.Tensor  # per-example shares of W2's gradient, (B, n_W)
    guess: list[torch.Tensor]  # a fixed, imperfect guess of the gradient, one tensor per differentiated input

    @property
    def joint(self) -> bool:
        return self.name == "joint"

    @property
    def exact(self) -> torch.Tensor:
        """The exact gradient of the differentiated inputs, flat."""
        return torch.cat([self.a.reshape(-1), self.w.sum(0)]) if self.joint else self.a.reshape(-1)

    @property
    def n(self) -> int:
        return self.exact.numel()


def make_setting(name: str) -> Setting:
    z0, w2, c = _rand(0, B, M), _rand(1, M, OUT) * 0.7, _rand(2, B, OUT)
    a = torch.func.grad(lambda z: (body(z, w2) * c).sum())(z0)
    # example b's share of W2's gradient: the gradient of example b's output alone
    w = torch.func.vmap(torch.func.grad(lambda w_, zb, cb: (body(zb, w_) * cb).sum()), in_dims=(None, 0, 0))(w2, z0, c)
    w = w.reshape(B, -1)
    guess = [a + 0.6 * a.norm() / math.sqrt(a.numel()) * _rand(3, B, M)]
    if name == "joint":
        gw = w.sum(0).reshape(M, OUT)
        guess.append(gw + 0.6 * gw.norm() / math.sqrt(gw.numel()) * _rand(4, M, OUT))
    return Setting(name, z0, w2, c, a, w, guess)


def _law(distribution: str, n: int) -> float:
    """``E||(g.v) v - g||^2 / ||g||^2`` of one tangent in R^n (n + 1 Gaussian, n - 1 signs)."""
    return DISTRIBUTIONS[distribution].variance(n, 1)


def _random_theory(strategy: mf.Random | mf.SPSA) -> Callable[[Setting], float]:
    return lambda s: DISTRIBUTIONS[strategy.distribution].variance(s.n, strategy.k)


def _activity_theory(strategy: mf.Activity) -> Callable[[Setting], float]:
    """Per example ``(L(m)||a_b||^2 + m||w_b||^2)/k``; parameters ``(L(n_W)||g_W||^2 + n_W ||a||^2)/k``
    (madfunc/strategies/activity.py); without parameters only the first term's ``L(m)/k`` remains."""

    def theory(s: Setting) -> float:
        k, d = strategy.k, strategy.distribution
        if not s.joint:
            return _law(d, M) / k
        a2, w2 = (s.a**2).sum(1), (s.w**2).sum(1)
        g_w = s.w.sum(0)
        n_w = g_w.numel()
        total = float((_law(d, M) * a2 + M * w2).sum()) + _law(d, n_w) * float(g_w.dot(g_w)) + n_w * float(a2.sum())
        return total / k / float(s.exact.dot(s.exact))

    return theory


def _span(s: Setting, directions: int) -> torch.Tensor:
    """Orthonormal rows spanning the guess: one direction, or (directions=2) one per differentiated tensor."""
    d = torch.cat([t.reshape(-1) for t in s.guess])
    if directions == 1:
        return (d / d.norm()).unsqueeze(0)
    sizes = [t.numel() for t in s.guess]
    rows = torch.zeros(len(sizes), d.numel(), dtype=d.dtype)
    for i, piece in enumerate(torch.split(d, sizes)):
        start = sum(sizes[:i])
        rows[i, start : start + sizes[i]] = piece / piece.norm()
    return rows


def _guessed_theory(k: int, directions: int) -> Callable[[Setting], float]:
    """``((n - G + 1)/k) ||P g||^2 / ||g||^2`` for Gaussian random directions off the guesses' span
    (G = 1: ``(n/k) sin^2 t``; madfunc/strategies/guessed.py)."""

    def theory(s: Setting) -> float:
        q = _span(s, directions)
        rest = s.exact - q.T @ (q @ s.exact)
        return (s.n - q.shape[0] + 1) / k * float(rest.dot(rest) / s.exact.dot(s.exact))

    return theory


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    make: Callable[[Setting], mf.Strategy]
    theory: Callable[[Setting], float] | None
    # A deterministic row's value (flat); None for a stochastic one, whose mean must be the exact gradient.
    expected: Callable[[Setting], torch.Tensor] | None = None

    def strategy(self, setting: Setting) -> mf.Strategy:
        return self.make(setting)


def _fixed(strategy: mf.Strategy, theory: Callable[[Setting], float] | None) -> Row:
    expected = None if strategy.stochastic else (lambda s: s.exact)
    return Row(str(strategy).replace(":", "-"), lambda s: strategy, theory, expected)


def _projection(directions: int) -> Callable[[Setting], torch.Tensor]:
    """``Q Q^T g`` for the guesses' span: what Guessed(k=0) returns."""
    return lambda s: _span(s, directions).T @ (_span(s, directions) @ s.exact)


def _guessed(k: int, distribution: str = "gaussian", directions: int = 1) -> Row:
    """Guessed rows; ``directions=2``: one guess per differentiated tensor (in "activations", only one
    tensor is differentiated, so the second guess is zero and dropped)."""

    def make(s: Setting) -> mf.Strategy:
        guess = s.guess if directions == 1 else [
            torch.stack([t if i == j else torch.zeros_like(t) for j in range(2)]) for i, t in enumerate(s.guess)
        ]
        return mf.Guessed(lambda z, w2: list(guess), k=k, distribution=distribution, directions=directions)

    def theory(s: Setting) -> float | None:
        span = min(directions, len(s.guess))
        return _guessed_theory(k, span)(s) if k and distribution == "gaussian" else None

    def expected(s: Setting) -> torch.Tensor:
        return _projection(min(directions, len(s.guess)))(s)

    return Row(f"guessed-{k}-{distribution}-{directions}", make, theory if k else None, None if k else expected)


STRATEGIES: list[Row] = [
    _fixed(mf.Exact(), lambda s: 0.0),
    _fixed(mf.Exact(chunk_size=5), lambda s: 0.0),
    _fixed(mf.Checkpointed(), lambda s: 0.0),  # reverse mode, recomputed: exact
    *(
        _fixed(r, _random_theory(r))
        for r in (
            mf.Random(1), mf.Random(4), mf.Random(1, "rademacher"), mf.Random(3, "rademacher"),
            mf.Random(1, "orthogonal"), mf.Random(5, "orthogonal"), mf.Random(2, seeding="kept"),
        )
    ),
    *(
        _fixed(a, _activity_theory(a))
        for a in (mf.Activity(1), mf.Activity(4), mf.Activity(2, "rademacher"), mf.Activity(2, seeding="kept"))
    ),
    _guessed(0),
    _guessed(2),
    _guessed(3, "rademacher"),
    _guessed(0, directions=2),
    _guessed(2, directions=2),
    *(_fixed(f, lambda s, k=f.k: s.n / k - 1) for f in (Frog(4), Frog(3, "rademacher"))),  # n/k - 1: frog.py
    # SPSA: Random's law, which it tends to as eps -> 0. In float64 at eps <= 1e-3 its finite-difference bias
    # here is below 1e-5 of ||g|| (tests/strategies/test_spsa.py); test_base's tolerance on the mean's
    # projection on g is 5 sqrt(variance / draws), above 0.5 of ||g|| for every row.
    *(
        _fixed(p, _random_theory(p))
        for p in (
            mf.SPSA(1), mf.SPSA(3, 1e-4, "rademacher"), mf.SPSA(2, distribution="orthogonal"),
            mf.SPSA(2, primal="mean"),
        )
    ),
]
