"""``mf.mark_segments`` on HuggingFace models: blocks marked by module path, the model otherwise untouched.

Tiny configs, random init, float64, ``use_cache=False``. GPT-2 (dropout on, train mode) is exact to rounding;
Llama's RMSNorm computes in float32 on purpose, so its gradients agree to ~1e-8 of their scale.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import madfunc as mf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_TOL, GPT2_TOL = 1e-6, 1e-12


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=50, use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().train()


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, n_inner=32, vocab_size=50, n_positions=16, use_cache=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,  # dropout: 0.1 everywhere, GPT-2's default
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().train()


MODELS = {"llama": (_llama, "model.layers.*", LLAMA_TOL), "gpt2": (_gpt2, "transformer.h.*", GPT2_TOL)}


def _ids() -> torch.Tensor:
    return torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(1))


def _hf_grads(model: nn.Module, plan: dict | None = None) -> dict[str, torch.Tensor]:
    """Gradients of the LM loss (under ``use_plan(plan)`` if given), the same dropout masks every call."""
    ids = _ids()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    if plan is None:
        model(input_ids=ids, labels=ids).loss.backward()
    else:
        with mf.use_plan(plan):
            model(input_ids=ids, labels=ids).loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_relative(got: dict, expected: dict, tol: float) -> None:
    """Every gradient within ``tol`` of the largest reference entry (Llama: float32 RMSNorm)."""
    assert got.keys() == expected.keys() and expected
    scale = max(g.abs().max() for g in expected.values())
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=tol * scale, msg=k)


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_blocks_use_plan_matches_autograd(name: str) -> None:
    build, blocks, tol = MODELS[name]
    model = build()
    reference = _hf_grads(model)
    keys = list(model.state_dict())
    handle = mf.mark_segments(model, {blocks: "fwd"})
    assert len(handle.segments) == 2 and list(model.state_dict()) == keys
    _assert_relative(_hf_grads(model, {blocks: "exact"}), reference, tol)
    estimate = _hf_grads(model, {blocks: mf.Random(k=2)})  # forward mode really ran
    assert any(not torch.allclose(estimate[k], reference[k]) for k in reference)


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_blocks_mixed_grad_matches_torch_func_grad(name: str) -> None:
    build, blocks, tol = MODELS[name]
    model, ids = build(), _ids()
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(params: dict) -> torch.Tensor:
        return torch.func.functional_call(model, params, (), {"input_ids": ids, "labels": ids}).loss

    torch.manual_seed(2)
    reference = torch.func.grad(loss)(params)
    mf.mark_segments(model, {blocks: "fwd"})
    torch.manual_seed(2)
    _assert_relative(mf.mixed_grad(loss, {blocks: "exact"})(params), reference, tol)


def test_hf_save_pretrained_and_generate_while_marked(tmp_path) -> None:
    model = _llama().eval()
    ids = _ids()
    expected = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    with mf.mark_segments(model, {"": "fwd", "model.layers.*": "fwd", "lm_head": "rev"}):
        assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False), expected)
        model.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64)
        saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    assert not any("forward" in m.__dict__ for m in loaded.modules())


def _lora(model: nn.Module) -> nn.Module:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero, which would make lora_A's gradient zero
        for k, p in model.named_parameters():
            if "lora_B" in k:
                p.normal_(generator=torch.Generator().manual_seed(3))
    return model


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's own call
@pytest.mark.parametrize("when", ["peft-then-mark", "mark-then-peft"])
def test_hf_peft_lora_gradient_matches_autograd(when: str) -> None:
    if when == "peft-then-mark":
        model = _lora(_llama())
        blocks = "base_model.model.model.layers.*"  # PEFT's prefix: the error for "model.layers.*" suggests it
        with pytest.raises(ValueError, match=r"Did you mean 'base_model\.model\.model\.layers\.\*'"):
            mf.mark_segments(model, {"model.layers.*": "fwd"})
        handle = mf.mark_segments(model, {blocks: "fwd"})
    else:
        base = _llama()
        blocks = "model.layers.*"  # names given by the model before PEFT wrapped it
        handle = mf.mark_segments(base, {blocks: "fwd"})
        model = _lora(base)
    got = _hf_grads(model, {blocks: "exact"})
    handle.remove()
    reference = _hf_grads(model)
    assert sorted({k.split(".")[-3] for k in reference}) == ["lora_A", "lora_B"]  # only the adapters train
    _assert_relative(got, reference, LLAMA_TOL)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # Dynamo's
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace:UserWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_hf_torch_compile_while_marked() -> None:
    model = _gpt2()
    reference = _hf_grads(model)
    mf.mark_segments(model, {"transformer.h.*": "fwd"})
    compiled = torch.compile(model, backend="eager")
    got = _hf_grads(compiled, {"transformer.h.*": "exact"})
    _assert_relative({k.removeprefix("_orig_mod."): g for k, g in got.items()}, reference, GPT2_TOL)
