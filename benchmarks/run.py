"""Ratio benchmarks of the performance issue: ``python benchmarks/run.py [--quick] [--json PATH]``.

Every comparison times its candidates side by side in one process: warm-up calls, then rounds in
which each candidate runs once (the order alternates between rounds, to cancel drift), and the
median per candidate. Memory is measured in child processes (peak RSS of the step above the RSS
right before it). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch.func import grad, jvp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

import madfunc as mf  # noqa: E402

THREADS = 2
# The memory children pin glibc's mmap threshold at its initial value (128 KiB). By default glibc raises it
# to the size of the largest block freed so far, after which large tensors come from the heap and freed
# ones stay in the process: the peak RSS then depends on the order of earlier frees, not on what is alive
# (the same code read 109-127 MB or 184-201 MB with another but equivalent seeding order; pinned, both 76 MB).
MALLOC_FIXED = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def timeit(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate in each round, measured interleaved."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    items = list(candidates.items())
    for r in range(rounds):
        for name, fn in items if r % 2 == 0 else items[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def loop_of_jvps(loss: Callable, k: int) -> Callable:
    """The naive forward gradient: k single-tangent jvp calls, each with fresh Gaussian tangents."""

    def step(params: tuple, *data: torch.Tensor) -> list[torch.Tensor]:
        g = [torch.zeros_like(p) for p in params]
        for _ in range(k):
            v = tuple(torch.randn_like(p) for p in params)
            _, d = jvp(lambda *ps: loss(ps, *data), params, v)
            torch._foreach_add_(g, list(v), alpha=d.item() / k)
        return g

    return step


def time_targets(quick: bool) -> list[dict]:
    rounds, warmup = (7, 2) if quick else (21, 3)
    rows = []

    def compare(target: str, what: str, ours: Callable, reference: Callable, limit: float | None,
                args: tuple, ref_name: str) -> None:
        t = timeit({"ours": lambda: ours(*args), "reference": lambda: reference(*args)}, rounds, warmup)
        # The ratio is the median of per-round ratios: the two calls of a round ran back to back, so
        # load from other processes on the machine (drift) cancels better than in a ratio of medians.
        paired = statistics.median(a / b for a, b in zip(t["ours"], t["reference"], strict=False))
        rows.append(dict(target=target, what=what, reference=ref_name, ours_ms=statistics.median(t["ours"]) * 1e3,
                         reference_ms=statistics.median(t["reference"]) * 1e3, ratio=paired, limit=limit,
                         ratio_of_medians=statistics.median(t["ours"]) / statistics.median(t["reference"])))
        print_row(rows[-1])

    mlp = models.mlp_params(8, 512)
    mlp_xy = models.mlp_data(128, 512)
    backprop = grad(models.mlp_loss)
    compare("1", "all-Reverse plan, MLP 8x512 b128 (a segment per layer)",
            mf.mixed_grad(models.segmented_mlp_loss, plan={"layer": "rev"}), backprop, 1.05,
            (mlp, *mlp_xy), "torch.func.grad")
    cnn = models.cnn_params()
    cnn2 = models.cnn_data(2)
    compare("1b", "all-Reverse plan, small CNN b2 (info)",
            mf.mixed_grad(models.whole_cnn_loss, plan={"cnn": "rev"}), grad(models.cnn_loss), None,
            (cnn, *cnn2), "torch.func.grad")
    for dist, limit in (("gaussian", 1.0), ("rademacher", None)):
        compare("2" if limit else "2b", f"MLP 8x512 b128 as one Random(k=1, {dist!r}) segment",
                mf.mixed_grad(models.whole_mlp_loss, plan={"mlp": mf.Random(k=1, distribution=dist)}),
                backprop, limit, (mlp, *mlp_xy), "backprop step")
    for dist, limit in (("gaussian", 1.2), ("rademacher", 1.05)):  # issue 11's targets, with kept tangents
        compare(f"2 kept{'' if dist == 'gaussian' else ' b'}", f"MLP 8x512 b128, Random(k=1, {dist!r}, kept)",
                mf.mixed_grad(models.whole_mlp_loss, plan={"mlp": mf.Random(1, dist, seeding="kept")}),
                backprop, limit, (mlp, *mlp_xy), "backprop step")
    for dist, limit in (("gaussian", 0.6), ("rademacher", 0.45)):  # issue 11's targets (issue 4: 0.5 Gaussian)
        # 16 x 2.1M tangents (134 MB) are over the 32 MiB threshold, so "auto" seeds lazily (least
        # memory); the "eager" rows show the speed a user gets by asking for it.
        for seeding in ("auto", "eager"):
            target = ("3" if dist == "gaussian" else "3b") + ("" if seeding == "auto" else " eager")
            strategy = mf.Random(k=16, distribution=dist, seeding=seeding)
            compare(target, f"MLP 8x512 b128, {strategy!r}",
                    mf.mixed_grad(models.whole_mlp_loss, plan={"mlp": strategy}),
                    loop_of_jvps(models.mlp_loss, 16), limit if seeding == "auto" else None, (mlp, *mlp_xy),
                    "loop of 16 jvp calls")
    for batch, limit in ((2, 3.5), (32, 24.0)):
        compare(f"4 (b{batch})", f"small CNN b{batch}, Exact() (619 basis tangents)",
                mf.mixed_grad(models.whole_cnn_loss, plan={"cnn": mf.Exact()}), grad(models.cnn_loss),
                limit, (cnn, *models.cnn_data(batch)), "backprop step")
    compile_targets(compare, (mlp, *mlp_xy), (cnn, *cnn2))
    rows += automad_targets(quick)
    return rows


def automad_targets(quick: bool) -> list[dict]:
    """Issue 11, target 1: Exact on AutoMAD's test CNN vs AutoMAD, from automad_peer.py in a child process (it
    pins glibc's malloc thresholds, which must be set before start-up); no rows if AutoMAD is not beside us."""
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "automad_peer.json")
        args = [sys.executable, os.path.join(here, "automad_peer.py"), "--threads", str(torch.get_num_threads()),
                "--json", path] + (["--quick"] if quick else [])
        subprocess.run(args, check=True, capture_output=True, text=True)
        if not os.path.exists(path):  # AutoMAD not found: the script said so and wrote nothing
            return []
        with open(path) as f:
            found = json.load(f)
    rows = []
    for row, limit in zip(found["rows"], (0.75, 0.85), strict=True):
        what = f"Exact() on AutoMAD's test CNN b{row['batch']} (malloc pinned)"
        rows.append(dict(target=f"1 (b{row['batch']})", what=what, reference="AutoMAD", ours_ms=row["ours_ms"],
                         reference_ms=row["reference_ms"],
                         ratio=row["ratio"], limit=limit))
        print_row(rows[-1])
    return rows


def compile_targets(compare: Callable, mlp_args: tuple, cnn_args: tuple) -> None:
    """Issue 11, target 4: torch.compile(step) vs the same step eager (inductor; first calls are warm-up)."""
    cases = (("MLP", models.whole_mlp_loss, "mlp", mf.Random(1, "rademacher", seeding="kept"), mlp_args),
             ("MLP", models.whole_mlp_loss, "mlp", mf.Random(16, "gaussian"), mlp_args),
             ("CNN b2", models.whole_cnn_loss, "cnn", mf.Exact(), cnn_args))
    for i, (model, loss, segment, strategy, args) in enumerate(cases):
        torch._dynamo.reset()  # one code object for every case's step: its cache must start empty
        grad_fn = mf.mixed_grad(loss, plan={segment: strategy})

        def step(params: tuple, *data: torch.Tensor, grad_fn: Callable = grad_fn) -> tuple:
            return tuple(p - 0.01 * g for p, g in zip(params, grad_fn(params, *data), strict=True))

        with torch._dynamo.config.patch(error_on_recompile=True):  # a new seed must not recompile: it raises
            compare(f"6{'abc'[i]}", f"torch.compile(step), {model}, {strategy!r}", torch.compile(step), step, 1.0,
                    args, "the same step eager")
    # One full graph (fullgraph=True raises on any break): mixed_grad(traceable=True), whose segments are plain
    # torch code, vs the default engine's step eagerly. Small MLP (overhead-bound: the case) and the 8x512.
    small = (models.mlp_params(3, 32), *models.mlp_data(16, 32))
    for target, what, args in (("6d", "MLP 3x32 b16", small), ("6e", "MLP 8x512 b128", mlp_args)):
        torch._dynamo.reset()
        plan = {"mlp": mf.Random(1)}
        traced = mf.mixed_grad(models.whole_mlp_loss, plan=plan, traceable=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compare(target, f"torch.compile(mixed_grad(traceable=True), fullgraph=True), {what}, Random(k=1)",
                    torch.compile(traced, fullgraph=True), mf.mixed_grad(models.whole_mlp_loss, plan=plan), None,
                    args, "default engine, eager")


# -- memory, in child processes ------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(kind: str, depth: int) -> None:
    width, batch = 256, 4096
    if kind == "forward":
        step = mf.mixed_grad(models.whole_mlp_loss, plan={"mlp": mf.Random(k=4, distribution="rademacher")})
    else:
        step = grad(models.mlp_loss)
    step(models.mlp_params(2, 8), *models.mlp_data(4, 8))  # warm up the code paths, allocating little
    params, data = models.mlp_params(depth, width), models.mlp_data(batch, width)
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = _rss_bytes()
    g = step(params, *data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del g
    print(json.dumps(dict(kind=kind, depth=depth, start_mb=start / 2**20, peak_above_start_mb=(peak - start) / 2**20,
                          earlier_peak_above_start_mb=(before_max - start) / 2**20)))


def measure_memory() -> tuple[list[dict], dict]:
    def child(kind: str, depth: int) -> dict:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", kind, str(depth),
                              "--threads", str(torch.get_num_threads())],
                             check=True, capture_output=True, text=True, env={**os.environ, **MALLOC_FIXED})
        return json.loads(out.stdout.strip().splitlines()[-1])

    runs = {(kind, depth): child(kind, depth) for kind, depth in (("forward", 16), ("forward", 64), ("backprop", 64))}
    f16, f64, b64 = (runs[key]["peak_above_start_mb"] for key in (("forward", 16), ("forward", 64), ("backprop", 64)))
    rows = [
        dict(target="5a", what="Random(k=4,'rademacher') MLP w256 b4096: peak growth depth 16 -> 64",
             reference="same at depth 16", ours_ms=None, reference_ms=None, ratio=f64 / f16, limit=1.6,
             ours_mb=f64, reference_mb=f16),
        dict(target="5b", what="Random(k=4,'rademacher') MLP w256 b4096 depth 64 vs backprop",
             reference="backprop step", ours_ms=None, reference_ms=None, ratio=f64 / b64, limit=0.25,
             ours_mb=f64, reference_mb=b64),
    ]
    for row in rows:
        print_row(row)
    return rows, {f"{k}@{d}": v for (k, d), v in runs.items()}


def print_row(row: dict) -> None:
    if row.get("ours_ms") is not None:
        detail = f"{row['ours_ms']:8.2f} ms vs {row['reference_ms']:8.2f} ms"
    else:
        detail = f"{row['ours_mb']:8.1f} MB vs {row['reference_mb']:8.1f} MB"
    limit = row["limit"]
    verdict = "" if limit is None else ("  met" if row["ratio"] <= limit else "  MISSED")
    bound = "info" if limit is None else f"<= {limit:g}"
    print(f"{row['target']:<7} {row['what']:<62} {detail}  ratio {row['ratio']:6.3f} ({bound}){verdict}", flush=True)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (well under two minutes)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--memory-child", nargs=2, metavar=("KIND", "DEPTH"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads (default 2, the issue's setting; 1 is far steadier on a loaded machine)")
    parser.add_argument("--only", choices=["time", "memory"], help="run only the timing or memory part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    info = machine()
    print(f"madfunc benchmarks: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, load average "
          f"{os.getloadavg()[0]:.1f}{' (quick)' if args.quick else ''}")
    started = time.perf_counter()
    rows: list[dict] = []
    memory: dict = {}
    # Memory first, while this process is small: Linux carries a process's peak RSS into the child it
    # spawns (vfork + exec records the parent's high-water mark as the child's ru_maxrss), so children
    # spawned after the timing rows (and torch.compile's) started from this process's peak, not their own.
    if args.only != "time":
        mem_rows, memory = measure_memory()
        rows += mem_rows
    if args.only != "memory":
        rows += time_targets(args.quick)
    print(f"({time.perf_counter() - started:.0f} s, load average now {os.getloadavg()[0]:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, quick=args.quick, rows=rows, memory_children=memory), f, indent=2)


if __name__ == "__main__":
    main()
