"""HuggingFace transformers models with library defaults: forward segments compute what the plain model does.

The zoo (tests/support/hf_zoo.py): GPT-2, Llama, Mistral, Qwen2, OPT, GPT-NeoX, BERT, RoBERTa, T5, ViT and
HF ResNet, tiny configs, random init, float64, their defaults (KV caches on, dropout, SDPA), in train and
eval mode. Their blocks are marked by module path (``mf.mark_segments``) and run under ``Exact``; the
gradient must equal plain autograd (``use_plan``) and ``torch.func.grad`` (``mixed_grad`` over
``functional_call``) under the same seed, and the call must leave what one plain call leaves: the KV
cache's keys and values (a decoder layer appends to it: before issue 20 each of the engine's passes
appended, and the gradient was silently off by 0.1-0.5 of its scale), and BatchNorm's running statistics.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from scipy import stats
from support.hf_zoo import FAMILIES, cache_tensors, relative_error

import madfunc as mf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str, train: bool) -> tuple[torch.nn.Module, dict]:
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build().train(train)
    return model, family.inputs(torch.Generator().manual_seed(1))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_cache(got, expected) -> None:
    if not isinstance(got, list):
        got, expected = cache_tensors(got), cache_tensors(expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        # primal values, not a pass's dual or batched tensors (under torch.func.grad, a plain call's are too)
        assert torch._C._functorch.is_functorch_wrapped_tensor(a) == torch._C._functorch.is_functorch_wrapped_tensor(b)
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_exact_blocks_match_plain_autograd(name: str, train: bool) -> None:
    family = FAMILIES[name]
    model, inputs = _build(name, train)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    handle = mf.mark_segments(model, dict.fromkeys(family.blocks, "fwd"))

    torch.manual_seed(2)
    with mf.use_plan(dict.fromkeys(family.blocks, "exact")):
        out = model(**inputs)
        out.loss.backward()
    got, got_buffers = _grads(model), {k: b.clone() for k, b in model.named_buffers()}

    for k, b in model.named_buffers():  # the same start for the plain step
        b.copy_(buffers[k])
    handle.remove()
    torch.manual_seed(2)
    plain = model(**inputs)
    plain.loss.backward()

    assert relative_error(got, _grads(model)) <= family.tol
    assert out.loss.item() == plain.loss.item()
    _assert_same_cache(getattr(out, "past_key_values", None), getattr(plain, "past_key_values", None))
    if family.cached:
        assert cache_tensors(out.past_key_values), "the family should return a filled cache by default"
    for k, b in model.named_buffers():  # updated once (BatchNorm's running statistics), as a plain step does
        torch.testing.assert_close(got_buffers[k], b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exact_blocks_match_torch_func_grad(name: str) -> None:
    family = FAMILIES[name]
    model, inputs = _build(name, True)
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    mf.mark_segments(model, dict.fromkeys(family.blocks, "fwd"))

    # Buffers are passed in too: torch.func forbids updating a captured one (BatchNorm's running statistics).
    def loss(p, b):  # (torch.func's aux must be tensors: the cache's keys and values)
        out = torch.func.functional_call(model, (p, b), (), inputs)
        return out.loss, cache_tensors(getattr(out, "past_key_values", None))

    got_buffers = {k: b.clone() for k, b in buffers.items()}
    torch.manual_seed(3)
    got, got_cache = mf.mixed_grad(loss, has_aux=True, plan=dict.fromkeys(family.blocks, "exact"))(params, got_buffers)
    torch.manual_seed(3)
    expected, cache = torch.func.grad(loss, has_aux=True)(params, buffers)
    assert relative_error(got, expected) <= family.tol
    _assert_same_cache(got_cache, cache)
    for k, b in buffers.items():  # updated once, as under torch.func.grad
        torch.testing.assert_close(got_buffers[k], b, rtol=0, atol=0)


def test_kv_cache_is_filled_once_and_generate_continues() -> None:
    """A plain call's cache, not one appended per pass: generation from it continues as it does from the
    plain call's (greedy), and the marked model generates what the unmarked one does."""
    model, inputs = _build("llama", False)
    ids = inputs["input_ids"][:1]
    mf.mark_segments(model, {"model.layers.*": "fwd"})
    with mf.use_plan({"model.layers.*": mf.Random(k=3)}):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert out.past_key_values.get_seq_length() == ids.shape[1]
    plain = model(input_ids=ids)
    _assert_same_cache(out.past_key_values, plain.past_key_values)
    nxt = out.logits[:, -1:].argmax(-1)
    # transformers 5.25 renamed the argument past_key_values to cache (the output keeps its name)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        after = model(input_ids=nxt, **{name: out.past_key_values}).logits
        full = model(input_ids=torch.cat([ids, nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(after, full)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)


# -- Random on GPT-2 with dropout and caches on: unbiased -------------------------------------------------
# Draws: every call with the same torch seed (the same dropout masks, so one exact gradient g) and its own
# tangent generator. False-failure rates (the derivation is tests/strategies/test_random.py's):
#   along g: u_i = <g^_i, g>/||g||^2 has mean 1; |z| <= 5 on its mean: two-sided normal tail 5.7e-7 (with
#     N = 400 the Edgeworth correction for a skewness below 3 adds under 2e-6).
#   all directions: T = N ||mean(g^) - g||^2 / tr(S) <= chi2.isf(1e-6, 1) = 23.9 (Szekely & Bakirov 2003).
# Both together below 1e-5.
N_DRAWS = 400


def test_random_is_unbiased_on_gpt2_with_defaults() -> None:
    model, inputs = _build("gpt2", True)
    mf.mark_segments(model, {"transformer.h.0": "fwd"})
    plan = {"transformer.h.0": mf.Random(k=4)}
    prefix = "transformer.h.0."

    def step(generator=None):
        torch.manual_seed(5)
        with mf.use_plan(plan, generator=generator):
            out = model(**inputs)
            out.loss.backward()
        grads = _grads(model)
        return torch.cat([g.flatten() for k, g in grads.items() if k.startswith(prefix)]), out

    torch.manual_seed(5)
    exact_out = model(**inputs)
    exact_out.loss.backward()
    g = torch.cat([v.flatten() for k, v in _grads(model).items() if k.startswith(prefix)])
    draws = []
    for i in range(N_DRAWS):
        estimate, out = step(torch.Generator().manual_seed(1000 + i))
        draws.append(estimate)
        if i == 0:
            _assert_same_cache(out.past_key_values, exact_out.past_key_values)
    draws = torch.stack(draws)
    u = draws @ g / g.dot(g)
    z = (u.mean() - 1) / (u.std() / N_DRAWS**0.5)
    assert abs(z.item()) <= 5.0
    t = N_DRAWS * (draws.mean(0) - g).square().sum() / draws.var(0).sum()
    assert t.item() <= stats.chi2.isf(1e-6, 1)
