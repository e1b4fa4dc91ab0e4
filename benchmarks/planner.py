"""The memory-budget planner's benchmark (issue 18, item 6): step time against peak memory, and its Targets.

``python benchmarks/planner.py [--quick] [--models mlp,transformer,rollout] [--json PATH] [--no-rss]``

For each model of ``planner_models.py`` (four or two segments) it measures, in one process on 2 threads:

- every per-segment assignment of ``Reverse``/``Checkpointed``/``Exact`` (``Exact`` only on segments that push
  at most ``--exact-limit`` tangents: above that its output tangents alone cost gigabytes and hours, so those
  assignments are listed as skipped, with the tangents they would push), and all-``Reverse``, all-``Checkpointed``,
  all-``Exact``, all-``Random(k)``;
- ``mf.auto_plan`` at 7 budgets between the smallest exact plan's peak and all-``Reverse``'s (``exact=True``),
  and below the smallest exact plan (``exact=False``).

Per plan: the step time (median over interleaved rounds: each round runs every plan once, the order reversed
every other round, after warm-up calls, so drift and load hit all plans alike), the peak bytes of the tensors
one step allocates (``mf.measure_peak``: deterministic, the quantity a budget bounds) and, for the headline
plans, the peak RSS of a step in a child process (glibc's mmap threshold pinned). Then it checks the issue's
Targets and writes everything to ``benchmarks/results/<date>-planner.json``. The last part reproduces
Panchal et al. 2025 (arXiv 2506.21833) on the digits MLP: steps and time to a target test accuracy at equal
memory, checkpointed backprop against forward gradients (``Random(k)``), see ``panchal``. Not a test: it
prints which targets hold and which do not.

Cost: ``auto_plan`` profiles the step afresh at every budget (tens of steps each), and a full-size rollout step
takes seconds (about 14 s for Reverse and 29 s for Exact at load 4 on 2 cores, 2026-12-07), so the full run is
long: ``--budgets 3`` or ``--models mlp,transformer`` shorten it. ``--quick``: a smoke test, about 5 minutes
at load 5 (tests/test_benchmarks_planner.py).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from planner_models import MODELS, PlannerModel, mlp_logits, mlp_model  # noqa: E402

import madfunc as mf  # noqa: E402

THREADS = 2
CANDIDATES = ("rev", "ckpt", "exact")
CODES = {"rev": "R", "ckpt": "C", "exact": "E"}
RANDOM_K = 4
MiB = 2**20
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def log(message: str) -> None:
    """Progress, to stderr (stdout carries the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (Linux), or '?' elsewhere."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def plan_key(model: PlannerModel, plan: mf.Plan | dict) -> str:
    """A plan's canonical string: every segment of ``model`` in call order (what dedupes auto_plan's picks)."""
    plan = plan if isinstance(plan, mf.Plan) else mf.Plan(plan)
    return ",".join(f"{s}={plan.lookup(s)}" for s in model.segments)


def short(model: PlannerModel, key: str) -> str:
    """``R C E`` style: one letter per segment for the three exact strategies, else the strategy's string."""
    parts = [p.split("=", 1)[1] for p in key.split(",")]
    return " ".join(CODES.get(p, p.replace("random:", "rnd").replace(":gaussian", "")) for p in parts)


# -- what each segment would cost ----------------------------------------------------------------------------------
def segment_sizes(model: PlannerModel) -> dict[str, dict]:
    """Per segment: the scalars it differentiates (``Exact``'s tangent count) and its output size, from one
    ``mf.inspect`` run under ``Random(k=1)`` (cheap; the counts do not depend on the strategy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mf.PerformanceWarning)
        report = mf.inspect(model.loss_fn, {s: mf.Random(k=1) for s in model.segments}, *model.args)
    sizes = {}
    for row in report.rows:
        if row.name in model.segments and row.nested_in is None:
            sizes[row.name] = {"n": row.differentiated_numel, "output_numel": row.output_numel}
    return sizes


def build_plans(model: PlannerModel, sizes: dict, exact_limit: int) -> tuple[dict, list[dict]]:
    """The plans to measure (key -> {"plan", "kind"}) and the skipped ones (with why)."""
    exact_ok = {s: sizes[s]["n"] <= exact_limit for s in model.segments}
    options = [[c for c in CANDIDATES if c != "exact" or exact_ok[s]] for s in model.segments]
    plans: dict[str, dict] = {}
    for combo in itertools.product(*options):
        plan = mf.Plan(dict(zip(model.segments, combo, strict=True)))
        plans[plan_key(model, plan)] = {"plan": plan, "kind": "enumerated"}
    skipped = []
    for s in (s for s in model.segments if not exact_ok[s]):
        n, out = sizes[s]["n"], sizes[s]["output_numel"]
        skipped.append({"segment": s, "strategy": "exact", "tangents": n, "output_tangent_bytes": 4 * n * out,
                        "why": f"Exact would push {n} tangents (> {exact_limit}); its output tangents alone: "
                               f"{4 * n * out / MiB:.1f} MiB"})
    if skipped:
        total = 3 ** len(model.segments) - len(plans)
        skipped.append({"assignments_not_run": total, "why": f"{total} assignments with those Exact segments"})
    everywhere = {"all-rev": "rev", "all-ckpt": "ckpt", "all-exact": "exact", f"all-random:{RANDOM_K}": None}
    for label, strategy in everywhere.items():
        if strategy == "exact" and not all(exact_ok.values()):
            continue
        plan = mf.Plan({s: strategy or mf.Random(k=RANDOM_K) for s in model.segments})
        plans.setdefault(plan_key(model, plan), {"plan": plan, "kind": "enumerated"})["label"] = label
    return plans, skipped


# -- measuring -----------------------------------------------------------------------------------------------------
def peak_of(step: Callable[[], object]) -> int:
    """Peak bytes of the tensors one call of ``step`` allocates (deterministic: live storages, ``mf.measure_peak``)."""
    with mf.measure_peak() as meter:
        step()
    return meter.peak_bytes


def warm_and_peak(model: PlannerModel, entries: dict, warmup: int) -> None:
    """Warm every not yet warmed plan up (``warmup`` calls: forward segments record their replay on the second)
    and measure its peak; a plan that raises keeps its error instead."""
    for entry in entries.values():
        if "step" in entry or "error" in entry:
            continue
        step = model.step(entry["plan"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", mf.PerformanceWarning)
                for _ in range(warmup):
                    step()
                entry["peak_bytes"] = peak_of(step)
            entry["step"] = step
        except (RuntimeError, ValueError, MemoryError) as error:
            entry["error"] = f"{type(error).__name__}: {str(error)[:300]}"


def time_all(entries: dict, rounds: int) -> None:
    """Median seconds per step of every runnable plan, over ``rounds`` interleaved rounds."""
    items = [(k, e) for k, e in entries.items() if "step" in e]
    times: dict[str, list[float]] = {k: [] for k, _ in items}
    for r in range(rounds):
        for key, entry in items if r % 2 == 0 else items[::-1]:
            start = time.perf_counter()
            entry["step"]()
            times[key].append(time.perf_counter() - start)
    for key, entry in items:
        entry["times"] = times[key]
        entry["time_s"] = statistics.median(times[key])


# -- auto_plan -----------------------------------------------------------------------------------------------------
def budgets_for(entries: dict, above: int = 5, below: int = 2) -> list[tuple[int, bool]]:
    """``below`` budgets under the smallest exact plan's peak (``exact=False``: only estimates can fit there),
    then ``above`` log-spaced from 1.05x that peak to 1.1x the larger of all-Reverse's and all-Checkpointed's
    (``exact=True``; one budget: their geometric middle)."""
    exact = [e["peak_bytes"] for e in entries.values() if "peak_bytes" in e and is_exact(e["plan"])]
    uniform = [e["peak_bytes"] for e in entries.values() if e.get("label") in ("all-rev", "all-ckpt")]
    lo, hi = 1.05 * min(exact), 1.1 * max(uniform + [min(exact)])
    spaced = [lo * (hi / lo) ** (i / (above - 1)) for i in range(above)] if above > 1 else [(lo * hi) ** 0.5]
    return [(int(lo * f / 1.05), False) for f in (0.5, 0.8, 0.65)[:below]] + [(int(b), True) for b in spaced]


def is_exact(plan: mf.Plan) -> bool:
    """Whether every strategy of ``plan`` gives the exact gradient (Reverse, Checkpointed, Exact)."""
    return all(part.split("=", 1)[1].split(":")[0] in CANDIDATES for part in str(plan).split(","))


def profile_once(model: PlannerModel, repeats: int) -> tuple[mf.PlanReport, float]:
    """One ``mf.auto_plan(exact=False)`` profile of the step (a budget no plan misses), and its seconds: every
    budget is then chosen from it by ``PlanReport.replan``, which is what ``auto_plan`` at that budget chooses
    from the same profile (tests/planner/test_auto.py checks it), without profiling the step again."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mf.PerformanceWarning)
        _, report = mf.auto_plan(model.loss_fn, *model.args, budget=2**50, exact=False, repeats=repeats,
                                 return_report=True)
    return report, time.perf_counter() - start


def run_auto_plan(model: PlannerModel, entries: dict, budget: int, exact: bool, profiled: mf.PlanReport) -> dict:
    """``auto_plan``'s choice at ``budget`` (from the model's one profile); its plan joins ``entries`` (measured
    with all the others)."""
    row: dict = {"budget_bytes": budget, "exact": exact}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mf.PerformanceWarning)
            report = profiled.replan(budget, exact=exact)
            plan = report.plan
    except ValueError as error:  # no plan fits: the error gives the smallest feasible budget
        row.update(error=str(error)[:400], planning_s=time.perf_counter() - start)
        return row
    key = plan_key(model, plan)
    row.update(planning_s=time.perf_counter() - start, plan=key, predicted_time_s=report.predicted_time,
               predicted_peak_bytes=report.predicted_peak_bytes, report_measured_peak_bytes=report.measured_peak_bytes,
               min_peak_bytes=report.min_peak_bytes, variance=report.variance, notes=list(report.notes))
    entries.setdefault(key, {"plan": plan, "kind": "auto"})
    return row


# -- one model -----------------------------------------------------------------------------------------------------
def measure_model(model: PlannerModel, quick: bool, exact_limit: int, budgets: int = 7) -> dict:
    """Enumerate, plan at every budget, measure it all in one interleaved timing run."""
    warmup, rounds = (2, 3) if quick else (2, 7)  # warm-up: a forward segment records its replay on call 2
    if model.name == "rollout" and not quick:
        rounds = 3  # a step takes seconds; 3 rounds of every plan
    sizes = segment_sizes(model)
    entries, skipped = build_plans(model, sizes, exact_limit)
    log(f"{model.name}: {len(entries)} plans, warm-up and peaks (load {loadavg()})")
    warm_and_peak(model, entries, warmup)
    autos = []
    profiled, profile_s = profile_once(model, repeats=1 if quick else 3)
    log(f"{model.name}: auto_plan profiled the step in {profile_s:.1f} s")
    counts = (2, 1) if quick else (budgets - budgets // 3, budgets // 3)
    for budget, exact in budgets_for(entries, *counts):
        autos.append(run_auto_plan(model, entries, budget, exact, profiled))
        log(f"{model.name}: auto_plan at {budget / MiB:.3f} MiB (exact={exact}): {autos[-1].get('plan', 'no plan')}, "
            f"{autos[-1]['planning_s']:.1f} s")
    warm_and_peak(model, entries, warmup)
    log(f"{model.name}: timing {len(entries)} plans, {rounds} interleaved rounds")
    time_all(entries, rounds)
    points = {key: {k: v for k, v in e.items() if k not in ("step", "plan")} | {"short": short(model, key)}
              for key, e in entries.items()}
    for row in autos:
        if "plan" in row:
            point = points[row["plan"]]
            row.update(measured_peak_bytes=point.get("peak_bytes"), measured_time_s=point.get("time_s"))
    return {"model": model.name, "description": model.description, "segments": list(model.segments),
            "profile_s": profile_s,
            "parameters": model.n_params, "sizes": sizes, "points": points, "skipped": skipped, "auto": autos}


# -- RSS in a child ------------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_child(name: str, quick: bool, keys: list[str]) -> dict[str, int]:
    """In this (fresh) process: each plan's peak RSS of one step above the RSS before it (after warm-up)."""
    torch.set_num_threads(THREADS)
    model = MODELS[name](quick=quick)
    out = {}
    for key in keys:
        step = model.step(mf.Plan.from_string(key))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mf.PerformanceWarning)
            step()
            step()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS (VmHWM) restarts from the current RSS
        before = _status("VmRSS")
        step()
        out[key] = _status("VmHWM") - before
    return out


def measure_rss(result: dict, quick: bool) -> None:
    """The headline plans' (all-X and auto_plan's) peak step RSS, in one child per model."""
    keys = sorted({k for k, p in result["points"].items() if "label" in p or p["kind"] == "auto"} - {
        k for k, p in result["points"].items() if "error" in p})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(THREADS))
    args = [sys.executable, os.path.abspath(__file__), "--rss-child", result["model"], "--keys", ";".join(keys)]
    out = subprocess.run(args + (["--quick"] if quick else []), env=env, capture_output=True, text=True)
    if out.returncode != 0:
        result["rss_error"] = out.stderr[-500:]
        return
    for key, nbytes in json.loads(out.stdout.strip().splitlines()[-1]).items():
        result["points"][key]["rss_bytes"] = nbytes


# -- the Targets ---------------------------------------------------------------------------------------------------
def paired(a: dict, b: dict) -> float:
    """Median of the per-round time ratios a/b (the two ran in the same round: load cancels better)."""
    return statistics.median(x / y for x, y in zip(a["times"], b["times"], strict=True))


def check_model(result: dict) -> list[dict]:
    """Every Target the issue states, for one model: one row per (target, budget), with ``ok``."""
    points, rows = result["points"], []
    labelled = {p["label"]: p for p in points.values() if "label" in p}

    def row(target: str, budget: int | None, value: float, limit: float, ok: bool, what: str) -> None:
        rows.append({"model": result["model"], "target": target, "budget_bytes": budget, "value": value,
                     "limit": limit, "ok": bool(ok), "what": what})

    for auto in result["auto"]:
        if "measured_time_s" not in auto or auto["measured_time_s"] is None:
            continue
        budget, ours = auto["budget_bytes"], points[auto["plan"]]
        row("peak <= 1.05 x budget", budget, ours["peak_bytes"] / max(budget, 1), 1.05,
            ours["peak_bytes"] <= 1.05 * budget, short_plan(result, auto["plan"]))
        for what, measured in (("predicted_peak_bytes", ours["peak_bytes"]), ("predicted_time_s", ours["time_s"])):
            if what in auto and measured:
                ratio = auto[what] / measured
                row(f"{what.split('_')[1]} predicted within 15%", budget, ratio, 0.15, abs(ratio - 1) <= 0.15,
                    f"{auto[what]:.4g} predicted vs {measured:.4g} measured")
        fits = {k: p for k, p in points.items() if p.get("peak_bytes", 1e30) <= budget and "times" in p
                and (not auto["exact"] or is_exact(mf.Plan.from_string(k)))}
        best = min(fits, key=lambda k: fits[k]["time_s"], default=None)
        if best is not None:
            ratio = 1.0 if best == auto["plan"] else paired(ours, fits[best])
            row("time <= 1.10 x best enumerated fitting", budget, ratio, 1.10, ratio <= 1.10,
                f"best: {short_plan(result, best)}")
        ckpt = labelled.get("all-ckpt")
        if auto["exact"] and ckpt and "times" in ckpt and ckpt["peak_bytes"] <= budget:
            same = points.get(auto["plan"]) is ckpt
            ratio = 1.0 if same else paired(ours, ckpt)
            row("exact=True not slower than all-ckpt", budget, ratio, 1.0, ratio <= 1.0, "same plan" if same else "")
    if result["model"] == "rollout":
        rollout_rows(result, labelled, row)
    return rows


def rollout_rows(result: dict, labelled: dict, row: Callable) -> None:
    """Exact beats Reverse and Checkpointed in time and peak on the rollout, and auto_plan picks it."""
    exact = labelled.get("all-exact")
    if exact is None or "times" not in exact:
        row("rollout: all-exact measured", None, 0, 1, False, "all-exact did not run")
        return
    for other in ("all-rev", "all-ckpt"):
        if other in labelled and "times" in labelled[other]:
            ratio = paired(exact, labelled[other])
            row(f"rollout: exact time < {other}", None, ratio, 1.0, ratio < 1.0, "")
            ratio = exact["peak_bytes"] / max(labelled[other]["peak_bytes"], 1)
            row(f"rollout: exact peak < {other}", None, ratio, 1.0, ratio < 1.0, "")
    for auto in result["auto"]:
        if auto["exact"] and auto["budget_bytes"] >= exact["peak_bytes"]:
            picked = all(p.split("=", 1)[1].startswith("exact") for p in auto.get("plan", "=none").split(","))
            row("rollout: auto_plan picks Exact", auto["budget_bytes"], float(picked), 1.0, picked,
                short_plan(result, auto.get("plan", "")))


def short_plan(result: dict, key: str) -> str:
    point = result["points"].get(key)
    return point["short"] if point else key


# -- printing ------------------------------------------------------------------------------------------------------
def pareto(points: dict) -> set[str]:
    """Keys of the points no other point beats in both time and peak."""
    ok = {k: p for k, p in points.items() if "time_s" in p}
    return {k for k, p in ok.items() if not any(
        q["time_s"] <= p["time_s"] and q["peak_bytes"] <= p["peak_bytes"] and
        (q["time_s"], q["peak_bytes"]) != (p["time_s"], p["peak_bytes"]) for q in ok.values())}


def print_model(result: dict) -> None:
    print(f"\n== {result['model']}: {result['description']}; {result['parameters']} parameters")
    front = pareto(result["points"])
    print(f"{'plan':<34}{'kind':<16}{'peak MiB':>10}{'ms/step':>10}{'RSS MiB':>9}  frontier")
    for key, p in sorted(result["points"].items(), key=lambda kp: kp[1].get("peak_bytes", 1e30)):
        if "error" in p:
            print(f"{p['short']:<34}{p.get('label', p['kind']):<16} error: {p['error'][:80]}")
            continue
        rss = f"{p['rss_bytes'] / MiB:9.1f}" if "rss_bytes" in p else f"{'':9}"
        print(f"{p['short']:<34}{p.get('label', p['kind']):<16}{p['peak_bytes'] / MiB:10.3f}"
              f"{p['time_s'] * 1e3:10.1f}{rss}  {'*' if key in front else ''}")
    for s in result["skipped"]:
        print(f"skipped: {s.get('segment', '')} {s['why']}")
    print(f"{'budget MiB':>10} {'exact':>5}  {'auto_plan':<30}{'peak MiB':>9}{'pred':>9}{'ms':>9}{'pred':>9}"
          f"{'plan s':>8}")
    for a in result["auto"]:
        if "error" in a:
            print(f"{a['budget_bytes'] / MiB:10.3f} {a['exact']!s:>5}  no plan: {a['error'][:90]}")
            continue
        pp, pt = a.get("predicted_peak_bytes"), a.get("predicted_time_s")
        print(f"{a['budget_bytes'] / MiB:10.3f} {a['exact']!s:>5}  {short_plan(result, a['plan']):<30}"
              f"{a['measured_peak_bytes'] / MiB:9.3f}{pp / MiB if pp else float('nan'):9.3f}"
              f"{a['measured_time_s'] * 1e3:9.1f}{pt * 1e3 if pt else float('nan'):9.1f}{a['planning_s']:8.2f}")


def print_targets(rows: list[dict]) -> None:
    print(f"\n{'model':<12}{'target':<42}{'budget MiB':>11}{'value':>9}{'limit':>7}  ok")
    for r in rows:
        budget = f"{r['budget_bytes'] / MiB:11.3f}" if r["budget_bytes"] is not None else f"{'':11}"
        print(f"{r['model']:<12}{r['target']:<42}{budget}{r['value']:9.3f}{r['limit']:7.2f}  "
              f"{'yes' if r['ok'] else 'NO'}  {r['what']}")
    print(f"targets met: {sum(r['ok'] for r in rows)} of {len(rows)}")


# -- Panchal et al. 2025 on the digits MLP -------------------------------------------------------------------------
def train(model: PlannerModel, loss_fn: Callable, plan: dict, lr: float, steps: int, every: int,
          target: float, batch: int) -> dict:
    """Adam on the digits MLP under ``plan``: test accuracy every ``every`` steps, step seconds (evaluation
    excluded), and the first step and second at which the test accuracy reached ``target``."""
    x_train, y_train, x_test, y_test = model.extra["data"]
    params = {k: v.clone() for k, v in model.args[0].items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    grad = mf.mixed_grad(loss_fn, plan, generator=torch.Generator().manual_seed(0))
    order = torch.Generator().manual_seed(1)
    curve, seconds, reached = [], 0.0, None
    for step in range(1, steps + 1):
        take = torch.randint(0, len(y_train), (batch,), generator=order)
        start = time.perf_counter()
        g = grad(params, x_train[take], y_train[take])
        for name, p in params.items():
            p.grad = g[name]
        opt.step()
        seconds += time.perf_counter() - start
        if step % every == 0 or step == steps:
            with torch.no_grad():  # outside a madfunc transform the segments are the plain functions
                acc = (mlp_logits(params, x_test).argmax(1) == y_test).float().mean()
            curve.append((step, seconds, float(acc)))
            if reached is None and acc >= target:
                reached = (step, seconds)
    return {"lr": lr, "curve": curve, "steps_to_target": reached and reached[0],
            "seconds_to_target": reached and reached[1], "final_accuracy": curve[-1][2],
            "ms_per_step": 1e3 * seconds / steps}


def panchal(quick: bool) -> dict:
    """Checkpointed backprop against forward gradients at equal memory (Panchal et al. 2025, arXiv 2506.21833).

    Forward gradients: the whole MLP as one ``Random(k)`` segment (Baydin et al.'s weight perturbation), with
    the largest ``k`` whose step peak (``mf.measure_peak``) is at most checkpointed backprop's. Each method
    gets its best learning rate of a small grid (fewest steps to the target, else the best final accuracy)."""
    hidden, batch, steps, every, target, lrs = ((32, 64, 40, 10, 0.5, (3e-3,)) if quick else
                                                (256, 128, 1000, 25, 0.9, (1e-3, 3e-3, 1e-2)))
    model = mlp_model(batch=batch, hidden=hidden)
    ckpt = {s: "ckpt" for s in model.segments}
    peaks = {"ckpt": peak_of(lambda: mf.mixed_grad(model.loss_fn, ckpt)(*model.args))}
    k = 1
    for candidate in (1, 2, 4, 8, 16, 32, 64, 128):
        plan = {"whole": mf.Random(k=candidate)}
        peaks[candidate] = peak_of(lambda plan=plan: mf.mixed_grad(model.whole_loss_fn, plan)(*model.args))
        if peaks[candidate] > peaks["ckpt"]:
            break
        k = candidate
    methods = {"checkpointed backprop": (model.loss_fn, ckpt),
               f"forward gradient Random(k={k})": (model.whole_loss_fn, {"whole": mf.Random(k=k)})}
    runs = {}
    for name, (loss_fn, plan) in methods.items():
        tries = [train(model, loss_fn, plan, lr, steps, every, target, batch) for lr in lrs]
        runs[name] = min(tries, key=lambda r: (r["steps_to_target"] or steps + 1, -r["final_accuracy"]))
        runs[name]["all_lrs"] = {t["lr"]: t["final_accuracy"] for t in tries}
    return {"k": k, "target_accuracy": target, "steps": steps, "batch": batch, "hidden": hidden,
            "peak_bytes": {"checkpointed backprop": peaks["ckpt"], f"forward gradient Random(k={k})": peaks[k]},
            "peaks_by_k": {str(c): b for c, b in peaks.items()}, "runs": runs}


def print_panchal(p: dict) -> None:
    print(f"\n== Panchal et al. 2025 on the digits MLP (hidden {p['hidden']}, batch {p['batch']}): "
          f"target test accuracy {p['target_accuracy']}, at most {p['steps']} steps, equal memory")
    for name, r in p["runs"].items():
        to = (f"{r['steps_to_target']} steps, {r['seconds_to_target']:.2f} s" if r["steps_to_target"]
              else "not reached")
        print(f"{name:<34} peak {p['peak_bytes'][name] / MiB:8.3f} MiB, lr {r['lr']:g}: {to}; final accuracy "
              f"{r['final_accuracy']:.3f}, {r['ms_per_step']:.2f} ms/step")


# -- main ----------------------------------------------------------------------------------------------------------
def run(quick: bool, names: list[str], exact_limit: int | None = None, rss: bool = True,
        with_panchal: bool = True, budgets: int = 7) -> dict:
    """The whole benchmark; returns what ``--json`` writes."""
    torch.set_num_threads(THREADS)
    exact_limit = exact_limit or (64 if quick else 4096)
    out: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "quick": quick, "threads": THREADS, "torch": torch.__version__, "load_before": loadavg(),
                 "exact_limit": exact_limit, "models": [], "targets": []}
    for name in names:
        start = time.perf_counter()
        result = measure_model(MODELS[name](quick=quick), quick, exact_limit, budgets)
        if rss and sys.platform.startswith("linux"):
            measure_rss(result, quick)
        result["seconds"] = time.perf_counter() - start
        out["models"].append(result)
        out["targets"] += check_model(result)
    if with_panchal:
        out["panchal"] = panchal(quick)
    out["load_after"] = loadavg()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test: under a minute)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--exact-limit", type=int, help="largest tangent count Exact is enumerated with")
    parser.add_argument("--no-rss", action="store_true", help="skip the child-process RSS of the headline plans")
    parser.add_argument("--no-panchal", action="store_true", help="skip the Panchal et al. training comparison")
    parser.add_argument("--budgets", type=int, default=7, help="auto_plan budgets per model (full size; a third of "
                        "them below the smallest exact plan, with exact=False); each profiles the step afresh")
    parser.add_argument("--json", help="where to write the results (default: results/<date>-planner.json; "
                                       "with --quick, nowhere)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.quick, args.keys.split(";"))))
        return
    out = run(args.quick, args.models.split(","), args.exact_limit, not args.no_rss, not args.no_panchal, args.budgets)
    print(f"planner benchmark: {THREADS} threads, torch {out['torch']}, load average {out['load_before']} before, "
          f"{out['load_after']} after (1/5/15 min){'; quick sizes' if args.quick else ''}")
    for result in out["models"]:
        print_model(result)
    print_targets(out["targets"])
    if "panchal" in out:
        print_panchal(out["panchal"])
    path = args.json or (None if args.quick else os.path.join(RESULTS, f"{out['date'][:10]}-planner.json"))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
