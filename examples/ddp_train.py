"""Data-parallel training with a Random forward segment that all-reduces k numbers instead of its gradient.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py

gloo on CPU (use "nccl" and one GPU per rank on GPUs). Every rank seeds torch identically, so the
Random segment's tangents are shared (madfunc checks it in the same all-reduce); each rank trains on its
own shard of a toy regression problem. At the end, rank 0 checks that the parameters are bit-identical
on every rank.
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import madfunc as mf


def main() -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: a single machine
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)  # the same seed on every rank: shared tangents (and the same initial model)
        model = nn.Sequential(mf.fwd(nn.Linear(16, 64), name="stem"), nn.Tanh(), mf.rev(nn.Linear(64, 1), name="head"))
        ddp = DDP(model)
        ddp.register_comm_hook(dist.group.WORLD, mf.ddp_comm_hook)  # leaves the Random segment's gradients alone
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(1 + rank)  # each rank its own shard
        target = torch.randn(16, 1, generator=torch.Generator().manual_seed(2))
        for step in range(30):
            x = torch.randn(64, 16, generator=data)
            y = torch.tanh(x @ target)
            opt.zero_grad()
            with mf.use_plan({"stem": mf.Random(k=8)}, process_group=dist.group.WORLD):
                loss = ((ddp(x) - y) ** 2).mean()
                loss.backward()
            opt.step()
            if rank == 0 and step % 10 == 0:
                print(f"step {step:2d}  loss (rank 0's shard) {loss.item():.4f}")
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered)
            print(f"parameters bit-identical on all {world} ranks: {same}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
