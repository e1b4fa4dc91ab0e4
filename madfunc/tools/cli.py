"""The command line: ``madfunc demo``, ``madfunc compare``, ``madfunc inspect`` and ``madfunc plan`` on the built-in
CNN, with plans written as ``"features=random:16:rademacher,head=rev"``."""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from madfunc.plan import PLAN_EXAMPLE, Plan, strategy_syntax
from madfunc.planner.auto import auto_plan
from madfunc.planner.budget import parse_budget
from madfunc.tools.diagnostics import compare, inspect

__all__ = ["main"]

DEFAULT_PLANS = {
    "backprop": "features=rev,head=rev",
    "exact forward": "features=exact,head=rev",
    "random forward": "features=random:16:rademacher,head=rev",
    "activity forward": "act=activity:16:rademacher",
}


def _threads(count: int) -> str:
    return f"{count} thread" + ("" if count == 1 else "s")


def _model_plan(text: str) -> Plan:
    """argparse type: a non-empty plan whose keys all match a segment of the built-in model."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"empty plan; write SEGMENT=STRATEGY entries separated by commas, e.g. {PLAN_EXAMPLE!r}."
        )
    try:
        plan = Plan.from_string(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    from madfunc.tools.demo import SEGMENTS

    for key in plan:
        if not fnmatch.filter(SEGMENTS, key):
            raise argparse.ArgumentTypeError(
                f"plan names segment {key!r}, which the built-in model does not have; its segments are: "
                f"{', '.join(SEGMENTS)}."
            )
    return plan


def _integer(low: int, high: int | None = None, high_text: str | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[low, high)`` (argparse names the option in its error)."""
    bound = f">= {low}" if high is None else f">= {low} and < {high_text or high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}.")
        return value

    return parse


def _positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}.")
    return value


def _budget(text: str) -> str:
    """argparse type: a memory budget such as ``50MiB`` (checked here, read again by auto_plan)."""
    try:
        parse_budget(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected bytes with an optional unit, e.g. 50MiB, 2GiB, 1.5GB or 4096 (units: B, KB, MB, GB, TB, "
            f"KiB, MiB, GiB, TiB), got {text!r}."
        ) from None
    return text


def _check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """Fail now, not after training, when the plot cannot be written to ``out``."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        parser.error('argument --out: writing the plot needs matplotlib: pip install -e ".[demo]", or pass --no-plot.')
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    path = Path(out)
    suffix, folder = path.suffix[1:].lower(), path.parent
    if path.is_dir():
        parser.error(f"argument --out: {out!r} is a directory; give a file name, e.g. {str(path / 'demo.png')!r}.")
    if suffix not in formats:
        got = f"suffix {path.suffix!r}" if suffix else "no suffix"
        parser.error(f"argument --out: {out!r} has {got}; use a format matplotlib writes: {', '.join(formats)}.")
    if not folder.is_dir():
        parser.error(f"argument --out: directory {str(folder)!r} does not exist; create it first.")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        parser.error(f"argument --out: cannot write {out!r} (permission denied).")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="madfunc",
        description="Mixed-mode automatic differentiation: demos on a small CNN (sklearn digits).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plan_help = (f"a plan for the model's segments (features, act, head): SEGMENT=STRATEGY,... with STRATEGY "
                 f"one of {strategy_syntax()}; e.g. {PLAN_EXAMPLE!r}")
    demo = sub.add_parser("demo", help="train the CNN under plans; print accuracy, time and gradient quality")
    demo.add_argument("--plan", type=_model_plan, action="append",
                      help=plan_help + "; repeat to compare plans "
                      "(default: backprop, exact forward features, random forward features, activity-perturbed act)")
    demo.add_argument("--steps", type=_integer(1), default=200, help="training steps per plan (default: 200)")
    demo.add_argument("--tiny", action="store_true", help="a few steps and draws: a smoke test in seconds")
    demo.add_argument("--out", default="madfunc-demo.png",
                      help="plot to write, in any format matplotlib writes (default: madfunc-demo.png)")
    demo.add_argument("--no-plot", action="store_true", help="write no plot")
    demo.add_argument("--lr", type=_positive_float, default=1e-2, help="Adam learning rate (default: 0.01)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(command_parser=demo)  # for errors found after parsing, with the demo's usage line
    comp = sub.add_parser("compare", help="print the gradient quality of a plan against backprop")
    insp = sub.add_parser("inspect", help="print what each segment runs and keeps for backward under a plan")
    planner = sub.add_parser("plan", help="choose each segment's strategy for the fastest step within a memory budget")
    planner.add_argument("--budget", type=_budget, default="50MiB",
                         help="peak bytes one step may allocate beyond the parameters and batch, e.g. 50MiB, "
                         "2GiB, 1.5GB (default: 50MiB)")
    planner.add_argument("--estimates", action="store_true",
                         help="let gradient estimates (Random) in where no exact plan fits (auto_plan's exact=False)")
    planner.add_argument("--repeats", type=_integer(1), default=3, help="timed steps per profiled plan (default: 3)")
    for command in (comp, insp):
        command.add_argument("--plan", type=_model_plan, default=Plan.from_string(DEFAULT_PLANS["random forward"]),
                             help=plan_help + f" (default: {DEFAULT_PLANS['random forward']!r})")
    for command in (demo, comp):
        command.add_argument("--draws", type=_integer(1), default=16, help="gradient draws for compare (default: 16)")
    for command in (demo, comp, insp, planner):
        command.add_argument("--batch-size", type=_integer(1), default=64, help="minibatch size (default: 64)")
        command.add_argument("--seed", type=_integer(0, 2**63, "2**63"), default=0, help="random seed (default: 0)")
        command.add_argument("--threads", type=_integer(1), default=1, help="torch CPU threads (default: 1; the "
                             "model is too small to gain from more, and threads contend on a busy machine)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``python -m madfunc`` or ``madfunc``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo" and not args.no_plot:
        _check_out(args.command_parser, args.out)
    torch.set_num_threads(args.threads)
    from madfunc.tools import demo as _demo
    if args.command == "demo":
        return _run_demo(args)
    data = _demo.digits(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, len(data[1]), (args.batch_size,), generator=gen)
    params, x, y = _demo.init_params(args.seed), data[0][batch], data[1][batch]
    torch.manual_seed(args.seed)
    if args.command == "compare":
        print(compare(_demo.loss_fn, args.plan, params, x, y, draws=args.draws))
    elif args.command == "plan":
        try:
            _, report = auto_plan(_demo.loss_fn, params, x, y, budget=args.budget, exact=not args.estimates,
                                  repeats=args.repeats, return_report=True)
        except ValueError as error:  # no plan fits: the message gives the smallest budget that does
            print(f"madfunc plan: {error}", file=sys.stderr)
            return 1
        print(report)
        print(f"(timings on {_threads(torch.get_num_threads())}; use the plan with madfunc.mixed_grad(loss, plan) "
              "or madfunc.use_plan(plan))")
    else:
        print(inspect(_demo.loss_fn, args.plan, params, x, y))
        print("To choose each segment's strategy under a memory budget: madfunc plan --budget 50MiB "
              "(madfunc.auto_plan(loss, *args, budget='50MiB') in Python).")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from madfunc.tools.demo import run_demo, summary

    plans = {str(p): p for p in args.plan} if args.plan else {
        label: Plan.from_string(text) for label, text in DEFAULT_PLANS.items()}
    steps, draws = (min(args.steps, 8), min(args.draws, 4)) if args.tiny else (args.steps, args.draws)
    start = time.perf_counter()
    results = run_demo(
        plans, steps=steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, draws=draws,
        out=None if args.no_plot else args.out, progress=None if args.no_progress else sys.stderr,
    )
    print(f"madfunc demo: small CNN on sklearn digits, {steps} Adam steps of batch {args.batch_size} per "
          f"plan (torch {torch.__version__}, {_threads(torch.get_num_threads())})")
    for label, plan in plans.items():
        print(f"  {label}: {plan}")
    print(summary(results))
    if not args.no_plot:
        print(f"wrote {args.out}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0
