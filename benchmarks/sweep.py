"""The full op_db and module_db sweeps (GitHub issue 7): ``python benchmarks/sweep.py [--ops] [--modules]``.

Every OpInfo with autograd and float64 support, and every ModuleInfo in train and eval mode (plus the extra
modules the tests add), run as one ``Exact`` forward segment and compared with torch's reverse mode. The cases
are the sweep tests' (``pytest -m sweep``: tests/test_opdb_sweep.py, tests/test_moduledb_sweep.py; categories
and tolerances in tests/support/sweep_harness.py): this script runs them in a child pytest with its settings in
``MADFUNC_SWEEP_*`` environment variables, reads back the result each test appends to ``MADFUNC_SWEEP_RESULTS``,
and prints a markdown summary to stdout (counts per category, then every raw_error / mismatch / warning /
inherited / madfunc_error grouped by cause); ``--json PATH`` also writes every case. Run it from a checkout
(it needs ``tests/``; madfunc is imported as installed). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = {"ops": "tests/test_opdb_sweep.py::test_op_full", "modules": "tests/test_moduledb_sweep.py::test_module_full"}

# The categories of tests/support/sweep_harness.py (CATEGORIES), in the same order.
PASS, MADFUNC_ERROR, RAW_ERROR, MISMATCH, WARNING = "pass", "madfunc_error", "raw_error", "mismatch", "warning"
INHERITED, TIMEOUT, REFERENCE_ERROR, NO_GRAD_INPUTS = "inherited", "timeout", "reference_error", "no_grad_inputs"
CATEGORIES = (RAW_ERROR, MISMATCH, WARNING, TIMEOUT, MADFUNC_ERROR, INHERITED, PASS, REFERENCE_ERROR, NO_GRAD_INPUTS)

REPORTED = (RAW_ERROR, MISMATCH, WARNING, TIMEOUT, INHERITED, MADFUNC_ERROR)

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


def cause(case: dict) -> str:
    for pattern, label in CAUSES:
        if re.search(pattern, case["detail"]):
            return label
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", case["detail"])
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    return f"{case['error_type']}: {text}" if case["error_type"] else text


def op_detail(case: dict) -> str:
    """The op a ForwardModeError names, the ATen op a vmap warning names, else ''."""
    match = re.search(r"but op '([^']+)'|batching rule for (\S+?)\.", case["detail"])
    return next((g for g in match.groups() if g), "") if match else ""


def selected(kind: str, names: set[str]) -> list[str]:
    """The ids of the full sweep tests of the ops / modules in ``names`` (both training modes), in test order."""
    listed = subprocess.run([sys.executable, "-m", "pytest", "-m", "sweep", "-p", "no:cacheprovider", "-q",
                             "--collect-only", TESTS[kind]], cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in listed.stdout.splitlines() if line.startswith(TESTS[kind] + "[")]
    if not ids:
        sys.exit(f"collecting {TESTS[kind]} failed:\n{listed.stdout}{listed.stderr}")
    param = (lambda i: i[i.index("[") + 1 : -1]) if kind == "ops" else (lambda i: i[i.index("[") + 1 : i.rindex("-")])
    return [i for i in ids if param(i) in names]


def run(kind: str, only: list[str] | None, env: dict[str, str], quiet: bool) -> list[dict]:
    """The full sweep tests of ``kind`` (all, or the names in ``only``) in a child pytest: their results."""
    targets = [TESTS[kind]] if only is None else selected(kind, set(only))
    if not targets:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "results.jsonl")
        open(results, "w").close()
        command = [sys.executable, "-m", "pytest", "-m", "sweep", "-p", "no:cacheprovider", "--tb=line",
                   "-q" if quiet else "-v", *targets]
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, **env, "MADFUNC_SWEEP_RESULTS": results},
                              stdout=subprocess.PIPE if quiet else sys.stderr, stderr=subprocess.STDOUT, text=True)
        with open(results) as f:
            rows = [json.loads(line) for line in f]
    if done.returncode not in (0, 1):  # 1: some case was bad, which the summary reports
        sys.exit(f"pytest exited with {done.returncode}: {' '.join(command)}\n{done.stdout or ''}")
    return rows


def markdown(title: str, rows: list[dict]) -> str:
    counts = collections.Counter(row["category"] for row in rows)
    lines = [f"## {title}: {len(rows)} entries", "", "| category | count |", "|---|---|"]
    lines += [f"| {c} | {counts[c]} |" for c in CATEGORIES if counts[c]]
    for category in REPORTED:
        hits = [row for row in rows if row["category"] == category]
        if not hits:
            continue
        lines += ["", f"### {category} ({len(hits)})", ""]
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for row in hits:
            first = next(c for c in row["cases"] if c["category"] == category)
            where = f" ({op_detail(first)})" if op_detail(first) else ""
            error = f"{first['error_type']}: " if first["error_type"] else ""
            modes = "+".join(sorted({c["mode"] for c in row["cases"] if c["category"] == category}))
            groups[cause(first)].append(f"`{row['name']}`{where} [{modes}] — {error}{first['detail']}")
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
    parser.add_argument("--json", metavar="PATH", help="also write every case as JSON to PATH")
    parser.add_argument("--quiet", action="store_true", help="no per-op progress on stderr")
    args = parser.parse_args()
    env = {
        "MADFUNC_SWEEP_SAMPLES": str(args.samples), "MADFUNC_SWEEP_TIMEOUT": str(args.timeout),
        "MADFUNC_SWEEP_THREADS": str(args.threads), "MADFUNC_SWEEP_DEVICE": args.device,
        "MADFUNC_SWEEP_REPLAY": "1" if args.replay else "",
    }
    kinds = [k for k, wanted in (("ops", args.ops), ("modules", args.modules)) if wanted] or ["ops", "modules"]
    report = {
        "torch": torch.__version__, "device": args.device, "samples": args.samples, "threads": args.threads,
        "replay": args.replay,
    }
    sections = []
    for kind in kinds:
        start = time.perf_counter()
        rows = run(kind, args.only, env, args.quiet)
        report[kind] = {
            "seconds": round(sum(row["seconds"] for row in rows), 1),  # in the cases, without pytest's start-up
            "wall_seconds": round(time.perf_counter() - start, 1),
            "results": rows,
        }
        if kind == "ops":
            sections.append(markdown("op_db", rows))
        else:
            for mode in ("train", "eval"):
                sections.append(markdown(f"module_db [{mode}]", [r for r in rows if r["name"].endswith(f"[{mode}]")]))
        sections[-1] += f"\n\n({kind}: {report[kind]['seconds']} s)"
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    notes = ", replayed from recordings" if args.replay else ""
    notes += f", on {args.device}" if args.device != "cpu" else ""
    print(f"# madfunc op_db / module_db sweep (torch {torch.__version__}, {args.samples} samples each{notes})\n")
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
