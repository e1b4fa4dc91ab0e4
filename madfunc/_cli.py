"""The command line: ``madfunc demo``, ``madfunc compare`` and ``madfunc inspect`` on the built-in CNN,
with plans written as ``"features=random:16:rademacher,head=rev"``."""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from collections.abc import Sequence

import torch

from ._diagnostics import compare, inspect
from ._plan import DISTRIBUTIONS, SEEDINGS, Exact, Plan, Random, Reverse, Strategy

__all__ = ["format_plan", "main", "parse_plan"]

STRATEGY_SYNTAX = "rev | reverse | exact[:CHUNK] | random[:K[:DISTRIBUTION[:SEEDING]]]"
EXAMPLE = "features=random:16:rademacher,head=rev"
DEFAULT_PLANS = {
    "backprop": "features=rev,head=rev",
    "exact forward": "features=exact,head=rev",
    "random forward": "features=random:16:rademacher,head=rev",
}


def _threads(count: int) -> str:
    return f"{count} thread" + ("" if count == 1 else "s")


def _positive_int(text: str, segment: str, what: str, usage: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"segment {segment!r}: {usage}: {what} must be an integer >= 1, got {text!r}.")
    return int(text)


def _strategy(segment: str, text: str) -> Strategy:
    kind, *fields = text.strip().split(":")
    kind = kind.lower()
    if kind in ("rev", "reverse") and not fields:
        return Reverse()
    if kind == "exact" and len(fields) <= 1:
        return Exact(_positive_int(fields[0], segment, "CHUNK", "exact:CHUNK") if fields else None)
    if kind == "random" and len(fields) <= 3:
        k = _positive_int(fields[0], segment, "K", "random:K") if fields else 1
        distribution = fields[1].lower() if len(fields) >= 2 else "gaussian"
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"segment {segment!r}: unknown distribution {distribution!r}; valid distributions: "
                f"{', '.join(DISTRIBUTIONS)}."
            )
        seeding = fields[2].lower() if len(fields) == 3 else "auto"
        if seeding not in SEEDINGS:
            raise ValueError(
                f"segment {segment!r}: unknown seeding {seeding!r}; valid seedings: {', '.join(SEEDINGS)}."
            )
        return Random(k, distribution, seeding)
    if kind in ("rev", "reverse", "exact", "random"):
        raise ValueError(
            f"segment {segment!r}: too many ':' fields in {text!r}; valid strategies: {STRATEGY_SYNTAX}."
        )
    raise ValueError(f"segment {segment!r}: unknown strategy {text!r}; valid strategies: {STRATEGY_SYNTAX}.")


def parse_plan(text: str) -> Plan:
    """Parse ``"SEGMENT=STRATEGY,..."`` into a :class:`Plan`.

    Strategies: ``rev`` or ``reverse``; ``exact`` or ``exact:CHUNK``; ``random``, ``random:K`` or
    ``random:K:DISTRIBUTION`` (gaussian, rademacher, orthogonal) or ``random:K:DISTRIBUTION:SEEDING``
    (auto, lazy, eager). Segment names may be fnmatch patterns.

    Args:
        text: the plan, e.g. ``"features=random:16:rademacher,head=rev"``.

    Returns:
        The plan. :func:`format_plan` writes it back.

    Raises:
        ValueError: naming the bad entry, segment or strategy and listing the valid ones.

    Examples:
        >>> parse_plan("features=random:16:rademacher, head=rev")
        Plan({'features': Random(k=16, distribution='rademacher'), 'head': Reverse()})
        >>> parse_plan("head=backprop")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: segment 'head': unknown strategy 'backprop'; valid strategies: rev | reverse | exact...
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty plan; write SEGMENT=STRATEGY entries separated by commas, e.g. {EXAMPLE!r}.")
    entries: dict[str, Strategy] = {}
    for entry in text.split(","):
        name, sep, strategy = entry.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"plan entry {entry.strip()!r}: expected SEGMENT=STRATEGY, e.g. {EXAMPLE!r}.")
        if not name:
            raise ValueError(f"plan entry {entry.strip()!r}: missing the segment name before '='.")
        if name in entries:
            raise ValueError(f"plan entry {entry.strip()!r}: segment {name!r} is given twice.")
        entries[name] = _strategy(name, strategy)
    return Plan(entries)


def format_plan(plan: Plan) -> str:
    """Write ``plan`` in the command-line syntax (the inverse of :func:`parse_plan`).

    Args:
        plan: a :class:`Plan` (or dict of strategies).

    Returns:
        The text, e.g. ``"features=random:16:rademacher,head=rev"``.

    Examples:
        >>> format_plan(parse_plan("a=exact:8,b=random"))
        'a=exact:8,b=random:1:gaussian'
    """
    parts = []
    for name, strategy in Plan(plan).items():
        if isinstance(strategy, Reverse):
            text = "rev"
        elif isinstance(strategy, Exact):
            text = "exact" if strategy.chunk_size is None else f"exact:{strategy.chunk_size}"
        else:
            assert isinstance(strategy, Random)
            text = f"random:{strategy.k}:{strategy.distribution}"
            if strategy.seeding != "auto":
                text += f":{strategy.seeding}"
        parts.append(f"{name}={text}")
    return ",".join(parts)


def _model_plan(text: str) -> Plan:
    """argparse type: a plan whose keys all match a segment of the built-in model."""
    try:
        plan = parse_plan(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    from ._demo import SEGMENTS

    for key in plan:
        if not fnmatch.filter(SEGMENTS, key):
            raise argparse.ArgumentTypeError(
                f"plan names segment {key!r}, which the built-in model does not have; its segments are: "
                f"{', '.join(SEGMENTS)}."
            )
    return plan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="madfunc",
        description="Mixed-mode automatic differentiation: demos on a small CNN (sklearn digits).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plan_help = (f"a plan for the model's segments (features, head): SEGMENT=STRATEGY,... with STRATEGY "
                 "one of "
                 f"{STRATEGY_SYNTAX}; e.g. {EXAMPLE!r}")
    demo = sub.add_parser("demo", help="train the CNN under plans; print accuracy, time and gradient quality")
    demo.add_argument("--plan", type=_model_plan, action="append",
                      help=plan_help + "; repeat to compare plans "
                      "(default: backprop, exact forward features, random forward features)")
    demo.add_argument("--steps", type=int, default=200, help="training steps per plan (default: 200)")
    demo.add_argument("--tiny", action="store_true", help="a few steps and draws: a smoke test in seconds")
    demo.add_argument("--out", default="madfunc-demo.png", help="PNG to write (default: madfunc-demo.png)")
    demo.add_argument("--no-plot", action="store_true", help="write no PNG")
    demo.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default: 0.01)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    comp = sub.add_parser("compare", help="print the gradient quality of a plan against backprop")
    insp = sub.add_parser("inspect", help="print what each segment runs and keeps for backward under a plan")
    for command in (comp, insp):
        command.add_argument("--plan", type=_model_plan, default=parse_plan(DEFAULT_PLANS["random forward"]),
                             help=plan_help + f" (default: {DEFAULT_PLANS['random forward']!r})")
    for command in (demo, comp):
        command.add_argument("--draws", type=int, default=16, help="gradient draws for compare (default: 16)")
    for command in (demo, comp, insp):
        command.add_argument("--batch-size", type=int, default=64, help="minibatch size (default: 64)")
        command.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        command.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; the "
                             "model is too small to gain from more, and threads contend on a busy machine)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``python -m madfunc`` or ``madfunc``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    for name in ("steps", "draws", "batch_size", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    torch.set_num_threads(args.threads)
    from . import _demo

    if args.command == "demo":
        return _run_demo(args)
    data = _demo.digits(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, len(data[1]), (args.batch_size,), generator=gen)
    params, x, y = _demo.init_params(args.seed), data[0][batch], data[1][batch]
    torch.manual_seed(args.seed)
    if args.command == "compare":
        print(compare(_demo.loss_fn, args.plan, params, x, y, draws=args.draws))
    else:
        print(inspect(_demo.loss_fn, args.plan, params, x, y))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo, summary

    plans = {format_plan(p): p for p in args.plan} if args.plan else {
        label: parse_plan(text) for label, text in DEFAULT_PLANS.items()}
    steps, draws = (min(args.steps, 8), min(args.draws, 4)) if args.tiny else (args.steps, args.draws)
    start = time.perf_counter()
    results = run_demo(
        plans, steps=steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, draws=draws,
        out=None if args.no_plot else args.out, progress=None if args.no_progress else sys.stderr,
    )
    print(f"madfunc demo: small CNN on sklearn digits, {steps} Adam steps of batch {args.batch_size} per "
          f"plan (torch {torch.__version__}, {_threads(torch.get_num_threads())})")
    for label, plan in plans.items():
        print(f"  {label}: {format_plan(plan)}")
    print(summary(results))
    if not args.no_plot:
        print(f"wrote {args.out}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0
