"""``madfunc plan``: the planner on the built-in CNN, its budget checked before any work."""

from __future__ import annotations

import re

import pytest
import torch

from madfunc.tools.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    """The CLI sets torch's thread count (default 1); give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_plan_prints_the_chosen_plan_and_its_report(capsys):
    assert main(["plan", "--budget", "50MiB", "--batch-size", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    chosen = re.match(r"auto_plan: (features=\S+,act=\S+,head=\S+)\n", out)
    assert chosen, out
    assert "budget 50.0 MiB: predicted peak" in out
    for segment in ("features", "act", "head"):
        assert re.search(rf"^{segment}\s+[* ] Reverse\(\)", out, re.M), out
    assert "use the plan with madfunc.mixed_grad(loss, plan)" in out


def test_plan_below_the_smallest_budget_says_which_is(capsys):
    assert main(["plan", "--budget", "1KiB", "--batch-size", "8", "--repeats", "1"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"madfunc plan: .*no plan fits; the smallest feasible budget is \d+ bytes", err), err


@pytest.mark.parametrize("budget", ["5parsecs", "-1MiB", "MiB"])
def test_plan_budget_is_checked_before_any_work(budget, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", f"--budget={budget}"])
    assert exit_info.value.code == 2
    assert f"argument --budget: expected bytes with an optional unit, e.g. 50MiB, 2GiB, 1.5GB or 4096 (units: B, KB, " \
        f"MB, GB, TB, KiB, MiB, GiB, TiB), got {budget!r}." in capsys.readouterr().err


def test_inspect_says_how_to_plan_under_a_budget(capsys):
    assert main(["inspect", "--plan", "features=exact,head=rev", "--batch-size", "8"]) == 0
    assert "madfunc plan --budget 50MiB" in capsys.readouterr().out
