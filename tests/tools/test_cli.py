"""The command line: --plan and the numeric and --out options checked before any work (pinned errors), the
progress display, and the commands end to end, tiny. The plan syntax itself is tested in test_plan.py."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import torch

from madfunc.tools import demo as _demo
from madfunc.tools.cli import main
from madfunc.tools.demo import _Progress


@pytest.fixture(autouse=True)
def one_thread():
    """The CLI sets torch's thread count (default 1); give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_names_unknown_segments_and_bad_strategies(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--plan", "feature=exact"])
    assert exit_info.value.code == 2
    assert (
        "argument --plan: plan names segment 'feature', which the built-in model does not have; its "
        "segments are: features, act, head."
    ) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--plan", "features=random:16:rademacher,head=backprop"])
    assert "argument --plan: segment 'head': unknown strategy 'backprop'; valid strategies: rev | reverse" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--plan", " "])
    assert exit_info.value.code == 2
    assert "argument --plan: empty plan; write SEGMENT=STRATEGY entries separated by commas" in capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a command gets as far as loading data or training."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command started work before rejecting its options")

    monkeypatch.setattr(_demo, "digits", refuse)
    monkeypatch.setattr(_demo, "run_demo", refuse)


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--steps", "0"], r"argument --steps: expected an integer >= 1, got '0'\."),
        (["demo", "--steps", "2.5"], r"argument --steps: expected an integer >= 1, got '2\.5'\."),
        (["demo", "--steps", "-3"], r"argument --steps: expected an integer >= 1, got '-3'\."),
        (["demo", "--draws", "0"], r"argument --draws: expected an integer >= 1, got '0'\."),
        (["compare", "--draws", "x"], r"argument --draws: expected an integer >= 1, got 'x'\."),
        (["inspect", "--batch-size", "0"], r"argument --batch-size: expected an integer >= 1, got '0'\."),
        (["demo", "--threads", "0"], r"argument --threads: expected an integer >= 1, got '0'\."),
        (["compare", "--seed", "-1"], r"argument --seed: expected an integer >= 0 and < 2\*\*63, got '-1'\."),
        (["demo", "--seed", str(2**63)], r"argument --seed: expected an integer >= 0 and < 2\*\*63, got '9223"),
        (["demo", "--lr", "0"], r"argument --lr: expected a finite number > 0, got '0'\."),
        (["demo", "--lr", "-0.1"], r"argument --lr: expected a finite number > 0, got '-0\.1'\."),
        (["demo", "--lr", "nan"], r"argument --lr: expected a finite number > 0, got 'nan'\."),
        (["demo", "--lr", "inf"], r"argument --lr: expected a finite number > 0, got 'inf'\."),
        (["demo", "--lr", "fast"], r"argument --lr: expected a finite number > 0, got 'fast'\."),
    ],
)
def test_numeric_options_are_checked_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: madfunc {argv[0]} "), err
    assert re.search(r"madfunc " + argv[0] + r": error: " + message, err), err


@pytest.mark.usefixtures("no_training")
def test_out_is_checked_before_any_work(tmp_path, capsys):
    formats = r"use a format matplotlib writes: .*\bpdf\b.*\bpng\b.*\bsvg\b"
    cases = [
        (tmp_path / "plot.txt", r"'[^']*plot\.txt' has suffix '\.txt'; " + formats),
        (tmp_path / "plot", r"'[^']*plot' has no suffix; " + formats),
        (tmp_path, r"'[^']*' is a directory; give a file name, e\.g\. '[^']*demo\.png'\."),
        (tmp_path / "missing" / "plot.png", r"directory '[^']*missing' does not exist; create it first\."),
    ]
    for out, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--out", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: madfunc demo "), err
        assert re.search(r"madfunc demo: error: argument --out: " + message, err), err


@pytest.mark.usefixtures("no_training")
def test_out_in_a_read_only_directory_is_refused(tmp_path, monkeypatch, capsys):
    folder, access = tmp_path / "read-only", os.access
    folder.mkdir()
    # Simulated, so that the test also holds as root (who may write anywhere).
    monkeypatch.setattr(os, "access", lambda path, mode: path != folder and access(path, mode))
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(folder / "plot.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"argument --out: cannot write '[^']*plot\.png' \(permission denied\)\.", err), err


def test_no_plot_skips_the_out_check(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run_demo(plans, **kwargs):
        seen.update(kwargs, plans=plans)
        return []

    monkeypatch.setattr(_demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(_demo, "summary", lambda results: "")
    assert (
        main(
            [
                "demo",
                "--no-plot",
                "--out",
                str(tmp_path / "no" / "x.bad"),
                "--plan",
                "features=exact:4",
                "--lr",
                "1e-3",
                "--seed",
                "7",
            ]
        )
        == 0
    )
    assert seen["out"] is None and seen["lr"] == 1e-3 and seen["seed"] == 7
    assert [str(p) for p in seen["plans"].values()] == ["features=exact:4"]
    assert "  features=exact:4: features=exact:4\n" in capsys.readouterr().out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_tqdm_bar_on_a_terminal_and_one_line_elsewhere():
    terminal, log = _Terminal(), io.StringIO()
    for stream in (terminal, log, None):
        bar = _Progress("random forward", 20, stream)
        for _ in range(20):
            bar.update(2.5)
        bar.close()
    final = terminal.getvalue().split("\r")[-1]
    assert re.fullmatch(r"random forward: 100%\|#+\| 20/20 \[[\d:]+<[\d:]+, *[\d.]+step/s, loss 2\.500\]\n", final), (
        terminal.getvalue()
    )
    assert re.fullmatch(r"random forward: 20 steps in \d+\.\d s\n", log.getvalue())


def test_compare_and_inspect_commands_print_tables(capsys):
    assert main(["compare", "--plan", "features=exact,head=rev", "--draws", "2", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\(all\)\s+\(whole plan\)\s+666\s+1\s", out, re.M), out  # 336 + 330 parameters, cosine 1
    assert main(["inspect", "--plan", "features=random:4,head=rev", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    # features: 336 parameters, 4 tangents of its 8 x 128 output (8 channels of 4 x 4), kept in float32.
    assert re.search(
        r"^features\s+Random\(k=4, distribution='gaussian'\)\s+arg0:336 \+ arg1:0\s+4\s+1024\s+16\.0 KiB",
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
    assert re.search(r"^backprop\s+\d+\.\d%\s+\d+\.\d%\s+[\d.]+\s+1\.0000\s+0\s+0\s+-$", rows["backprop"]), text
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


def test_the_console_script_names_this_main():
    """pyproject's `madfunc` command must point at the CLI wherever it lives (it named madfunc._cli, gone after
    the package was split into subpackages, while tests calling main() directly kept passing)."""
    import importlib
    import pathlib
    tomllib = pytest.importorskip("tomllib")  # (Python >= 3.11)

    pyproject = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"
    target = tomllib.loads(pyproject.read_text())["project"]["scripts"]["madfunc"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is main
