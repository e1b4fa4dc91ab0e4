"""The quality part of ``benchmarks/finetune.py``: pretrain a small OPT, fine-tune it on a shifted task.

Pretraining: next-byte prediction on the source of some standard-library modules (text every CPython
ships), by backprop with AdamW, cached in ``benchmarks/out/`` (ignored by git) under a key of its settings.

Fine-tuning, with a distribution shift in both text and task: snippets of *other* modules' source, each
reversed with probability 1/2, followed by a separator; the model must answer with the byte ``F``
(forward) or ``R`` (reversed) as its next token (classification by next token, as MeZO's prompt-based
fine-tuning). The loss is the cross-entropy of that token over the whole vocabulary; accuracy compares
the two answer tokens' logits on a fixed held-out set. Pretraining on code makes reversed text improbable,
so the task is learnable from the pretrained features, but the answer mapping must be learnt (50% before).

Each method fine-tunes the same pretrained weights (the LM head untied from the embedding: see UNTIED) for a
wall-time budget, MeZO's ``seconds`` and the others' half of it (the target is to reach MeZO's final accuracy
within half its time), several seeds (data order and directions), evaluating at regular training times
(evaluation excluded from the time) and counting forward passes (calls of the first decoder layer: the jvp of
a Random segment is one, MeZO's step two, SPSA's three, backprop's one, checkpointed backprop's two). Each
method's step peak is measured deterministically (``mf.measure_peak``), against the budget of 1.2x MeZO's.
Under that budget the estimates draw their directions leaf by leaf (``seeding="lazy"``, as MeZO regenerates
its ``z``), and ``auto`` lets ``mf.auto_plan(exact=False)`` choose per part, the model cut into the trunk
(embeddings, every decoder layer) and the head (final norm, LM head).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import os
import statistics
import time
from typing import Any

import finetune as ft
import torch

import madfunc as mf

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
PRETRAIN_MODULES = ("argparse", "textwrap", "difflib", "functools", "dataclasses", "statistics", "random",
                    "heapq", "fractions", "calendar")
TASK_MODULES = ("shlex", "csv", "string", "bisect", "glob", "fnmatch", "copy", "pprint", "tokenize", "inspect")
BOS, SEP, VOCAB = 256, 257, 258
ANSWERS = (ord("F"), ord("R"))
QUALITY_METHODS = ("mezo", "spsa", "random1", "mixed", "auto", "checkpointed", "backprop")
BUDGET_FACTOR = 1.2  # the memory budget: 1.2x MeZO's step peak


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes of the quality part."""

    layers: int = 3
    width: int = 128
    heads: int = 4
    seq: int = 64  # pretraining chunk
    pretrain_steps: int = 1500
    pretrain_batch: int = 32
    snippet: int = 24  # bytes per task example
    batch: int = 32
    eval_examples: int = 512
    seconds: float = 240.0  # MeZO's fine-tuning wall time per seed (it starts to move after about 120 s)
    others: float = 0.5  # every other method's, as a fraction of MeZO's: enough to decide the 0.5x target
    evals: int = 16  # evaluations per run, evenly spaced in training time
    seeds: int = 3
    tied: bool = False  # see UNTIED


FULL = Setup()
QUICK = Setup(layers=2, width=32, heads=2, seq=32, pretrain_steps=20, pretrain_batch=8, snippet=12, batch=8,
              eval_examples=64, seconds=0.5, evals=2, seeds=1)

# Learning rates (SGD; madfunc's fused SGD): exact gradients (backprop, and the parts of a mixed or planned
# step that are not estimated) take LR_EXACT; estimates (MeZO, SPSA, Random: the whole model or a segment) take
# LR_ESTIMATED, since their noise grows with the ~0.6M scalars they cover (the mixed plan's trunk at 3e-2
# diverged, loss 48). LR_ESTIMATED from MeZO's accuracy on an idle machine (2026-12-07, one seed each), with the
# head untied (start 0.494): 0.639 after 240 s at 3e-4; at 1e-3 its loss diverged (9e8, accuracy 0.504), at 3e-3
# it went non-finite. (Tied: 0.508 after 60 s at 1e-4, 3 seeds; 0.549 at 3e-4 and 0.525 at 1e-3 after 30 s.)
LR_EXACT, LR_ESTIMATED = 3e-2, 3e-4

# UNTIED: the quality model's LM head has its own weight (as Llama's, GPT-NeoX's), not the token embedding's (OPT's
# default; ``--tied`` restores it). Tied, the head's weight lives in the trunk: a plan that estimates the trunk and
# backpropagates the head gives that one tensor the sum of an estimate and an exact gradient, and the estimate's
# small learning rate (the seed-fused optimizer has one rate per tensor), so the head learns at MeZO's pace. That
# was measured (2026-12-07, tied): auto_plan's trunk-SPSA, head-exact plan ended at 0.560, below MeZO's 0.586.


def _source(name: str) -> bytes | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not (spec.origin or "").endswith(".py") or not os.path.isfile(spec.origin):
        return None
    with open(spec.origin, "rb") as f:
        return f.read()


def byte_stream(modules: tuple[str, ...]) -> torch.Tensor:
    """The modules' sources as one stream of byte tokens, each file after a <bos>."""
    parts = [torch.tensor([BOS, *data], dtype=torch.long) for m in modules if (data := _source(m)) is not None]
    if not parts:
        raise SystemExit(f"finetune: none of the standard-library sources {modules} was found")
    return torch.cat(parts)


def model_of(setup: Setup) -> torch.nn.Module:
    shape = ft.Shape(layers=setup.layers, width=setup.width, ffn=4 * setup.width, heads=setup.heads, vocab=VOCAB,
                     batch=setup.batch, seq=max(setup.seq, setup.snippet + 2), tied=setup.tied)
    return ft.opt_model(shape)


def pretrained(setup: Setup, log: bool = True) -> dict[str, torch.Tensor]:
    """The pretrained weights (a state dict), from the cache in ``benchmarks/out/`` or trained now."""
    key = hashlib.sha1(repr((setup.layers, setup.width, setup.heads, setup.seq, setup.pretrain_steps,
                             setup.pretrain_batch, PRETRAIN_MODULES, torch.__version__)
                          + (("untied",) if not setup.tied else ())).encode()).hexdigest()[:12]
    path = os.path.join(OUT, f"finetune-pretrained-{key}.pt")
    if os.path.exists(path):
        return torch.load(path)
    model = model_of(setup)
    split = ft.Split(model)
    stream = byte_stream(PRETRAIN_MODULES)
    opt = torch.optim.AdamW(split.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(setup.pretrain_steps):
        starts = torch.randint(0, len(stream) - setup.seq, (setup.pretrain_batch,), generator=gen)
        ids = torch.stack([stream[s : s + setup.seq] for s in starts.tolist()])
        loss = split(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log and (step + 1) % max(1, setup.pretrain_steps // 5) == 0:
            print(f"pretraining: step {step + 1}/{setup.pretrain_steps}, loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    os.makedirs(OUT, exist_ok=True)
    state = model.state_dict()
    torch.save(state, path)
    return state


class Task:
    """Reversed or not: ``<bos> snippet <sep>`` -> ``F`` or ``R``, from the TASK_MODULES' sources."""

    def __init__(self, setup: Setup) -> None:
        stream = byte_stream(TASK_MODULES)
        stream = stream[stream != BOS]
        cut = int(0.8 * len(stream))
        self.train, self.held = stream[:cut], stream[cut:]
        self.n = setup.snippet
        self.eval = self.sample(self.held, setup.eval_examples, torch.Generator().manual_seed(12345))

    def sample(self, stream: torch.Tensor, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(stream) - self.n, (count,), generator=gen)
        flip = torch.rand(count, generator=gen) < 0.5
        snippets = torch.stack([stream[s : s + self.n] for s in starts.tolist()])
        snippets = torch.where(flip[:, None], snippets.flip(1), snippets)
        ids = torch.cat([torch.full((count, 1), BOS), snippets, torch.full((count, 1), SEP)], dim=1)
        return ids, torch.where(flip, ANSWERS[1], ANSWERS[0])

    @torch.no_grad()
    def accuracy(self, split: ft.Split) -> float:
        ids, targets = self.eval
        correct = 0
        for i in range(0, len(ids), 128):
            logits = split.tail(split.trunk(ids[i : i + 128]), last_only=True)[:, list(ANSWERS)]
            correct += (logits.argmax(1) == (targets[i : i + 128] == ANSWERS[1]).long()).sum().item()
        return correct / len(ids)


def _counted(split: ft.Split) -> list[int]:
    """A counter of forward passes: calls of the first decoder layer (a vmapped jvp calls it once)."""
    calls = [0]
    split.trunk.layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def build(method: str, setup: Setup, state: dict, task: Task, lr: tuple[float, float], seed: int = 0,
          budget: int | None = None) -> tuple[torch.nn.Module, ft.Split, ft.Step]:
    """A fresh copy of the pretrained model, cut in two, and ``method``'s step on it (``"auto"`` plans within
    ``budget``: bytes a step may add to the parameters)."""
    model = model_of(setup)
    model.load_state_dict(state)
    # "auto" plans over the trunk (embeddings and every decoder layer) and the head (final norm, LM head): at this
    # size one decoder layer's saved activations already exceed the budget (trunk by SPSA, last layer and head by
    # backprop: 1.70x MeZO's peak), so a cut above the last layer would leave auto_plan no exact part to choose.
    split = ft.Split(model, cut=setup.layers if method == "auto" else None)
    example = task.sample(task.train, setup.batch, torch.Generator().manual_seed(0))
    hyper = ft.Hyper(lr_backprop=lr[0], lr_zeroth=lr[1], budget=budget, seeding="lazy")
    return model, split, ft.make_step(method, split, hyper, seed=seed, example=example)


def run(method: str, setup: Setup, state: dict, task: Task, seed: int, lr: tuple[float, float],
        budget: int | None = None) -> dict[str, Any]:
    """Fine-tune a fresh copy of the pretrained model with ``method`` for ``setup.seconds`` of training (MeZO) or
    ``setup.others`` of that (the rest: a method that has not reached MeZO's final accuracy by half of MeZO's time
    has missed the target, and the wall time of the whole benchmark halves)."""
    model, split, step = build(method, setup, state, task, lr, seed, budget)
    calls = _counted(split)
    gen = torch.Generator().manual_seed(1000 + seed)
    step(*task.sample(task.train, setup.batch, gen))  # warm-up (lazy tables, kernels), then undone:
    model.load_state_dict(state)  # (in place: the optimizer keeps its parameters)
    torch.manual_seed(seed)
    curve = [dict(seconds=0.0, passes=0, steps=0, accuracy=task.accuracy(split))]
    trained, steps, passes, losses = 0.0, 0, 0, []
    seconds = setup.seconds if method == "mezo" else setup.others * setup.seconds
    while trained < seconds:
        batch = task.sample(task.train, setup.batch, gen)
        before, start = calls[0], time.perf_counter()
        losses.append(step(*batch))
        trained += time.perf_counter() - start
        passes += calls[0] - before  # (evaluations call the layer too: not counted)
        steps += 1
        if trained >= seconds * len(curve) / setup.evals:  # one point per crossed fraction of the budget,
            point = dict(seconds=trained, passes=passes, steps=steps, accuracy=task.accuracy(split))
            while trained >= seconds * len(curve) / setup.evals and len(curve) <= setup.evals:
                curve.append(point)  # so every run has evals + 1 points, aligned in training time
    plan = getattr(step, "plan", None)
    return dict(method=method, seed=seed, lr=lr, curve=curve, steps=steps, final_loss=statistics.mean(losses[-20:]),
                plan=None if plan is None else str(mf.Plan(plan)))


def step_peak(method: str, setup: Setup, state: dict, task: Task, budget: int | None = None) -> int:
    """The deterministic peak of one step's live tensors (after a warm-up step), plus the parameters."""
    _, split, step = build(method, setup, state, task, (LR_EXACT, LR_ESTIMATED), budget=budget)
    batch = task.sample(task.train, setup.batch, torch.Generator().manual_seed(0))
    step(*batch)
    with mf.measure_peak() as meter:
        step(*batch)
    return meter.peak_bytes + sum(p.numel() * p.element_size() for p in split.parameters())


def time_to_reach(curves: list[list[dict]], accuracy: float) -> float | None:
    """The first evaluation time at which the seeds' mean accuracy reaches ``accuracy`` (every curve has a point
    at each fraction of the budget, so their i-th points are averaged)."""
    for i in range(min(len(c) for c in curves)):
        if statistics.mean(c[i]["accuracy"] for c in curves) >= accuracy - 1e-12:
            return statistics.mean(c[i]["seconds"] for c in curves)
    return None


def summarize(runs: dict[str, list[dict]], peaks: dict[str, int], eval_examples: int) -> dict[str, Any]:
    """Final accuracy (mean, sd, min, max), peak and budget fit per method; time to MeZO's final accuracy."""
    mezo = runs.get("mezo")
    target = statistics.mean(r["curve"][-1]["accuracy"] for r in mezo) if mezo else None
    mezo_time = statistics.mean(r["curve"][-1]["seconds"] for r in mezo) if mezo else None
    start = statistics.mean(r["curve"][0]["accuracy"] for r in mezo) if mezo else None
    # The race needs MeZO to have learnt something: a final accuracy within 2 standard errors of the start's
    # (each accuracy is on eval_examples held-out examples: sd at most sqrt(1/4 / n)) is reached at time 0 by
    # every method, which says nothing. Then the race is void, and said so.
    moved = None if target is None or start is None else target - start > 2 * (0.25 / eval_examples) ** 0.5
    budget = BUDGET_FACTOR * peaks["mezo"] if "mezo" in peaks else None
    rows = {}
    for method, rs in runs.items():
        finals = [r["curve"][-1]["accuracy"] for r in rs]
        reach = time_to_reach([r["curve"] for r in rs], target) if target is not None else None
        rows[method] = dict(
            accuracy=statistics.mean(finals), sd=statistics.stdev(finals) if len(finals) > 1 else 0.0,
            low=min(finals), high=max(finals), peak=peaks.get(method),
            fits=None if budget is None or method not in peaks else peaks[method] <= budget,
            steps=statistics.mean(r["steps"] for r in rs), passes=statistics.mean(r["curve"][-1]["passes"] for r in rs),
            reach_seconds=reach, reach_ratio=None if reach is None or not mezo_time else reach / mezo_time)
    return dict(mezo_accuracy=target, mezo_seconds=mezo_time, mezo_start=start, mezo_moved=moved, budget=budget,
                rows=rows)


def best_plan(summary: dict[str, Any]) -> str | None:
    """madfunc's method within the budget that reaches MeZO's final accuracy soonest (None if none does)."""
    rows = summary["rows"]
    if summary.get("mezo_moved") is False:  # a void race (see summarize)
        return None
    ours = [m for m in ("mixed", "random1", "spsa", "auto") if m in rows and rows[m]["fits"]
            and rows[m]["reach_ratio"] is not None]
    return min(ours, key=lambda m: rows[m]["reach_ratio"]) if ours else None


def report(summary: dict[str, Any], setup: Setup) -> None:
    print(f"\nquality: OPT {setup.layers} layers, d {setup.width}, pretrained {setup.pretrain_steps} steps; task: "
          f"reversed or not ({setup.snippet}-byte snippets of {len(TASK_MODULES)} other modules), "
          f"{setup.seconds:g} s of training for MeZO, {setup.others * setup.seconds:g} s for the others, "
          f"{setup.seeds} seed(s); {'tied' if setup.tied else 'untied'} head; budget {BUDGET_FACTOR}x MeZO's peak")
    head = (f"{'method':<14}{'accuracy':>9}{'sd':>7}{'min':>7}{'max':>7}{'steps':>8}{'passes':>8}{'peak MB':>9}"
            f"{'fits':>6}{'to MeZO acc':>13}")
    print(head + "\n" + "-" * len(head))
    for m, r in summary["rows"].items():
        peak = f"{r['peak'] / 2**20:>9.2f}" if r["peak"] is not None else f"{'-':>9}"
        reach = f"{r['reach_ratio']:>12.3f}x" if r["reach_ratio"] is not None else f"{'never':>13}"
        print(f"{m:<14}{r['accuracy']:>9.3f}{r['sd']:>7.3f}{r['low']:>7.3f}{r['high']:>7.3f}{r['steps']:>8.0f}"
              f"{r['passes']:>8.0f}{peak}{'yes' if r['fits'] else 'no':>6}{reach}")
    best = best_plan(summary)
    if summary.get("mezo_moved") is False:
        print(f"MeZO's final accuracy {summary['mezo_accuracy']:.3f} is within 2 standard errors of its start "
              f"({summary['mezo_start']:.3f}): the race to it is void (train longer or raise MeZO's learning rate)")
    elif summary["mezo_accuracy"] is not None:
        ratio = summary["rows"][best]["reach_ratio"] if best else None
        verdict = "no madfunc plan within the budget reached it" if best is None else (
            f"{best} reached it in {ratio:.3f}x MeZO's time (limit 0.5: {'met' if ratio <= 0.5 else 'MISSED'})")
        print(f"MeZO's final accuracy {summary['mezo_accuracy']:.3f}: {verdict}")


def quality_part(args: argparse.Namespace) -> dict[str, Any]:
    setup = QUICK if args.quick else FULL
    if args.seeds:
        setup = dataclasses.replace(setup, seeds=args.seeds)
    if args.seconds:
        setup = dataclasses.replace(setup, seconds=args.seconds)
    if getattr(args, "tied", False):
        setup = dataclasses.replace(setup, tied=True)
    if getattr(args, "pretrain_steps", None):
        setup = dataclasses.replace(setup, pretrain_steps=args.pretrain_steps)
    lr = (args.lr.get("exact", LR_EXACT), args.lr.get("estimated", LR_ESTIMATED))
    methods = [m for m in QUALITY_METHODS if m in args.methods]
    torch.set_num_threads(2)
    state = pretrained(setup)
    task = Task(setup)
    peaks = {m: step_peak(m, setup, state, task) for m in methods if m != "auto"}
    budget = None
    if "auto" in methods:  # auto_plan's budget counts what a step adds to the parameters
        if "mezo" not in peaks:
            raise SystemExit("finetune: method 'auto' needs 'mezo' too (its budget is 1.2x MeZO's peak)")
        params = sum(t.numel() * t.element_size() for t in model_of(setup).parameters())
        budget = int(BUDGET_FACTOR * peaks["mezo"]) - params
        try:
            peaks["auto"] = step_peak("auto", setup, state, task, budget)
        except ValueError as error:  # no plan within the budget: said, and left out
            print(f"auto: {error}")
            methods.remove("auto")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(setup.seeds):  # seeds outermost: load drifts over the whole run, not one method's
        for m in methods:
            runs[m].append(run(m, setup, state, task, seed, lr, budget))
    summary = summarize(runs, peaks, setup.eval_examples)
    report(summary, setup)
    return dict(setup=dataclasses.asdict(setup), lr=dict(exact=lr[0], estimated=lr[1]), runs=runs, peaks=peaks,
                summary=summary, best=best_plan(summary))
