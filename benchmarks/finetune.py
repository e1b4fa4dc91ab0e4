"""Fine-tuning at inference memory: madfunc against MeZO (issue 19, item 4).

    python benchmarks/finetune.py                 # both parts at full size (idle machine: tens of minutes)
    python benchmarks/finetune.py --part memory   # memory and time per step, OPT-125m shape
    python benchmarks/finetune.py --part quality  # accuracy against wall time and forward passes
    python benchmarks/finetune.py --quick         # everything shrunk: a smoke test, under a minute

**Memory and time per step** on an OPT-125m-shaped ``OPTForCausalLM`` from transformers (12 layers, d_model
768, ffn 3072, 12 heads, vocabulary 50272, random init; float32, batch 4, sequence 256, 2 threads), one SGD
step of each method:

- ``backprop``: autograd and ``torch.optim.SGD``; ``checkpointed``: the same with activation checkpointing on
  every decoder layer (``torch.utils.checkpoint``, non-reentrant, as ``gradient_checkpointing_enable`` does);
- ``mezo``, ``mezo16``: MeZO (``benchmarks/mezo.py``, Malladi et al. 2023, Algorithm 1) with 1 and 16 probes;
- ``spsa``: the whole model as one ``mf.SPSA(k=1)`` segment; ``random1``, ``random16``: as one
  ``mf.Random(k)`` segment; ``mixed``: the embeddings and all decoder layers but the last as one
  ``mf.Random(k=1)`` segment, the last layer, final norm and head by backprop. madfunc's methods step with
  the seed-fused ``mf.SeedSGD`` (no ``p.grad`` for a Random or SPSA segment's parameters);
- ``jvp1``, ``jvp16``: floors, not methods: a plain ``torch.func.jvp`` of the loss with 1 and 16 tangents drawn
  before the step, no update (``finetune_models.jvp_floor_step``): the least memory and time a forward-mode
  step on PyTorch's formulas needs, to tell madfunc's overhead from forward mode's own cost.

Time: every method steps the same model in turn, in rounds (the order alternates between rounds), after
warm-up steps; the figure is the median, and a ratio the median of per-round ratios. Memory: each method in
a child process of its own (glibc's allocator pinned: ``MALLOC_PINNED``), two figures per method: the
deterministic peak of live tensor bytes of one step (``mf.measure_peak``, allocator-independent), and the
peak RSS of one step above the RSS before it (Linux's VmHWM, reset through ``/proc/self/clear_refs``). Both
are reported with the parameters' bytes added, i.e. as the memory a step needs in all.

**Quality against time** (``finetune_data.py``): a small OPT is pretrained by backprop on the source of
standard-library modules (cached in ``benchmarks/out/``), then fine-tuned on a task with a distribution
shift, by every method, over several seeds.

Results: printed, and as JSON in ``benchmarks/results/<date>-finetune.json`` (``--quick``:
``benchmarks/out/<date>-finetune-quick.json``; ``--json PATH`` to override). Nothing here asserts; the
notebook ``notebooks/06_finetune.ipynb`` checks the conclusions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_models import FULL, QUICK, Shape, Split, jvp_floor_step, opt_model  # noqa: E402
from mezo import MeZO  # noqa: E402

import madfunc as mf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# glibc pinned in the memory children (as examples/hf_finetune.py): blocks from 64 KiB up are mapped and
# unmapped on their own, so the RSS follows the live tensors instead of the order of earlier frees.
MALLOC_PINNED = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1"}
RESULT = "FINETUNE_RESULT "
METHODS = ("backprop", "checkpointed", "mezo", "mezo16", "spsa", "random1", "random16", "mixed", "jvp1", "jvp16")
ALL_METHODS = (*METHODS, "auto")  # "auto": mf.auto_plan within the quality part's budget (that part only)


# -- the methods ------------------------------------------------------------------------------------------

Step = Callable[[torch.Tensor, torch.Tensor], float]


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Learning rates and MeZO's eps, per family (zeroth-order and forward gradients take smaller steps)."""

    lr_backprop: float = 1e-3
    lr_zeroth: float = 1e-5
    eps: float = 1e-3
    budget: int | None = None  # method "auto": the bytes a step may add to the parameters (mf.auto_plan)
    # How SPSA and Random draw their directions: "auto" draws every leaf's at once below 32 MiB of them (fastest);
    # the quality part, under a memory budget at 2.5 MB of parameters, draws them leaf by leaf ("lazy"), as MeZO
    # regenerates its z from a seed (all at once costs a copy of the parameters: SPSA 1.70x MeZO's peak, not 1.00x).
    seeding: str = "auto"


def _backprop(split: Split, lr: float, checkpointed: bool) -> Step:
    opt = torch.optim.SGD(split.parameters(), lr=lr)

    def step(ids: torch.Tensor, targets: torch.Tensor) -> float:
        split.trunk.checkpointed = split.tail.checkpointed = checkpointed
        try:
            loss = split(ids, targets)
            loss.backward()
        finally:
            split.trunk.checkpointed = split.tail.checkpointed = False
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _mezo(split: Split, lr: float, eps: float, probes: int, seed: int) -> Step:
    from mezo import MezoDirections

    opt = MeZO(list(split.parameters()), lr=lr, eps=eps, n_probes=probes, directions=MezoDirections(seed))

    def step(ids: torch.Tensor, targets: torch.Tensor) -> float:
        return opt.step(lambda: split(ids, targets)).loss

    return step


def _seed_opt(split: Split, estimated: set[str], lr_exact: float, lr_estimated: float) -> torch.optim.Optimizer:
    """One seed-fused optimizer per model (a parameter's deferred gradients can reach only one; the timing
    rounds step one model with every method, at one tiny learning rate). Two groups: the parameters of
    segments under an estimate (``estimated``: "trunk", "tail" or "model") take ``lr_estimated``, since an
    estimate's noise grows with the number of scalars it covers; the others ``lr_exact``. The tied embedding
    lives in the trunk: where the trunk is estimated, it takes the small rate, its head part included."""
    opt = split.__dict__.get("seed_opt")
    if opt is None:
        small = set() if not estimated else (
            {id(p) for p in split.parameters()} if "model" in estimated
            else {id(p) for part in estimated for p in getattr(split, part).parameters()})
        groups = [{"params": [p for p in split.parameters() if id(p) in small], "lr": lr_estimated},
                  {"params": [p for p in split.parameters() if id(p) not in small], "lr": lr_exact}]
        opt = split.__dict__["seed_opt"] = mf.SeedSGD([g for g in groups if g["params"]], lr=lr_exact)
    return opt


def _planned(split: Split, hyper: Hyper, plan: Any, segments: tuple[str, ...], seed: int,
             example: tuple[torch.Tensor, torch.Tensor] | None = None, budget: int | None = None) -> Step:
    """A madfunc plan over segments of ``split``: ``("model",)`` the whole model as one segment, ``("trunk",)``
    the trunk only (the tail by plain backprop), ``("trunk", "tail")`` both; ``plan`` None: ``mf.auto_plan``
    chooses it on ``example`` within ``budget`` (bytes beyond the parameters), estimates allowed."""
    generator = torch.Generator().manual_seed(seed)
    whole = mf.fwd(split, name="model") if segments == ("model",) else None
    parts = {"trunk_call": mf.fwd(split.trunk, name="trunk") if "trunk" in segments else None,
             "tail_call": mf.fwd(split.tail, name="tail") if "tail" in segments else None}

    def loss_of(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if whole is not None:
            return whole(ids, targets)
        split.__dict__.update(parts)
        try:
            return split(ids, targets)
        finally:
            split.trunk_call = split.tail_call = None

    if plan is None:
        assert example is not None and budget is not None, "auto_plan needs an example batch and a budget"
        # (before the seed-fused optimizer claims the parameters: profiling a claimed Random segment fails in
        # autograd.grad, "differentiated Tensor ... not used in the graph")
        candidates = [mf.Reverse(), mf.Checkpointed(), mf.Random(k=16, seeding=hyper.seeding),
                      mf.Random(k=1, seeding=hyper.seeding), mf.SPSA(k=1, eps=hyper.eps, seeding=hyper.seeding)]
        plan = mf.auto_plan(loss_of, *example, budget=budget, exact=False, argnums=None, repeats=1,
                            candidates=candidates)
    estimated = {name for name, strategy in dict(plan).items() if isinstance(strategy, (mf.Random, mf.SPSA))}
    opt = _seed_opt(split, estimated, hyper.lr_backprop, hyper.lr_zeroth)

    def step(ids: torch.Tensor, targets: torch.Tensor) -> float:
        with mf.use_plan(plan, generator=generator):
            loss = loss_of(ids, targets)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step.plan = plan  # type: ignore[attr-defined]
    return step


def make_step(method: str, split: Split, hyper: Hyper, seed: int = 0,
              example: tuple[torch.Tensor, torch.Tensor] | None = None) -> Step:
    """One training step of ``method`` on ``split`` (see the module docstring), as ``step(ids, targets) -> loss``;
    ``"auto"`` (the quality part only) plans on ``example`` within ``hyper.budget``."""
    lr, eps, seeding = hyper.lr_zeroth, hyper.eps, hyper.seeding
    builders: dict[str, Callable[[], Step]] = {
        "backprop": lambda: _backprop(split, hyper.lr_backprop, checkpointed=False),
        "checkpointed": lambda: _backprop(split, hyper.lr_backprop, checkpointed=True),
        "mezo": lambda: _mezo(split, lr, eps, 1, seed),
        "mezo16": lambda: _mezo(split, lr, eps, 16, seed),
        "spsa": lambda: _planned(split, hyper, {"model": mf.SPSA(k=1, eps=eps, seeding=seeding)}, ("model",), seed),
        "random1": lambda: _planned(split, hyper, {"model": mf.Random(k=1, seeding=seeding)}, ("model",), seed),
        "random16": lambda: _planned(split, hyper, {"model": mf.Random(k=16, seeding=seeding)}, ("model",), seed),
        "mixed": lambda: _planned(split, hyper, {"trunk": mf.Random(k=1, seeding=seeding)}, ("trunk",), seed),
        "jvp1": lambda: jvp_floor_step(split, 1, seed),
        "jvp16": lambda: jvp_floor_step(split, 16, seed),
        "auto": lambda: _planned(split, hyper, None, ("trunk", "tail"), seed, example, hyper.budget),
    }
    if method not in builders:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(builders)}")
    return builders[method]()


def lm_batch(shape: Shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(seed))
    return ids, ids


# -- memory: one child process per method -----------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(method: str, shape: Shape) -> dict[str, Any]:
    """In this process: one warm-up step, one step under ``mf.measure_peak``, one with its RSS peak read."""
    torch.set_num_threads(2)
    split = Split(opt_model(shape))
    step = make_step(method, split, Hyper())
    batch = lm_batch(shape, 1)
    step(*batch)  # warm-up: lazy tables, kernels, the optimizer's first use
    param_bytes = sum(p.numel() * p.element_size() for p in split.parameters())
    with mf.measure_peak() as meter:
        step(*batch)
    rss = None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS, to the RSS now (Linux >= 4.0)
        before = _status_kib("VmRSS")
        step(*batch)
        rss = (_status_kib("VmHWM") - before) * 1024
    except OSError:  # not Linux: the deterministic figure only
        pass
    return dict(method=method, param_bytes=param_bytes, live_peak=param_bytes + meter.peak_bytes,
                step_live_peak=meter.peak_bytes, rss_peak=None if rss is None else param_bytes + rss,
                step_rss_peak=rss)


def memory_in_children(methods: list[str], quick: bool) -> dict[str, dict[str, Any]]:
    """Each method's memory in a child process of its own (``--quick``: all in one child, one after another:
    at that size only the deterministic figure means anything, and each child costs seconds of imports)."""
    groups = [methods] if quick else [[m] for m in methods]
    out = {}
    for group in groups:
        env = {**os.environ, **MALLOC_PINNED}
        cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", ",".join(group)]
        proc = subprocess.run(cmd + (["--quick"] if quick else []), stdout=subprocess.PIPE, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"finetune: the memory child of {group} failed (exit status {proc.returncode})")
        out.update(json.loads(lines[-1][len(RESULT):]))
    return out


# -- time: every method in turn, one process --------------------------------------------------------------


def time_methods(methods: list[str], shape: Shape, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each method in each round, interleaved, all stepping one model."""
    split = Split(opt_model(shape))
    hyper = Hyper(lr_backprop=1e-6, lr_zeroth=1e-7)  # tiny steps: the model barely moves between methods
    steps = {m: make_step(m, split, hyper) for m in methods}
    batch = lm_batch(shape, 1)
    for step in steps.values():
        for _ in range(warmup):
            step(*batch)
    times: dict[str, list[float]] = {m: [] for m in methods}
    order = list(steps.items())
    for r in range(rounds):
        for name, step in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step(*batch)
            times[name].append(time.perf_counter() - start)
    return times


def paired(times: dict[str, list[float]], a: str, b: str) -> float | None:
    if a not in times or b not in times:
        return None
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


TARGETS = (  # (what, ours, reference, measure, limit)
    ("Random(k=1)+fused peak / MeZO's", "random1", "mezo", "memory", 1.10),
    ("Random(k=1)+fused step time / MeZO's", "random1", "mezo", "time", 1.0),
    ("Random(k=16) step time / MeZO 16 probes'", "random16", "mezo16", "time", 0.7),
    ("Random(k=1)+fused peak / backprop's", "random1", "backprop", "memory", None),
    ("Random(k=1)+fused peak / checkpointed backprop's", "random1", "checkpointed", "memory", None),
    ("SPSA(k=1)+fused peak / MeZO's", "spsa", "mezo", "memory", None),
    ("SPSA(k=1)+fused step time / MeZO's", "spsa", "mezo", "time", None),
    ("mixed plan peak / MeZO's", "mixed", "mezo", "memory", None),
    ("floor: plain jvp peak / MeZO's", "jvp1", "mezo", "memory", None),
    ("floor: plain jvp step time / MeZO's", "jvp1", "mezo", "time", None),
    ("floor: plain vmap(jvp), 16 tangents, time / MeZO 16 probes'", "jvp16", "mezo16", "time", None),
    ("Random(k=1)+fused peak / plain jvp's", "random1", "jvp1", "memory", None),
    ("Random(k=1)+fused step time / plain jvp's", "random1", "jvp1", "time", None),
    ("Random(k=16) step time / plain vmap(jvp)'s", "random16", "jvp16", "time", None),
)


def memory_part(args: argparse.Namespace) -> dict[str, Any]:
    shape = QUICK if args.quick else FULL
    methods = [m for m in args.methods if m in METHODS]
    torch.set_num_threads(2)
    # --time-only: no memory children (each runs 3 steps: MeZO with 16 probes is 96 forward passes of OPT-125m)
    memory = {} if args.time_only else memory_in_children(methods, args.quick)
    times = time_methods(methods, shape, rounds=args.rounds or (3 if args.quick else 7), warmup=1)
    print(f"\nOPT {shape.layers} layers, d_model {shape.width}, ffn {shape.ffn}, vocab {shape.vocab}; float32, batch "
          f"{shape.batch} x {shape.seq} tokens, 2 threads; optimizer for madfunc: "
          "mf.SeedSGD (fused)")
    print("peak: parameters + the step's peak; live = mf.measure_peak (tensor storages), RSS = VmHWM above the "
          "RSS before the step (" + " ".join(f"{k}={v}" for k, v in MALLOC_PINNED.items()) + ")")
    head = f"{'method':<14}{'live MB':>9}{'RSS MB':>9}{'ms/step':>10}{'live/MeZO':>11}{'RSS/MeZO':>10}{'time/MeZO':>11}"
    print(head + "\n" + "-" * len(head))
    ref = memory.get("mezo")
    for m in methods:
        mem, med = memory.get(m), statistics.median(times[m]) * 1e3
        if mem is None:
            rt = paired(times, m, "mezo") or float("nan")
            print(f"{m:<14}{'-':>9}{'-':>9}{med:>10.1f}{'-':>11}{'-':>10}{rt:>11.3f}")
            continue
        live = mem["live_peak"] / 2**20
        rss = mem["rss_peak"] / 2**20 if mem["rss_peak"] is not None else float("nan")
        rl = mem["live_peak"] / ref["live_peak"] if ref else float("nan")
        rr = mem["rss_peak"] / ref["rss_peak"] if ref and mem["rss_peak"] and ref["rss_peak"] else float("nan")
        rt = paired(times, m, "mezo") or float("nan")
        print(f"{m:<14}{live:>9.1f}{rss:>9.1f}{med:>10.1f}{rl:>11.3f}{rr:>10.3f}{rt:>11.3f}")
    rows = []
    print("\ntargets (memory: deterministic live peak; RSS beside it)")
    for what, ours, reference, measure, limit in TARGETS:
        if ours not in methods or reference not in methods:
            continue
        if measure == "time":
            ratio, rss_ratio = paired(times, ours, reference), None
        elif ours not in memory or reference not in memory:
            continue
        else:
            ratio = memory[ours]["live_peak"] / memory[reference]["live_peak"]
            a, b = memory[ours]["rss_peak"], memory[reference]["rss_peak"]
            rss_ratio = a / b if a and b else None
        status = "" if limit is None else ("met" if ratio <= limit else "MISSED")
        extra = f" (RSS {rss_ratio:.3f})" if rss_ratio is not None else ""
        print(f"  {what:<50} {ratio:.3f}{extra}" + (f"  limit {limit}: {status}" if limit else ""))
        rows.append(dict(target=what, ratio=ratio, rss_ratio=rss_ratio, limit=limit))
    return dict(shape=dataclasses.asdict(shape), memory=memory, times=times, targets=rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="everything shrunk (a smoke test, under a minute)")
    p.add_argument("--part", choices=("memory", "quality", "both"), default="both")
    p.add_argument("--pretrain-steps", type=int, default=None, help="quality part: pretraining steps (default 1500)")
    p.add_argument("--time-only", action="store_true", help="memory part: time the methods, no memory children")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated, of: " + ", ".join(ALL_METHODS))
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7; --quick 3)")
    p.add_argument("--seeds", type=int, default=None, help="quality part: seeds per method (default 3; --quick 1)")
    p.add_argument("--lr", default="", help="quality part: learning rates of exact gradients and of estimates, e.g. "
                   "exact=1e-2,estimated=1e-5 (default: LR_EXACT, LR_ESTIMATED in finetune_data.py)")
    p.add_argument("--tied", action="store_true", help="quality part: tie the LM head to the token embedding "
                   "(OPT's default; see UNTIED in finetune_data.py)")
    p.add_argument("--seconds", type=float, default=None, help="quality part: MeZO's training seconds per run, "
                   "the other methods' half of it (default 240)")
    p.add_argument("--json", default=None, help="where to write the results (default benchmarks/results/<date>-...)")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.lr = {k.strip(): float(v) for k, v in (item.split("=") for item in args.lr.split(",") if item.strip())}
    except ValueError:
        p.error(f"--lr: expected key=value pairs (exact=..., estimated=...), got {args.lr!r}")
    bad = [m for m in args.methods if m not in ALL_METHODS] + [k for k in args.lr if k not in ("exact", "estimated")]
    if bad:
        p.error(f"--methods/--lr: unknown {bad}; methods: {', '.join(ALL_METHODS)}; --lr keys: exact, estimated")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child_memory:
        shape = QUICK if args.quick else FULL
        found = {m: measure_memory(m, shape) for m in args.child_memory.split(",")}
        print(RESULT + json.dumps(found), flush=True)
        return {}
    results: dict[str, Any] = dict(date=datetime.date.today().isoformat(), quick=args.quick,
                                   torch=torch.__version__, load=os.getloadavg())
    if args.part in ("memory", "both"):
        results["memory_time"] = memory_part(args)
    if args.part in ("quality", "both"):
        import finetune_data

        results["quality"] = finetune_data.quality_part(args)
    # A quick run is scratch: benchmarks/out/ (ignored by git); a full run is kept in benchmarks/results/.
    name = f"{results['date']}-finetune{'-quick' if args.quick else ''}.json"
    path = args.json or os.path.join(HERE, "out" if args.quick else "results", name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nresults: {path}")
    return results


if __name__ == "__main__":
    main()
