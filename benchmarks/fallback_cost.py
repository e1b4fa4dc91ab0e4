"""Cost of the double-vjp forward-mode fallback: ``python benchmarks/fallback_cost.py [--rounds N]``.

For ops without a torch forward rule, times (interleaved rounds, warm-up, medians; the house method
of benchmarks/run.py) ``vmap(jvp)`` through ``jvp_by_double_vjp`` with k = 1 and k = 16 tangents,
one reverse-mode ``torch.func.vjp`` pass (forward + backward) of the op, and a native ``vmap(jvp)``
of an equivalent composite formulation where one exists. Ratios are medians of per-round ratios
against the vjp pass. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.func import jvp, vjp, vmap

from madfunc.ops.fallback import jvp_by_double_vjp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import timeit  # noqa: E402  (the house method: interleaved rounds)


def forward_tangents(f, x, k: int, fallback: bool):
    """k output tangents of f at x (only x carries tangents), as a madfunc forward segment computes them."""
    g = (lambda x: jvp_by_double_vjp(f, x)) if fallback else f
    u = torch.randn(k, *x.shape, dtype=x.dtype)
    if k == 1:
        return jvp(g, (x,), (u[0],))[1]
    return vmap(lambda u: jvp(g, (x,), (u,))[1], randomness="same")(u)


def reverse_pass(f, x):
    y, pullback = vjp(f, x)
    return pullback(torch.ones_like(y))


def cases():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 64, generator=g), torch.randn(256, 64, generator=g)
    yield (
        "cdist 256x64 vs 256x64 (double vjp via _euclidean_dist)",
        lambda a: torch.cdist(a, b),
        a,
        lambda a: torch.norm(a[:, None] - b[None], dim=-1),
    )
    table = torch.randn(1000, 8, generator=g)
    idx = torch.randint(0, 1000, (8, 16), generator=g)
    yield (
        "embedding_bag 8 bags x 16 of 1000x8, mean (64 outputs: Jacobian rows)",
        lambda w: F.embedding_bag(idx, w, mode="mean"),
        table,
        lambda w: F.embedding(idx, w).mean(1),
    )
    image = torch.randn(8, 3, 32, 32, generator=g)
    grid = torch.rand(8, 16, 16, 2, generator=g) * 2 - 1
    yield (
        "grid_sample 8x3x32x32, 16x16 grid, w.r.t. image (double vjp)",
        lambda x: F.grid_sample(x, grid, align_corners=False),
        image,
        None,
    )


def run_case(name: str, f, x: torch.Tensor, native, rounds: int) -> None:
    candidates = {
        "fallback k=1": lambda: forward_tangents(f, x, 1, True),
        "fallback k=16": lambda: forward_tangents(f, x, 16, True),
        "vjp pass": lambda: reverse_pass(f, x),
    }
    if native is not None:
        candidates["native k=1"] = lambda: forward_tangents(native, x, 1, False)
        candidates["native k=16"] = lambda: forward_tangents(native, x, 16, False)
    times = timeit(candidates, rounds, warmup=2)
    print(f"\n{name}")
    for cand, ts in times.items():
        ratio = statistics.median(t / r for t, r in zip(ts, times["vjp pass"], strict=True))
        line = f"  {cand:14s} {statistics.median(ts) * 1e3:9.2f} ms   x{ratio:6.2f} vjp pass"
        if native is not None and cand.startswith("fallback"):
            ref = times["native " + cand.split()[1]]
            line += f"   x{statistics.median(t / r for t, r in zip(ts, ref, strict=True)):6.2f} native"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds; ratios vs one vjp pass")
    for case in cases():
        run_case(*case, rounds=args.rounds)


if __name__ == "__main__":
    main()
