"""The model of ``benchmarks/finetune.py``: an ``OPTForCausalLM`` from transformers, cut into a trunk
(embeddings and all decoder layers but the last) and a tail (the last layer, final norm and LM head), so that
a plan can give the two parts different strategies; with its loss, for language modelling or for
classification by next token."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = ["FULL", "QUICK", "Shape", "Split", "Tail", "Trunk", "opt_model", "run_layers"]


@dataclasses.dataclass(frozen=True)
class Shape:
    """The model and batch of the memory and time part."""

    layers: int = 12
    width: int = 768
    ffn: int = 3072
    heads: int = 12
    vocab: int = 50272
    batch: int = 4
    seq: int = 256
    tied: bool = True  # the LM head shares the token embedding's weight (OPT's default)


FULL = Shape()
QUICK = Shape(layers=4, width=64, ffn=256, heads=4, vocab=256, batch=4, seq=64)  # activations matter, as at full size


def opt_model(shape: Shape, seed: int = 0) -> torch.nn.Module:
    """An ``OPTForCausalLM`` of ``shape`` with random weights (seeded), dropout off, SDPA attention."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.OPTConfig(
        vocab_size=shape.vocab, hidden_size=shape.width, ffn_dim=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, word_embed_proj_dim=shape.width, max_position_embeddings=max(shape.seq, 64),
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, tie_word_embeddings=shape.tied)
    torch.manual_seed(seed)
    return transformers.OPTForCausalLM(config)


def run_layers(layers: torch.nn.ModuleList, h: torch.Tensor, positions: torch.Tensor,
               checkpointed: bool) -> torch.Tensor:
    """The decoder layers in turn; ``checkpointed``: each under ``torch.utils.checkpoint`` (non-reentrant), as
    transformers' ``gradient_checkpointing_enable`` does, but as a flag of this call rather than a state of
    the model (which the timing rounds share between methods)."""
    for layer in layers:
        if checkpointed:
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False, attention_mask=None,
                                                  position_ids=positions)
        else:
            h = layer(h, attention_mask=None, position_ids=positions)
    return h


class Trunk(torch.nn.Module):
    """The embeddings and the first ``cut`` decoder layers of an OPT model (shared with it, not copied):
    what ``OPTDecoder.forward`` does for an unpadded batch without a cache (no mask: SDPA's causal flag)."""

    def __init__(self, model: torch.nn.Module, cut: int) -> None:
        super().__init__()
        decoder = model.model.decoder
        if decoder.project_in is not None or not decoder.config.do_layer_norm_before:
            raise ValueError("Trunk: expects OPT with word_embed_proj_dim == hidden_size and pre-layer-norm")
        self.embed_tokens, self.embed_positions = decoder.embed_tokens, decoder.embed_positions
        self.layers = torch.nn.ModuleList(decoder.layers[:cut])
        self.checkpointed = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
        h = self.embed_tokens(ids) + self.embed_positions(mask, 0, position_ids=positions)
        return run_layers(self.layers, h, positions, self.checkpointed)


class Tail(torch.nn.Module):
    """The decoder layers from ``cut`` on, the final layer norm and the LM head (the embedding's weight, if tied)."""

    def __init__(self, model: torch.nn.Module, cut: int) -> None:
        super().__init__()
        decoder = model.model.decoder
        self.layers = torch.nn.ModuleList(decoder.layers[cut:])
        self.norm, self.head = decoder.final_layer_norm, model.lm_head
        self.checkpointed = False

    def forward(self, h: torch.Tensor, last_only: bool) -> torch.Tensor:
        positions = torch.arange(h.shape[1], device=h.device).expand(h.shape[:2])
        h = self.norm(run_layers(self.layers, h, positions, self.checkpointed))
        return self.head(h[:, -1] if last_only else h)


class Split(torch.nn.Module):
    """An OPT causal LM as ``Trunk`` then ``Tail``, with its loss: ``split(ids, targets)``.

    ``targets`` of the shape of ``ids``: next-token prediction (the mean cross-entropy of predicting
    ``ids[:, 1:]``, ``targets`` unused but for its shape); of shape ``(batch,)``: the cross-entropy of the
    token after the prompt (classification by next token), the head applied to the last position only.
    ``trunk_call`` and ``tail_call`` replace the two parts' calls (their madfunc segments, in the mixed and
    planned methods).
    """

    def __init__(self, model: torch.nn.Module, cut: int | None = None) -> None:
        super().__init__()
        cut = len(model.model.decoder.layers) - 1 if cut is None else cut
        self.hf = [model]  # (in a list: not a submodule, so the parameters are named once, below)
        self.trunk, self.tail = Trunk(model, cut), Tail(model, cut)
        self.trunk_call: Callable[..., torch.Tensor] | None = None
        self.tail_call: Callable[..., torch.Tensor] | None = None

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = (self.trunk_call or self.trunk)(ids)
        tail = self.tail_call or self.tail
        if targets.dim() == 1:
            return torch.nn.functional.cross_entropy(tail(h, last_only=True), targets)
        logits = tail(h, last_only=False)[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))



def floor_pass(split: Split, params: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor], k: int,
               ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and its derivatives along ``tangents`` (``k`` > 1: a leading dimension of ``k`` on each), by a
    plain ``torch.func.jvp`` (under ``vmap`` for ``k`` > 1) of ``split`` called on ``params``."""

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(split, p, (ids, targets))

    def directional(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.jvp(loss, (params,), (t,))

    # (SDPA's fused CPU kernel has no forward-mode formula in PyTorch; its math form decomposes into ops that do)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return directional(tangents) if k == 1 else torch.func.vmap(directional)(tangents)


def jvp_floor_step(split: Split, k: int, seed: int) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """What any forward-gradient step built on PyTorch's own forward-mode formulas costs at least: one plain
    ``torch.func.jvp`` of the loss (``k`` > 1: under ``vmap``, ``k`` tangents) in every parameter
    (:func:`floor_pass`), with the tangents drawn once, before (so neither their drawing nor their bytes count: a
    step that regenerates them from a seed pays both), and no update. The memory and time part's floor for
    ``random1``/``random16``: a jvp keeps a tangent beside every activation it computes, so its transient memory
    is about twice an inference pass's, and a linear layer's jvp runs three matrix products to a forward pass's
    one. Attention runs SDPA's math backend (the fused CPU kernel has no forward-mode formula), which keeps the
    attention weights of one layer at a time: at the full shape 12.6 MB, under 1% of the step's peak."""
    params = {name: p.detach() for name, p in split.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    tangents = {name: torch.randn((k, *p.shape) if k > 1 else p.shape, generator=gen, dtype=p.dtype)
                for name, p in params.items()}

    def step(ids: torch.Tensor, targets: torch.Tensor) -> float:
        value, _ = floor_pass(split, params, tangents, k, ids, targets)
        return float(value.reshape(-1)[0])

    return step
