"""The command line: the --plan syntax (round trip, pinned errors) and the demo end to end, tiny."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import madfunc as mf
from madfunc._cli import format_plan, main, parse_plan


@pytest.fixture(autouse=True)
def one_thread():
    """The CLI sets torch's thread count (default 1); give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("text", "plan"),
    [
        (
            "features=random:16:rademacher,head=rev",
            {"features": mf.Random(16, "rademacher"), "head": mf.Reverse()},
        ),
        (" features = exact:8 , head=reverse", {"features": mf.Exact(8), "head": mf.Reverse()}),
        ("block*=random", {"block*": mf.Random(1, "gaussian")}),
        (
            "a=random:3,b=RANDOM:2:Orthogonal,c=exact",
            {"a": mf.Random(3), "b": mf.Random(2, "orthogonal"), "c": mf.Exact()},
        ),
        (
            "a=random:4:rademacher:lazy,b=random:2:gaussian:eager,c=random:2:gaussian:auto",
            {
                "a": mf.Random(4, "rademacher", "lazy"),
                "b": mf.Random(2, "gaussian", "eager"),
                "c": mf.Random(2, "gaussian"),
            },
        ),
    ],
)
def test_parse_plan_round_trips(text, plan):
    parsed = parse_plan(text)
    assert parsed == mf.Plan(plan)
    assert parse_plan(format_plan(parsed)) == parsed
    assert format_plan(parse_plan(format_plan(parsed))) == format_plan(parsed)


VALID = r"valid strategies: rev \| reverse \| exact\[:CHUNK\] \| random\[:K\[:DISTRIBUTION\[:SEEDING\]\]\]\."


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "",
            r"^empty plan; write SEGMENT=STRATEGY entries separated by commas, e\.g\. "
            r"'features=random:16:rademacher,head=rev'\.$",
        ),
        ("features", r"^plan entry 'features': expected SEGMENT=STRATEGY, e\.g\. "),
        ("=exact", r"^plan entry '=exact': missing the segment name before '='\.$"),
        ("head=rev,head=exact", r"^plan entry 'head=exact': segment 'head' is given twice\.$"),
        ("head=backprop", r"^segment 'head': unknown strategy 'backprop'; " + VALID + "$"),
        ("head=", r"^segment 'head': unknown strategy ''; " + VALID + "$"),
        ("features=exact:0", r"^segment 'features': exact:CHUNK: CHUNK must be an integer >= 1, got '0'\.$"),
        ("features=random:x", r"^segment 'features': random:K: K must be an integer >= 1, got 'x'\.$"),
        (
            "features=random:4:uniform",
            r"^segment 'features': unknown distribution 'uniform'; valid distributions: "
            r"gaussian, rademacher, orthogonal\.$",
        ),
        (
            "features=random:4:gaussian:lazy:2",
            r"^segment 'features': too many ':' fields in 'random:4:gaussian:lazy:2'; " + VALID,
        ),
        (
            "features=random:4:gaussian:2",
            r"^segment 'features': unknown seeding '2'; valid seedings: auto, lazy, eager\.$",
        ),
        ("head=rev:2", r"^segment 'head': too many ':' fields in 'rev:2'; " + VALID),
    ],
)
def test_parse_plan_rejects_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        parse_plan(text)


def test_cli_names_unknown_segments_and_bad_strategies(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--plan", "feature=exact"])
    assert exit_info.value.code == 2
    assert (
        "argument --plan: plan names segment 'feature', which the built-in model does not have; its "
        "segments are: features, head."
    ) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--plan", "features=random:16:rademacher,head=backprop"])
    assert (
        "argument --plan: segment 'head': unknown strategy 'backprop'; valid strategies: rev | reverse"
        in (capsys.readouterr().err)
    )
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "--steps must be >= 1, got 0." in capsys.readouterr().err


def test_compare_and_inspect_commands_print_tables(capsys):
    assert main(["compare", "--plan", "features=exact,head=rev", "--draws", "2", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\(all\)\s+\(whole plan\)\s+666\s+1\s", out, re.M), (
        out
    )  # 336 + 330 parameters, cosine 1
    assert main(["inspect", "--plan", "features=random:4,head=rev", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    # features: 336 parameters, 4 tangents of its 8 x 32 output, kept in float32.
    assert re.search(
        r"^features\s+Random\(k=4, distribution='gaussian'\)\s+arg0:336 \+ arg1:0\s+4\s+256\s+4\.0 KiB",
        out,
        re.M,
    ), out


def test_demo_runs_end_to_end_and_writes_the_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--tiny", "--no-progress", "--batch-size", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    assert set(rows) >= {"backprop", "exact forward", "random forward"}
    assert re.search(r"^backprop\s+\d+\.\d%\s+\d+\.\d%\s+[\d.]+\s+1\.0000\s+0\s+0\s+-$", rows["backprop"]), (
        text
    )
    assert re.search(r"\s1\.0000\s", rows["exact forward"]), text
    # random forward: Rademacher, k = 16 over the 336 feature parameters: theory (n - 1) / k.
    assert rows["random forward"].endswith(f"{335 / 16:.3g}"), text
    assert f"wrote {out}" in text


def test_python_m_madfunc_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "madfunc", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--plan" in result.stdout and "--tiny" in result.stdout
