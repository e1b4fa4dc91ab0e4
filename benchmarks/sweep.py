"""The full op_db and module_db sweeps (GitHub issue 7): ``python benchmarks/sweep.py [--ops] [--modules]``.

Every OpInfo with autograd and float64 support, and every ModuleInfo in train and eval mode (plus the extra
modules of tests/sweep_harness.py), run as one ``Exact`` forward segment and compared with torch's reverse mode
(see tests/sweep_harness.py for the categories and tolerances). Prints a markdown summary to stdout (counts per
category, then every raw_error / mismatch / warning / inherited / madfunc_error grouped by cause) and writes JSON
to benchmarks/out/sweep.json. Not a test: nothing here asserts (``pytest -m sweep`` runs the same cases as tests).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import sweep_harness as H  # noqa: E402

REPORTED = (H.RAW_ERROR, H.MISMATCH, H.WARNING, H.TIMEOUT, H.INHERITED, H.MADFUNC_ERROR)

# Causes recognised in a case's first error line, most specific first; anything else is grouped by its message
# with names and numbers blanked out.
CAUSES = (
    (r"called random operation while in randomness error mode", "random op under Exact: vmap refuses randomness"),
    (r"performance drop because we have not yet implemented the batching rule for (\S+)", "vmap fallback warning"),
    (r"has no forward-mode \(jvp\) rule", "no forward-mode rule (ForwardModeError)"),
    (r"torch.func.grad != plain autograd", "torch.func.grad and plain autograd draw different random numbers"),
    (r"jacfwd != its reverse mode|jvp != its vjp", "torch's forward mode disagrees with its reverse mode"),
    (r"complex output", "complex output"),
    (r"state after the call", "buffers (running statistics) differ after the call"),
)


def cause(case: H.CaseResult) -> str:
    for pattern, label in CAUSES:
        if re.search(pattern, case.detail):
            return label
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", case.detail)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    return f"{case.error_type}: {text}" if case.error_type else text


def op_detail(case: H.CaseResult) -> str:
    """The op a ForwardModeError names, the ATen op a vmap warning names, else ''."""
    match = re.search(r"but op '([^']+)'|batching rule for (\S+?)\.", case.detail)
    return next((g for g in match.groups() if g), "") if match else ""


def run(kind: str, names: list[str], samples: int, timeout: float, progress: bool) -> list[dict]:
    rows = []
    ops = H.ops_by_name() if kind == "ops" else None
    for i, name in enumerate(names):
        start = time.perf_counter()
        if kind == "ops":
            results = [H.run_op(ops[name], samples=samples, timeout=timeout)]
        else:
            results = [H.run_module(name, training, samples=samples, timeout=timeout) for training in (True, False)]
        for result in results:
            rows.append(
                {
                    "name": result.name,
                    "category": result.category,
                    "setup_error": result.setup_error,
                    "seconds": round(time.perf_counter() - start, 3),
                    "cases": [{"sample": s, **vars(c)} for s, c in result.cases],
                }
            )
            if progress:
                print(f"[{i + 1}/{len(names)}] {time.perf_counter() - start:6.2f}s {result.summary()}", file=sys.stderr)
    return rows


def markdown(title: str, rows: list[dict]) -> str:
    counts = collections.Counter(row["category"] for row in rows)
    lines = [f"## {title}: {len(rows)} entries", "", "| category | count |", "|---|---|"]
    lines += [f"| {c} | {counts[c]} |" for c in H.CATEGORIES if counts[c]]
    for category in REPORTED:
        hits = [row for row in rows if row["category"] == category]
        if not hits:
            continue
        lines += ["", f"### {category} ({len(hits)})", ""]
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for row in hits:
            first = next(c for c in row["cases"] if c["category"] == category)
            case = H.CaseResult(**{k: v for k, v in first.items() if k != "sample"})
            where = f" ({op_detail(case)})" if op_detail(case) else ""
            error = f"{case.error_type}: " if case.error_type else ""
            modes = "+".join(sorted({c["mode"] for c in row["cases"] if c["category"] == category}))
            groups[cause(case)].append(f"`{row['name']}`{where} [{modes}] — {error}{case.detail}")
        for label, entries in sorted(groups.items(), key=lambda item: -len(item[1])):
            lines += [f"**{label}** ({len(entries)})", ""]
            lines += [f"- {entry}" for entry in entries]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", action="store_true", help="sweep op_db (default: both)")
    parser.add_argument("--modules", action="store_true", help="sweep module_db (default: both)")
    parser.add_argument("--only", nargs="*", default=None, help="op / module names to run (default: all)")
    parser.add_argument("--samples", type=int, default=3, help="samples per op / module (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per sample (default 60)")
    parser.add_argument("--replay", action="store_true",
                        help="check recorded-and-replayed passes: each case's second call runs from its recording")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: tiny samples)")
    parser.add_argument("--device", default="cpu", help="where samples and modules live, e.g. cuda (default cpu)")
    parser.add_argument("--json", default=os.path.join(HERE, "out", "sweep.json"))
    parser.add_argument("--quiet", action="store_true", help="no per-op progress on stderr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    H.DEVICE = args.device
    if args.replay:
        from madfunc.engine import replay as _replay
        H.REPLAY, _replay.RECORD_AFTER = True, 1
    kinds = [k for k, wanted in (("ops", args.ops), ("modules", args.modules)) if wanted] or ["ops", "modules"]
    report = {
        "torch": torch.__version__, "device": args.device, "samples": args.samples, "threads": args.threads,
        "replay": args.replay,
    }
    sections = []
    for kind in kinds:
        names = list(H.ops_by_name()) if kind == "ops" else H.all_module_names()
        if args.only is not None:
            names = [n for n in names if n in args.only]
        start = time.perf_counter()
        rows = run(kind, names, args.samples, args.timeout, not args.quiet)
        report[kind] = {"seconds": round(time.perf_counter() - start, 1), "results": rows}
        if kind == "ops":
            sections.append(markdown("op_db", rows))
        else:
            for mode in ("train", "eval"):
                sections.append(markdown(f"module_db [{mode}]", [r for r in rows if r["name"].endswith(f"[{mode}]")]))
        sections[-1] += f"\n\n({kind}: {report[kind]['seconds']} s)"
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    notes = ", replayed from recordings" if args.replay else ""
    notes += f", on {args.device}" if args.device != "cpu" else ""
    print(f"# madfunc op_db / module_db sweep (torch {torch.__version__}, {args.samples} samples each{notes})\n")
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
