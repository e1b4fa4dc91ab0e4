"""Bytes communicated and time per step: DDP vs madfunc's scalar scheme (issue 10).

    torchrun --standalone --nproc_per_node=N benchmarks/distributed.py [--steps 20] [--json PATH]

An MLP whose first layer is one large ``Random(k=8)`` forward segment (1024 x 2048: 2.1M parameters), then
a small reverse head. Both candidates run the same plan, so they compute the same gradient:

* ``ddp``: DDP all-reduces every gradient (the plain ``use_plan`` recipe);
* ``scalar``: ``mf.ddp_comm_hook`` + ``use_plan(..., process_group=...)``: the segment all-reduces its
  k coefficients (+ 8 fingerprint numbers), DDP's buckets only the head's gradients.

Bytes are counted per rank and per step: every ``dist.all_reduce`` call (for ``ddp``, in a counted step
DDP runs its default all-reduce hook in Python). Time per step is the median over interleaved steps
(forward, backward, SGD step) after warm-up, on gloo over loopback; ``allreduce_ms`` times a bare
all-reduce of the segment's gradient (n float32) and of its k + 8 float64 coefficients. Not a test:
nothing asserts.
"""

# No ``from __future__ import annotations``: DDP checks a comm hook's annotations as objects.
import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import madfunc as mf

IN, WIDTH, OUT, BATCH, K = 1024, 2048, 10, 32, 8
PLAN = {"stem": mf.Random(k=K, distribution="rademacher")}
SENT: list[int] = []  # bytes of the all-reduces of the current step (this rank's contribution)


def model() -> nn.Module:
    torch.manual_seed(0)
    stem, head = mf.fwd(nn.Linear(IN, WIDTH), name="stem"), mf.rev(nn.Linear(WIDTH, OUT), name="head")
    return nn.Sequential(stem, nn.Tanh(), head)


def counting_all_reduce(original: Any) -> Any:
    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        SENT.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    return all_reduce


def candidate(kind: str, count: bool) -> Any:
    net = DDP(model())
    if kind == "scalar":
        net.register_comm_hook(dist.group.WORLD, mf.ddp_comm_hook)
    elif count:  # DDP's own hook in Python, so that its dist.all_reduce calls are counted
        net.register_comm_hook(dist.group.WORLD, default_hooks.allreduce_hook)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    group = dist.group.WORLD if kind == "scalar" else None
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    x, y = torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)

    def step() -> None:
        opt.zero_grad()
        with mf.use_plan(PLAN, process_group=group):
            ((net(x) - y) ** 2).mean().backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.all_reduce = counting_all_reduce(dist.all_reduce)  # type: ignore[assignment]
        sent = {}
        for kind in ("ddp", "scalar"):  # bytes: one counted step (after DDP's first, bucket-building one)
            step = candidate(kind, count=True)
            step()
            SENT.clear()
            step()
            sent[kind] = sum(SENT)
        steps = {kind: candidate(kind, count=False) for kind in ("ddp", "scalar")}
        times: dict[str, list[float]] = {kind: [] for kind in steps}
        for r in range(args.warmup + args.steps):
            for kind in list(steps) if r % 2 == 0 else list(steps)[::-1]:
                dist.barrier()
                start = time.perf_counter()
                steps[kind]()
                if r >= args.warmup:
                    times[kind].append(time.perf_counter() - start)
        allreduce_ms = {}
        bare = {"gradient": torch.zeros(IN * WIDTH + WIDTH), "coefficients": torch.zeros(K + 8, dtype=torch.float64)}
        for label, tensor in bare.items():
            spent = []
            for _ in range(args.steps):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(tensor)
                spent.append(time.perf_counter() - start)
            allreduce_ms[label] = 1e3 * statistics.median(spent)
        result = {
            "world_size": world,
            "segment_parameters": IN * WIDTH + WIDTH,
            "k": K,
            "bytes_per_step": sent,
            "ms_per_step": {kind: 1e3 * statistics.median(t) for kind, t in times.items()},
            "threads_per_rank": torch.get_num_threads(),
            "allreduce_ms": allreduce_ms,
        }
        if rank == 0:
            n, threads = result["segment_parameters"], result["threads_per_rank"]
            print(f"N={world}  segment n={n:,}  k={K}  threads/rank={threads}")
            for kind in steps:
                ms = result["ms_per_step"][kind]
                print(f"  {kind:7s} bytes/step/rank {sent[kind]:>12,}   time/step {ms:8.1f} ms")
            print("  bare all-reduce: " + ", ".join(f"{k} {v:.3f} ms" for k, v in allreduce_ms.items()))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
