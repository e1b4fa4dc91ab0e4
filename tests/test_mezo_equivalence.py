"""A whole model as one ``SPSA(k)`` segment trained with SGD *is* MeZO (issue 19, item 1).

``benchmarks/mezo.py`` reimplements MeZO's Algorithm 1 (Malladi et al. 2023) from the paper, in place on
the parameters. Given madfunc's tangents (``TangentStreamDirections`` draws what the segment draws from
the same generator), its losses and parameters must equal madfunc's over many steps up to float rounding.

Tolerance, float64: MeZO perturbs in place (theta + eps z - 2 eps z + eps z is theta only up to ~1 ulp),
and madfunc may form theta +- eps v otherwise, so the two l+ (or l-) differ by ~1e-16 relative; the
difference quotient divides that by 2 eps = 2e-3: ~1e-13 relative error in g, hence ~lr * 1e-13 * |z| in
each update. Over 20 steps the parameters agree to ~1e-11; we allow 1e-9 (absolute, on entries of order
0.1-1) and check that a change of seed or of one step's size would be seen far above it.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import madfunc as mf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from mezo import MeZO, TangentStreamDirections  # noqa: E402

transformers = pytest.importorskip("transformers")


STEPS, LR, EPS, WD = 20, 1e-2, 1e-3, 0.01
ATOL = 1e-9  # derived in the module docstring


class LossOf(torch.nn.Module):
    """The model with its loss inside, so that the segment's output is the loss MeZO differences."""

    def __init__(self, model: torch.nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "opt":  # (transformers' own loss casts the logits to float32: ours stays in float64)
            logits = self.model(input_ids=x, use_cache=False).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        return torch.nn.functional.cross_entropy(self.model(x), y)


def _model(kind: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "opt":
        transformers.logging.set_verbosity_error()
        config = transformers.OPTConfig(
            vocab_size=40, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0)
        model = transformers.OPTForCausalLM(config)
        x = torch.randint(0, 40, (3, 8))
        return LossOf(model, kind).double(), x, x
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    return LossOf(model, kind).double(), torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))


def _madfunc_run(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, seed: int) -> list:
    """Train ``module`` as one SPSA(k) segment with SGD; the loss before each step and the parameters after it."""
    segment = mf.fwd(module, name="model")
    opt = mf.SeedSGD(segment.parameters(), lr=LR, weight_decay=WD)  # seed-fused, as MeZO's update
    generator = torch.Generator().manual_seed(seed)
    trace = []
    for _ in range(STEPS):
        with mf.use_plan({"model": mf.SPSA(k=k, eps=EPS)}, generator=generator):
            loss = segment(x, y)
            loss.backward()
        opt.step()
        opt.zero_grad()
        trace.append((loss.item(), [p.detach().clone() for p in module.parameters()]))
    return trace


def _mezo_run(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, seed: int,
              steps: int = STEPS) -> list:
    names = [n for n, _ in module.named_parameters()]
    directions = TangentStreamDirections(torch.Generator().manual_seed(seed), names, k=k)
    opt = MeZO(list(module.parameters()), lr=LR, eps=EPS, weight_decay=WD, n_probes=k, directions=directions)
    trace = []
    for _ in range(steps):
        with torch.no_grad():
            before = module(x, y).item()  # L(theta): MeZO itself only sees theta +- eps z
        opt.step(lambda: module(x, y))
        trace.append((before, [p.detach().clone() for p in module.parameters()]))
    return trace


def _gap(a: list, b: list) -> tuple[float, float]:
    """The largest loss difference and the largest parameter difference over all steps."""
    loss = max(abs(la - lb) for (la, _), (lb, _) in zip(a, b, strict=True))
    params = max((pa - pb).abs().max().item() for (_, xa), (_, xb) in zip(a, b, strict=True)
                 for pa, pb in zip(xa, xb, strict=True))
    return loss, params


@pytest.mark.parametrize(("kind", "k"), [("mlp", 1), ("mlp", 4), ("opt", 1)])  # (OPT at k = 4: minutes, no news)
def test_spsa_segment_with_sgd_is_mezo(kind: str, k: int) -> None:
    module, x, y = _model(kind)
    start = [p.detach().clone() for p in module.parameters()]
    ours = _madfunc_run(copy.deepcopy(module), x, y, k, seed=7)
    mezo = _mezo_run(copy.deepcopy(module), x, y, k, seed=7)
    loss_gap, param_gap = _gap(ours, mezo)
    assert loss_gap < ATOL and param_gap < ATOL, (loss_gap, param_gap)
    # The comparison can fail: the training moved the parameters far more than the tolerance, and MeZO with
    # other directions (another seed) lands elsewhere.
    moved = max((p - s).abs().max().item() for p, s in zip(ours[-1][1], start, strict=True))
    assert moved > 1e4 * ATOL, moved
    other = _mezo_run(copy.deepcopy(module), x, y, k, seed=8, steps=2)
    assert _gap(ours[:2], other)[1] > 1e4 * ATOL


def _residual(module: torch.nn.Module, k: int, seed: int) -> float:
    """How far the whole-model ``Random(k)`` gradient (drawn with generator seed 3) lies from the span of the
    ``k`` directions ``TangentStreamDirections`` draws with ``seed``, relative to its norm."""
    names = [n for n, _ in module.named_parameters()]
    directions = TangentStreamDirections(torch.Generator().manual_seed(seed), names, k=k)
    params = list(module.parameters())
    rows = torch.stack([torch.cat([z.flatten() for z in directions.leaves(token, params)])
                        for token in directions.seeds(k)])
    g = torch.cat([p.grad.flatten() for p in params])
    c = torch.linalg.lstsq(rows.T, g.unsqueeze(1)).solution
    return ((rows.T @ c).squeeze(1) - g).norm().item() / g.norm().item()


@pytest.mark.parametrize("kind", ["mlp", "opt"])
@pytest.mark.parametrize("k", [1, 4])
def test_tangent_stream_directions_are_madfuncs(kind: str, k: int) -> None:
    """The reference draws the tangents madfunc draws: a ``Random(k)`` segment's gradient ``(1/k) sum s_j v_j``
    lies in the span of the reference's ``k`` directions (residual at float64 rounding, ~1e-15; we allow
    1e-10), and not in that of another seed's (n >= 100 scalars, so k random directions leave ~all of it)."""
    module, x, y = _model(kind)
    segment = mf.fwd(module, name="model")
    with mf.use_plan({"model": mf.Random(k=k)}, generator=torch.Generator().manual_seed(3)):
        segment(x, y).backward()
    assert _residual(module, k, seed=3) < 1e-10
    assert _residual(module, k, seed=4) > 0.5
