"""Smoke test of ``benchmarks/finetune.py --quick``: both parts run at tiny sizes and write their JSON.

Nothing about speed or memory is asserted (benchmarks, not tests, check those); what is checked are facts
that hold at any size: the OPT model cut in two computes transformers' own loss, every method trains, the
forward-pass counts follow from the methods (MeZO 2 per step, SPSA 3, a Random jvp 1), and the deterministic
peaks order as they must (checkpointed backprop keeps less than backprop, MeZO least of all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_split_computes_transformers_loss() -> None:
    import finetune as ft

    model = ft.opt_model(ft.QUICK).double()
    ids, targets = ft.lm_batch(ft.QUICK, 0)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(ft.Split(model)(ids, targets).item() - reference.item()) < 1e-12


def test_jvp_floor_is_the_directional_derivative() -> None:
    """The floor of the memory and time part (plain torch.func.jvp, math attention) computes the loss and its
    derivative along the tangents: against autograd's gradient dotted with them, in float64."""
    import finetune as ft
    from finetune_models import floor_pass, jvp_floor_step

    split = ft.Split(ft.opt_model(ft.QUICK).double())
    ids, _ = ft.lm_batch(ft.QUICK, 0)
    # (no token 1, OPT's padding: plain torch.func.jvp carries the padding row's tangent, which backprop drops)
    ids = ids.masked_fill(ids == split.trunk.embed_tokens.padding_idx, 2)
    targets = ids
    loss = split(ids, targets)
    assert abs(jvp_floor_step(split, 1, seed=3)(ids, targets) - loss.item()) < 1e-12
    grads = torch.autograd.grad(loss, list(split.parameters()))
    params = {n: p.detach() for n, p in split.named_parameters()}
    gen = torch.Generator().manual_seed(5)
    for k in (1, 3):
        tangents = {n: torch.randn((k, *p.shape) if k > 1 else p.shape, generator=gen, dtype=p.dtype)
                    for n, p in params.items()}
        value, derivative = floor_pass(split, params, tangents, k, ids, targets)
        rows = [tangents] if k == 1 else [{n: t[j] for n, t in tangents.items()} for j in range(k)]
        expected = torch.stack([sum((g * row[n]).sum() for g, n in zip(grads, params, strict=True))
                                for row in rows])
        assert torch.allclose(derivative.reshape(-1), expected, rtol=1e-9, atol=1e-12), (k, derivative, expected)
        assert torch.allclose(value.reshape(-1), loss.detach().expand(value.numel()), rtol=0, atol=1e-12)


@pytest.mark.sweep  # the notebook 06 test runs the same --quick code in the default suite; this, the command line
def test_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "finetune.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "finetune.py"), "--quick", "--json", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = json.loads(out.read_text())
    memory = results["memory_time"]["memory"]
    assert set(memory) == {"backprop", "checkpointed", "mezo", "mezo16", "spsa", "random1", "random16", "mixed",
                           "jvp1", "jvp16"}
    live = {m: r["live_peak"] for m, r in memory.items()}
    assert live["checkpointed"] < live["backprop"] and live["mezo"] == min(live.values()), live
    assert all(len(t) >= 3 for t in results["memory_time"]["times"].values())
    runs = results["quality"]["runs"]
    for method, per_step in {"mezo": 2, "spsa": 3, "random1": 1, "mixed": 1, "backprop": 1}.items():
        last = runs[method][0]["curve"][-1]
        assert last["steps"] >= 1 and last["passes"] == per_step * last["steps"], (method, last)
    assert "MeZO's final accuracy" in proc.stdout and "targets" in proc.stdout
