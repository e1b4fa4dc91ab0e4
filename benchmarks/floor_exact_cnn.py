"""The floor of target 4 for any vmap(jvp) engine: torch.func alone, one pass per weight leaf.

``python benchmarks/floor_exact_cnn.py [THREADS]`` prints, for the small CNN at batch 2 and 32, the
time of one ``vmap(jvp)`` pass over the basis tangents of each weight leaf (no madfunc involved) next
to a backprop step: what per-leaf seeding with torch.func costs before any engine overhead.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import models
import torch


def median_ms(fn: Callable[[], object], rounds: int = 31, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def one_pass(params: tuple, index: int, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    leaf = params[index]
    basis = torch.eye(leaf.numel()).reshape(leaf.numel(), *leaf.shape)

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return models.cnn_loss(params[:index] + (w,) + params[index + 1 :], x, y)

    return lambda: torch.func.vmap(lambda v: torch.func.jvp(loss_of, (leaf,), (v,)))(basis)


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    params = models.cnn_params()
    for batch in (2, 32):
        x, y = models.cnn_data(batch)
        step = median_ms(lambda x=x, y=y: torch.func.grad(models.cnn_loss)(params, x, y))
        passes = [median_ms(one_pass(params, i, x, y)) for i in (0, 2, 4)]
        print(
            f"b{batch}: backprop step {step:.2f} ms; vmap(jvp) per weight leaf (108/180/315 tangents) "
            f"{' + '.join(f'{p:.2f}' for p in passes)} = {sum(passes):.2f} ms = {sum(passes) / step:.1f}x"
        )


if __name__ == "__main__":
    main()
