"""``mark_segments`` under DDP: the cases ``distributed_worker.main`` runs in its process group (one spawn).

A ``Blocks`` model (``blocks``: a ModuleList of Linear + Tanh, then ``head``) is marked
``{"blocks.*": "fwd"}`` in three ORDERS: before wrapping in DDP; after, on the DDP wrapper (the segments
are then named ``module.blocks.i``, DDP's ``module.`` prefix); after, on ``ddp.module`` (``blocks.i``).
Each runs one step of every PLANS entry on this rank's shard: Exact under plain DDP, Random with
``mf.ddp_comm_hook`` and ``process_group``. References (one process, no communication), as
distributed_worker's: the concatenated batch (plain autograd for Exact; the same torch seed for
"random_first", whose Random segment sees data only, so its tangents are those of the concatenated batch);
for "random_all", where blocks.1 and blocks.2 take tangents on their activation inputs too, the mean over
the shards of single-process runs with the same seed. Each also has a *wrong* reference (this rank's shard
alone; another seed; the concatenated batch for "random_all") that the tests check is far from the right
one, so a comparison that passes is not vacuous. Tangents are seeded per segment call in call order, not
by name, so the prefixed names draw the same tangents as the plain ones.

``gpt2_runs``: a tiny GPT-2 (float64, library defaults but no dropout), marked ``transformer.h.*`` then
wrapped in DDP, Exact, against plain autograd on the concatenated batch.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import madfunc as mf

DT = torch.float64
BATCH, SEED = 8, 300
SIZES = ((6, 8), (8, 8), (8, 8))
HEAD = (8, 2)
ORDERS = ("marked_then_ddp", "ddp_then_marked", "ddp_module_marked")
# prefix -> plan; prefix is "module." where the DDP wrapper itself was marked.
PLANS: dict[str, Callable[[str], dict[str, Any]]] = {
    "exact": lambda p: {f"{p}blocks.*": "exact"},
    "random_first": lambda p: {f"{p}blocks.0": mf.Random(k=2), f"{p}blocks.1": "exact", f"{p}blocks.2": "exact"},
    "random_all": lambda p: {f"{p}blocks.*": mf.Random(k=2)},
}


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in SIZES)
        self.head = nn.Linear(*HEAD)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20)
    return torch.randn(BATCH, SIZES[0][0], dtype=DT, generator=g), torch.randn(BATCH, HEAD[1], dtype=DT, generator=g)


def prefix(order: str) -> str:
    return "module." if order == "ddp_then_marked" else ""


def build(order: str) -> tuple[DDP, Blocks, mf.SegmentHandle]:
    net = Blocks()
    if order == "marked_then_ddp":
        handle = mf.mark_segments(net, {"blocks.*": "fwd"})
        return DDP(net), net, handle
    ddp = DDP(net)
    if order == "ddp_then_marked":
        return ddp, net, mf.mark_segments(ddp, {"module.blocks.*": "fwd"})
    return ddp, net, mf.mark_segments(ddp.module, {"blocks.*": "fwd"})


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def single(plan: dict | None, part: slice, seed: int = SEED) -> dict[str, torch.Tensor]:
    """One process: the gradient on ``x[part]``, plain autograd (``plan`` None: unmarked) or marked."""
    net = Blocks()
    x, y = data()
    if plan is None:
        ((net(x[part]) - y[part]) ** 2).mean().backward()
        return grads(net)
    with mf.mark_segments(net, {"blocks.*": "fwd"}):
        torch.manual_seed(seed)
        with mf.use_plan(plan):
            ((net(x[part]) - y[part]) ** 2).mean().backward()
    return grads(net)


def references(rank: int, world: int) -> dict[Any, Any]:
    own = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    every = [slice(r * BATCH // world, (r + 1) * BATCH // world) for r in range(world)]
    shards = [single(PLANS["random_all"](""), s) for s in every]
    return {
        ("reference", "exact"): single(None, slice(None)),
        ("wrong", "exact"): single(None, own),  # DDP without its reduction
        ("reference", "random_first"): single(PLANS["random_first"](""), slice(None)),
        ("wrong", "random_first"): single(PLANS["random_first"](""), slice(None), seed=SEED + 1),
        ("reference", "random_all"): {n: sum(g[n] for g in shards) / world for n in shards[0]},
        ("wrong", "random_all"): single(PLANS["random_all"](""), slice(None)),  # other activation tangents
    }


def ddp_step(order: str, plan_name: str, part: slice, group: Any, counting: Callable) -> dict[str, Any]:
    """One DDP step of ``order`` x ``plan_name`` on this rank's shard: gradients (by the inner model's
    parameter names), segment names, state_dict keys and the bytes madfunc all-reduced (Random: the hook's)."""
    ddp, net, handle = build(order)
    random = plan_name != "exact"
    if random:
        ddp.register_comm_hook(group, mf.ddp_comm_hook)
    x, y = data()
    torch.manual_seed(SEED)
    with counting() as calls, mf.use_plan(PLANS[plan_name](prefix(order)), process_group=group if random else None):
        ((ddp(x[part]) - y[part]) ** 2).mean().backward()
    return {"grads": grads(net), "names": list(handle.segments), "keys": list(ddp.state_dict()), "bytes": list(calls)}


def marking_runs(rank: int, world: int, group: Any, counting: Callable) -> dict[Any, Any]:
    """Every ORDERS x PLANS step, the references, and what misnamed keys are told. A failing case is
    recorded under ``errors`` (every rank fails alike, so none waits on a collective)."""
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results: dict[Any, Any] = {"errors": {}, **references(rank, world)}
    results["unmarked_keys"] = list(DDP(Blocks()).state_dict())
    for order in ORDERS:
        for plan_name in PLANS:
            try:
                results[order, plan_name] = ddp_step(order, plan_name, part, group, counting)
            except Exception:
                results["errors"][order, plan_name] = traceback.format_exc()
    # DDP first, marked on the wrapper: a plan naming the unprefixed modules matches no segment.
    ddp, _, _ = build("ddp_then_marked")
    x, y = data()
    try:
        with mf.use_plan({"blocks.*": "exact"}):
            ((ddp(x[part]) - y[part]) ** 2).mean().backward()
    except ValueError as error:
        results["unprefixed_plan"] = str(error)
    # ... and marking ddp.module with the wrapper's names is refused with a hint.
    try:
        mf.mark_segments(DDP(Blocks()).module, {"module.blocks.*": "fwd"})
    except ValueError as error:
        results["prefixed_spec"] = str(error)
    return results


def gpt2_runs(rank: int, world: int) -> dict[str, Any] | None:
    """GPT-2 (tiny, float64, use_cache on, dropout off) marked ``transformer.h.*`` then under DDP with Exact:
    its gradients, and one process's on the concatenated batch (and on this rank's shard: a wrong one)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    # bos/eos in the vocabulary only silence a warning; no dropout, so the ranks and one process agree.
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, vocab_size=50, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).to(DT)

    # Exact's cost grows with the tokens: 2 sequences of 5 per rank.
    ids = torch.randint(0, config.vocab_size, (2 * world, 5), generator=torch.Generator().manual_seed(21))
    part = slice(2 * rank, 2 * rank + 2)
    results: dict[str, Any] = {}
    for name, rows in (("reference", slice(None)), ("wrong", part)):
        net = model()
        net(input_ids=ids[rows], labels=ids[rows]).loss.backward()
        results[name] = grads(net)
    results["unmarked_keys"] = list(DDP(model()).state_dict())
    net = model()
    handle = mf.mark_segments(net, {"transformer.h.*": "fwd"})
    ddp = DDP(net)
    with mf.use_plan({"transformer.h.*": "exact"}):
        out = ddp(input_ids=ids[part], labels=ids[part])
        out.loss.backward()
    cache = out["cache"] if "cache" in out else out.get("past_key_values")  # transformers 5 renamed it
    results.update(grads=grads(net), names=list(handle.segments), keys=list(ddp.state_dict()),
                   training=net.training, cache=type(cache).__name__)
    return results


def main_runs(rank: int, world: int, counting: Callable) -> dict[str, Any]:
    """What distributed_worker.main stores under ``"marking"``."""
    group = dist.group.WORLD
    return {"blocks": marking_runs(rank, world, group, counting), "gpt2": gpt2_runs(rank, world)}
