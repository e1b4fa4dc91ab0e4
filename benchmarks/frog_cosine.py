"""FROG's projection against Random's mean: cosine with the true gradient, ``python benchmarks/frog_cosine.py``.

A 2-layer MLP (64 -> 32 -> 10, tanh, cross-entropy; n = 2410 parameters) on a batch of scikit-learn's 8x8
digits, the whole loss one forward segment. For each k, ``--draws`` estimates per strategy; draw i of both
strategies runs under ``torch.manual_seed(i)``, so both see the same k Gaussian tangents (paired draws): only
the aggregation differs, Random's ``(1/k) V V^T g`` against FROG's ``(n/k) V (V^T V)^-1 V^T g``, and the paired
difference (FROG - Random, draw by draw) is the gain of the aggregation alone. The theory column is FROG's
``sqrt(E cos^2) = sqrt(k/n)`` (its cosine is ``||P g|| / ||g||``, the same at any scale).
Random's cosine is close to that too while k << n (then ``V^T V ~ n I``, and the mean is nearly the projection);
the projection pulls ahead as k/n grows (``--hidden 2``: n = 160). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F

import madfunc as mf
from madfunc.strategies.frog import Frog


def data(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:batch], dtype=torch.float32) / 16.0
    return x, torch.tensor(digits.target[:batch], dtype=torch.int64)


def init(hidden: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1) / math.sqrt(shape[-1])

    return uniform(hidden, 64), uniform(hidden) / 8, uniform(10, hidden), uniform(10) / math.sqrt(hidden)


def loss(params: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = params
    return F.cross_entropy(F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2), y)


MLP = mf.fwd(loss, name="mlp")


def flat(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def cosines(strategy: mf.Strategy, params: tuple, x: torch.Tensor, y: torch.Tensor, exact: torch.Tensor,
            draws: int) -> list[float]:
    grad = mf.mixed_grad(lambda p: MLP(p, x, y), {"mlp": strategy})
    out = []
    for i in range(draws):
        torch.manual_seed(i)  # the same tangents for both strategies
        g = flat(grad(params))
        out.append(float(g @ exact / (g.norm() * exact.norm())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=32)
    args = parser.parse_args()
    x, y = data(args.batch)
    params = init(args.hidden)
    exact = flat(torch.func.grad(loss)(params, x, y))
    n = exact.numel()
    print(f"MLP 64-{args.hidden}-10 on {args.batch} digits, n = {n}, {args.draws} paired draws per k")
    print(f"{'k':>4}  {'Random (mean) cos':>17}  {'FROG cos':>17}  {'FROG - Random':>17}  {'sqrt(k/n)':>9}")
    for k in args.ks:
        mean, frog = (cosines(s, params, x, y, exact, args.draws) for s in (mf.Random(k), Frog(k)))
        gain = [f - m for f, m in zip(frog, mean, strict=True)]  # paired: the same tangents
        cells = [f"{statistics.mean(c):+.4f} ± {statistics.stdev(c):.4f}" for c in (mean, frog, gain)]
        print(f"{k:>4}  {cells[0]:>17}  {cells[1]:>17}  {cells[2]:>17}  {math.sqrt(min(k / n, 1.0)):>9.4f}")


if __name__ == "__main__":
    main()
