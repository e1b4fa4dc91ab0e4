"""One rank of the distributed tests (tests/engine/test_distributed.py starts two of these on 127.0.0.1).

Every case runs here in one process group, so the suite pays for one start-up of torch per rank. Each rank
also computes the single-process references (no communication), and saves everything to
``<out>/rank<r>.pt`` for the tests to check. Usage: ``python -m support.distributed_worker RANK WORLD PORT OUT``
(from ``tests/``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import madfunc as mf
from support import distributed_marking_worker as marking

DT = torch.float64
STEPS, LR, BATCH = 3, 0.1, 8  # BATCH: the concatenated batch, split evenly over the ranks

# The plans under test: segments stem -> mid -> head (head reverse). ``stem`` sees data only, so its
# tangents are the same on a shard and on the concatenated batch; "activation" puts the Random segment
# after a reverse one, where its activation input takes tangents too (then the reference is the mean
# over shards of single-process runs with the same seed: the concatenated batch draws other activation
# tangents, an equally unbiased but different estimate).
PLANS: dict[str, dict[str, Any]] = {
    "reverse": {"stem": "rev", "mid": "rev"},
    "exact": {"stem": "exact", "mid": "exact"},
    "gaussian": {"stem": mf.Random(k=4, distribution="gaussian"), "mid": "rev"},
    "rademacher": {"stem": mf.Random(k=4, distribution="rademacher"), "mid": "rev"},
    "orthogonal": {"stem": mf.Random(k=4, distribution="orthogonal"), "mid": "rev"},
    "mixed": {"stem": mf.Random(k=3, distribution="rademacher"), "mid": "exact"},
    "activation": {"stem": "rev", "mid": mf.Random(k=3, distribution="gaussian")},
}
SIZES = {"stem": (6, 8), "mid": (8, 8), "head": (8, 2)}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = mf.fwd(nn.Linear(*SIZES["stem"]), name="stem")
        self.mid = mf.fwd(nn.Linear(*SIZES["mid"]), name="mid")
        self.head = mf.rev(nn.Linear(*SIZES["head"]), name="head")
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(torch.tanh(self.stem(x)))))


SEGMENTS = {n: (mf.rev if n == "head" else mf.fwd)(lambda p, h: F.linear(h, p["w"], p["b"]), name=n) for n in SIZES}


def functional_loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(SEGMENTS["stem"](params["stem"], x))
    h = torch.tanh(SEGMENTS["mid"](params["mid"], h))
    return ((SEGMENTS["head"](params["head"], h) - y) ** 2).mean()


def initial_params() -> dict:
    net = Net()
    return {n: {"w": getattr(net, n).module.weight.detach().clone(), "b": getattr(net, n).module.bias.detach().clone()}
            for n in SIZES}


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(BATCH, 6, dtype=DT, generator=g), torch.randn(BATCH, 2, dtype=DT, generator=g)


def flat_module_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def module_run(plan: dict, shards: list[tuple[slice, ...]], style: str, group: Any = None) -> dict:
    """SGD steps of the module model; ``shards``: the slices of each step's batch this run averages."""
    net = Net()
    model: nn.Module = net
    if style.startswith("ddp"):
        model = DDP(net)
        if style == "ddp_scalar":
            model.register_comm_hook(group, mf.ddp_comm_hook)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    grads, sent = [], []
    for step in range(STEPS):
        x, y = data(step)
        per_shard = []
        with counting() as calls:
            for part in shards:
                torch.manual_seed(100 + step)
                opt.zero_grad()
                with mf.use_plan(plan, process_group=group if style == "ddp_scalar" else None):
                    ((model(x[part]) - y[part]) ** 2).mean().backward()
                per_shard.append(flat_module_grads(net))
        sent.append(list(calls))
        mean = {n: sum(g[n] for g in per_shard) / len(per_shard) for n in per_shard[0]}
        grads.append(mean)
        for n, p in net.named_parameters():
            p.grad = mean[n].clone()
        opt.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in net.named_parameters()}, "bytes": sent}


def functional_run(plan: dict, shards: list[slice], group: Any = None) -> dict:
    params = initial_params()
    grads, sent = [], []
    for step in range(STEPS):
        x, y = data(step)
        per_shard = []
        with counting() as calls:
            for part in shards:
                torch.manual_seed(100 + step)
                per_shard.append(mf.mixed_grad(functional_loss, plan, process_group=group)(params, x[part], y[part]))
        sent.append(list(calls))
        mean = {n: {k: sum(g[n][k] for g in per_shard) / len(per_shard) for k in ("w", "b")} for n in SIZES}
        grads.append(mean)
        params = {n: {k: params[n][k] - LR * mean[n][k] for k in ("w", "b")} for n in SIZES}
    return {"grads": grads, "params": params, "bytes": sent}


@contextlib.contextmanager
def counting() -> Iterator[list[int]]:
    """Bytes of every dist.all_reduce call madfunc makes in the block (DDP's own buckets go through C++)."""
    calls: list[int] = []
    original = dist.all_reduce

    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce
    try:
        yield calls
    finally:
        dist.all_reduce = original


def fsdp_run(plan: dict, rank: int, world: int, group: Any) -> dict:
    """FSDP2 (fully_shard) on the module model: the full gradients after one step."""
    from torch.distributed.fsdp import fully_shard

    net = Net()
    for name in SIZES:
        fully_shard(getattr(net, name))
    fully_shard(net)
    x, y = data(0)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    torch.manual_seed(100)
    with mf.use_plan(plan, process_group=group):
        ((net(x[part]) - y[part]) ** 2).mean().backward()
    return {n: p.grad.full_tensor().detach().clone() for n, p in net.named_parameters()}


# Parameters a Random segment is handed but is not alone in reading: "unread" hands it the whole dict (the
# README's pattern), of which it reads w and b only (head_* are read outside); "tied" reads w inside the
# segment and outside it (a tied weight, as GPT-2's embedding and LM head); "twice" calls the segment twice
# on w and b alone (their rest, g - R1 - R2, is zero, and still sent: the identity test sees a sum). Every
# differentiated input is a parameter, so the tangents are the same on a shard and on the concatenated
# batch, and the reference is one process on it.
SHARED_PLAN = {"part": mf.Random(k=3, distribution="gaussian")}
PART = mf.fwd(lambda p, x: torch.tanh(F.linear(x, p["w"], p["b"])), name="part")


def _unread_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((F.linear(PART(p, x), p["head_w"], p["head_b"]) - y[:, :2]) ** 2).mean()


def _tied_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((PART(p, x) @ p["w"] + p["c"] - y) ** 2).mean()


def _twice_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    inner = {"w": p["w"], "b": p["b"]}
    return ((F.linear(PART(inner, x) * PART(inner, 2 * x), p["head_w"], p["head_b"]) - y[:, :2]) ** 2).mean()


SHARED_LOSSES = {"unread": _unread_loss, "tied": _tied_loss, "twice": _twice_loss}


def shared_params(case: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    names = {"unread": ("w", "b", "head_w", "head_b"), "tied": ("w", "b", "c"), "twice": ("w", "b", "head_w", "head_b")}
    shapes = {"w": (8, 6), "b": (8,), "head_w": (2, 8), "head_b": (2,), "c": (6,)}
    return {n: torch.randn(*shapes[n], dtype=DT, generator=g) for n in names[case]}


def shared_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(BATCH, 6, dtype=DT, generator=g), torch.randn(BATCH, 6, dtype=DT, generator=g)


class SharedNet(nn.Module):
    """A case of SHARED_LOSSES as a module: its parameters are leaves, as under DDP."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.loss = SHARED_LOSSES[case]
        self.p = nn.ParameterDict({n: nn.Parameter(t) for n, t in shared_params(case).items()})

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(dict(self.p), x, y)


def shared_runs(part: slice, group: Any) -> dict:
    """One step of every SHARED_LOSSES case: one process on the concatenated batch (``reference_*``) and
    this rank's shard reduced over ``group``, functionally (also with reduction="sum") and under DDP with
    mf.ddp_comm_hook; with the bytes madfunc all-reduced."""
    results: dict[Any, Any] = {}
    x, y = shared_data()
    for case, loss in SHARED_LOSSES.items():
        torch.manual_seed(200)
        results[case, "reference_functional"] = mf.mixed_grad(loss, SHARED_PLAN)(shared_params(case), x, y)
        for style, reduction in (("functional", "mean"), ("functional_sum", "sum")):
            torch.manual_seed(200)
            with counting() as calls:
                grad = mf.mixed_grad(loss, SHARED_PLAN, process_group=group, reduction=reduction)(
                    shared_params(case), x[part], y[part]
                )
            results[case, style] = {"grads": grad, "bytes": list(calls)}
        net = SharedNet(case)
        torch.manual_seed(200)
        with mf.use_plan(SHARED_PLAN):
            net(x, y).backward()
        results[case, "reference_module"] = {n: t.grad.detach().clone() for n, t in net.p.items()}
        net = SharedNet(case)
        model = DDP(net)
        model.register_comm_hook(group, mf.ddp_comm_hook)
        torch.manual_seed(200)
        with counting() as calls, mf.use_plan(SHARED_PLAN, process_group=group):
            model(x[part], y[part]).backward()
        grads = {n: t.grad.detach().clone() for n, t in net.p.items()}
        results[case, "ddp_scalar"] = {"grads": grads, "bytes": list(calls)}
    return results


def main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict[str, Any] = {"errors": {}}
    try:
        world_group = dist.group.WORLD
        local = [slice(rank * BATCH // world, (rank + 1) * BATCH // world)]
        every = [slice(r * BATCH // world, (r + 1) * BATCH // world) for r in range(world)]
        for name, plan in PLANS.items():
            reference_shards = every if name == "activation" else [slice(None)]
            results[name, "reference_module"] = module_run(plan, reference_shards, "single")
            results[name, "reference_functional"] = functional_run(plan, reference_shards)
            results[name, "ddp"] = module_run(plan, local, "ddp")
            results[name, "ddp_scalar"] = module_run(plan, local, "ddp_scalar", world_group)
            results[name, "functional"] = functional_run(plan, local, world_group)
        for name in ("exact", "gaussian"):
            try:
                results[name, "fsdp"] = fsdp_run(PLANS[name], rank, world, None)
                results[name, "fsdp_scalar"] = fsdp_run(PLANS[name], rank, world, world_group)
            except Exception:  # recorded: the test reports what FSDP2 refused
                results["errors"][name, "fsdp"] = traceback.format_exc()
        results["shared"] = shared_runs(local[0], world_group)
        # The guard: ranks seeded differently (seed + rank) draw different tangents.
        params, (x, y) = initial_params(), data(0)  # initial_params seeds torch: before manual_seed(rank)
        torch.manual_seed(rank)
        try:
            mf.mixed_grad(functional_loss, PLANS["gaussian"], process_group=world_group)(params, x, y)
        except RuntimeError as error:
            results["guard"] = str(error)
        # ... while a shared generator= keeps tangents shared whatever torch's own seed.
        g = mf.mixed_grad(
            functional_loss, PLANS["gaussian"], process_group=world_group, generator=torch.Generator().manual_seed(7)
        )(params, x, y)
        results["shared_generator"] = g
        # mixed_grad_and_value reduces the gradient as mixed_grad does, and leaves the value this rank's.
        torch.manual_seed(100)
        results["grad_and_value"] = mf.mixed_grad_and_value(
            functional_loss, PLANS["gaussian"], process_group=world_group
        )(params, x[local[0]], y[local[0]])
        # mark_segments under DDP (distributed_marking_worker.py), in this process group: no second spawn.
        try:
            results["marking"] = marking.main_runs(rank, world, counting)
        except Exception:  # recorded: the marking tests report it, the others still run
            results["errors"]["marking"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
