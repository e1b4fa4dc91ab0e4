"""The three models of the planner benchmark (issue 18, item 6), each a pure loss with four named segments.

- ``mlp``: a tanh MLP on scikit-learn's digits (8x8 images, 10 classes), four blocks of two layers.
  Activation-heavy at a large batch: checkpointing saves memory, exact forward mode does not.
- ``transformer``: a tiny GPT-2 from a ``transformers`` config (random init, nothing downloaded), its four
  decoder layers marked by module path with ``mf.mark_segments``; a language-model loss on random tokens.
- ``rollout``: two independent regions of the learned-coefficient reaction-diffusion solver of
  ``benchmarks/rollout.py`` (8 coefficients each, 16 parameters in all), unrolled 1,000+ Euler steps, each
  region one segment. Few parameters, long loops: the case where forward mode should win.

Each builder returns a :class:`PlannerModel`: ``loss_fn(params, *data)`` differentiated in ``params`` (a dict
of tensors), its segment names in call order, and the arguments. The models are written so that a plan
names every segment: ``{name: strategy}`` for each name in ``model.segments``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

import madfunc as mf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import rollout, rollout_data  # noqa: E402

__all__ = ["PlannerModel", "digits", "mlp_logits", "mlp_model", "rollout_model", "transformer_model", "MODELS"]


@dataclasses.dataclass
class PlannerModel:
    """A benchmark model: ``loss_fn(*args)`` differentiated in ``args[0]`` (a dict of parameters)."""

    name: str
    segments: tuple[str, ...]
    loss_fn: Callable[..., torch.Tensor]
    args: tuple
    description: str
    # The same function as one forward segment named "whole" (a pure forward gradient under Random(k)),
    # for the Panchal et al. comparison; None where not provided.
    whole_loss_fn: Callable[..., torch.Tensor] | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.args[0].values())

    def step(self, plan: mf.Plan | dict) -> Callable[[], object]:
        """One training step's gradient under ``plan``, as a no-argument callable."""
        grad = mf.mixed_grad(self.loss_fn, plan)
        return lambda: grad(*self.args)


# -- MLP on digits ------------------------------------------------------------------------------------------
def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, standardised, split 75/25 at random: ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)  # some pixels are constant: +1 keeps them finite and small
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _block(params: dict, h: torch.Tensor) -> torch.Tensor:
    """Two tanh layers; ``params`` holds this block's ``w0, b0, w1, b1`` (the last block: a linear head)."""
    h = torch.tanh(h @ params["w0"] + params["b0"])
    h = h @ params["w1"] + params["b1"]
    return h if params["w1"].shape[1] < params["w0"].shape[1] else torch.tanh(h)


MLP_BLOCKS = tuple(mf.rev(_block, name=f"block{i}") for i in range(4))


def mlp_logits(params: dict, x: torch.Tensor) -> torch.Tensor:
    h = x
    for i, block in enumerate(MLP_BLOCKS):
        h = block({k[2:]: v for k, v in params.items() if k.startswith(f"{i}.")}, h)
    return h


def mlp_loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the four-block MLP (segments ``block0``..``block3``; each reads only its own leaves)."""
    return F.cross_entropy(mlp_logits(params, x), y)


MLP_WHOLE = mf.fwd(mlp_logits, name="whole")


def mlp_whole_loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same MLP as one forward segment ``whole`` (the blocks run inside it, as part of its computation)."""
    return F.cross_entropy(MLP_WHOLE(params, x), y)


def mlp_params(hidden: int, inputs: int = 64, classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [inputs] + [hidden] * 7 + [classes]
    params = {}
    for layer, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        block, j = divmod(layer, 2)
        params[f"{block}.w{j}"] = torch.randn(a, b, generator=gen) / a**0.5
        params[f"{block}.b{j}"] = torch.zeros(b)
    return params


def mlp_model(quick: bool = False, batch: int | None = None, hidden: int | None = None) -> PlannerModel:
    """The digits MLP: 64 -> hidden x 7 -> 10, four blocks of two layers (the last one ends in the 10 logits)."""
    batch = batch or (256 if quick else 1024)
    hidden = hidden or (32 if quick else 256)
    x_train, y_train, x_test, y_test = digits()
    take = torch.randint(0, len(y_train), (batch,), generator=torch.Generator().manual_seed(1))
    params = mlp_params(hidden)
    return PlannerModel(
        "mlp", tuple(f"block{i}" for i in range(4)), mlp_loss, (params, x_train[take], y_train[take]),
        f"digits MLP 64-{hidden}x7-10, tanh, batch {batch}, 4 blocks of 2 layers",
        whole_loss_fn=mlp_whole_loss, extra={"data": (x_train, y_train, x_test, y_test), "hidden": hidden},
    )


# -- tiny GPT-2 -----------------------------------------------------------------------------------------------
def transformer_model(quick: bool = False) -> PlannerModel:
    """A 4-layer GPT-2 (random init) with its decoder layers marked ``transformer.h.0``..``transformer.h.3``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    width, heads, seq, batch, vocab = (16, 2, 16, 2, 64) if quick else (64, 4, 64, 8, 256)
    config = GPT2Config(n_embd=width, n_head=heads, n_layer=4, n_positions=seq, vocab_size=vocab,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    mf.mark_segments(model, {"transformer.h.*": "rev"})  # kept for the process's lifetime, as the benchmark's
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))

    def loss_fn(p: dict, ids: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (ids,), {"labels": ids, "use_cache": False}).loss

    return PlannerModel(
        "transformer", tuple(f"transformer.h.{i}" for i in range(4)), loss_fn, (params, ids),
        f"GPT-2, 4 layers, width {width}, {heads} heads, vocab {vocab}, batch {batch} x {seq} tokens",
        extra={"module": model},
    )


# -- long rollout ---------------------------------------------------------------------------------------------
REGIONS = tuple(mf.fwd(rollout, name=f"region{i}") for i in range(2))


def rollout_model(quick: bool = False, steps: int | None = None, rings: int | None = None) -> PlannerModel:
    """Two independent reaction-diffusion regions (8 coefficients each), ``steps`` Euler steps each."""
    steps = steps or (30 if quick else 1000)
    rings = rings or (4 if quick else 128)
    params, x0s, targets = {}, [], []
    for i in range(len(REGIONS)):
        p, x0, target = rollout_data(rings=rings, cells=16, seed=i)
        params[f"region{i}"] = p * (1.0 + 0.1 * i)  # two different systems
        x0s.append(x0)
        targets.append(target)

    def loss_fn(p: dict, x0s: tuple, targets: tuple) -> torch.Tensor:
        return sum(F.mse_loss(region(p[f"region{i}"], x0s[i], steps), targets[i])  # type: ignore[return-value]
                   for i, region in enumerate(REGIONS))

    return PlannerModel(
        "rollout", tuple(f"region{i}" for i in range(len(REGIONS))), loss_fn, (params, tuple(x0s), tuple(targets)),
        f"2 reaction-diffusion regions x {rings}x16 state, {steps} Euler steps each, 16 parameters",
        extra={"steps": steps},
    )


MODELS: dict[str, Callable[..., PlannerModel]] = {
    "mlp": mlp_model, "transformer": transformer_model, "rollout": rollout_model,
}
