"""Smoke test of the planner benchmark (``benchmarks/planner.py --quick``): it runs end to end on the three
models and writes the results it prints. Timing targets are the benchmark's to report, not a test's to
assert; what is checked here is deterministic (the peak measure) or structural."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The notebook 05 test runs the same code in quick mode in the default suite; this one runs the script's command
# line too (5 minutes on a loaded machine): with the sweeps.
pytestmark = pytest.mark.sweep

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "planner.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    path = tmp_path_factory.mktemp("planner") / "planner.json"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-rss", "--json", str(path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(path.read_text()), out.stdout


def test_every_model_has_its_points(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run
    assert [m["model"] for m in results["models"]] == ["mlp", "transformer", "rollout"]
    for model in results["models"]:
        labels = {p.get("label") for p in model["points"].values()}
        assert {"all-rev", "all-ckpt", "all-random:4"} <= labels, model["model"]
        # Every Reverse/Checkpointed assignment is enumerated (Exact only where it is cheap enough).
        enumerated = [k for k in model["points"] if all(s.split("=")[1] in ("rev", "ckpt") for s in k.split(","))]
        assert len(enumerated) == 2 ** len(model["segments"])
        for key, point in model["points"].items():
            assert "error" in point or (point["peak_bytes"] > 0 and point["time_s"] > 0), (model["model"], key)
        assert len(model["auto"]) == 3  # --quick's budgets (all chosen from one profile)


def test_rollout_forward_mode_keeps_less(quick_run: tuple[dict, str]) -> None:
    """The deterministic half of the rollout's target: all-Exact's peak is below all-Reverse's and
    all-Checkpointed's (the step keeps 8 tangents per region instead of every Euler step's activations)."""
    results, _ = quick_run
    rollout = next(m for m in results["models"] if m["model"] == "rollout")
    peak = {p["label"]: p["peak_bytes"] for p in rollout["points"].values() if "label" in p}
    assert peak["all-exact"] < peak["all-rev"] and peak["all-exact"] < peak["all-ckpt"], peak


def test_targets_and_panchal_are_reported(quick_run: tuple[dict, str]) -> None:
    results, stdout = quick_run
    assert results["targets"] and all(isinstance(r["ok"], bool) for r in results["targets"])
    assert "targets met:" in stdout and "load average" in stdout
    runs = results["panchal"]["runs"]
    assert len(runs) == 2 and all(r["curve"] for r in runs.values())
