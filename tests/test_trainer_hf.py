"""PlanTrainer (madfunc/integrations/transformers.py): HuggingFace's Trainer under a plan, with torch.optim or
the seed-fused SeedSGD, gives the parameters of the plain loop ``use_plan; backward; clip; step`` (float64)."""

from __future__ import annotations

import pytest
import torch

import madfunc as mf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from madfunc.integrations.transformers import PlanTrainer  # noqa: E402

LAYERS = "transformer.h.*"
STEPS, LR = 3, 0.05


def _model() -> torch.nn.Module:
    """A tiny GPT-2, random init, no dropout (the plain loop and the Trainer must draw nothing else)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and labels. The first label, which a causal LM's loss never reads (it shifts the labels), is
    masked: then the tokens the Trainer counts to normalise the loss (all labels or the shifted ones, by
    version) are the ones the model's mean runs over, and the plain loop's mean is the Trainer's loss."""
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[:, 0] = -100
    return x, labels


def _args(tmp_path, **kw) -> transformers.TrainingArguments:
    """One batch of both examples per step, in their order (Random's tangents on the layers' input activations
    are drawn per position, batch rows included: a shuffled batch is another estimate), constant learning rate."""
    kw.setdefault("max_grad_norm", 1.0)
    return transformers.TrainingArguments(
        str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=LR, lr_scheduler_type="constant",
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        train_sampling_strategy="sequential", **kw)


def _plain_loop(model: torch.nn.Module, plan: dict, opt: torch.optim.Optimizer, max_grad_norm: float,
                segments: dict | None = None) -> None:
    """The loop the Trainer must reproduce."""
    mf.mark_segments(model, segments or {LAYERS: "fwd"})
    (x, labels), gen = _batch(), torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        with mf.use_plan(plan, generator=gen):
            model(input_ids=x, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad()


class _Watch(transformers.TrainerCallback):
    """Before each optimizer step: where the layers' gradients are (p.grad, or seeds held by the optimizer)."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, int]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        pending = inner.pending() if isinstance(inner, mf.SeedSGD) else 0
        self.seen.append((model.transformer.h[0].mlp.c_fc.weight.grad is None, pending))


def _train(tmp_path, plan: dict, optimizer=None, segments: dict | None = None, **kw
           ) -> tuple[torch.nn.Module, _Watch, float]:
    """Train a fresh model with PlanTrainer; ``optimizer(model)`` builds the optimizer passed as ``optimizers=``."""
    model, watch = _model(), _Watch()
    if optimizer is not None:
        kw["optimizers"] = (optimizer(model), None)
    x, labels = _batch()
    data = [{"input_ids": x[i], "labels": labels[i]} for i in range(2)]
    trainer = PlanTrainer(model=model, args=_args(tmp_path, weight_decay=kw.pop("weight_decay", 0.0)),
                          train_dataset=data, plan=plan, segments=segments or {LAYERS: "fwd"},
                          generator=torch.Generator().manual_seed(0), callbacks=[watch], **kw)
    loss = trainer.train().training_loss
    trainer.segment_handle.remove()
    return model, watch, loss


def _assert_same(trained: torch.nn.Module, reference: torch.nn.Module) -> None:
    initial = _model().state_dict()
    for (name, p), q in zip(trained.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
        assert not torch.equal(p, initial[name]), f"{name} was not updated"


def test_exact_plan_with_torch_sgd_matches_the_plain_loop(tmp_path):
    """Exact forward mode on each layer's first LayerNorm (288 tangents: a whole layer would take 3,600), the rest
    by backprop, torch.optim.SGD passed as ``optimizers=``: the plain loop's parameters."""
    segments = {"transformer.h.*.ln_1": "fwd"}
    plan = {"transformer.h.*.ln_1": "exact"}
    trained, watch, loss = _train(tmp_path, plan, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=LR),
                                  segments=segments)
    reference = _model()
    _plain_loop(reference, plan, torch.optim.SGD(reference.parameters(), lr=LR), 1.0, segments)
    assert torch.isfinite(torch.tensor(loss))
    assert watch.seen == [(False, 0)] * STEPS  # p.grad, as torch.optim expects
    _assert_same(trained, reference)


def test_random_plan_with_seed_sgd_matches_grad_then_sgd(tmp_path):
    """SeedSGD with momentum and the Trainer's weight-decay groups, clipped by the whole gradient's norm: the same
    parameters as p.grad, torch's clip_grad_norm_ and torch.optim.SGD; the layers' gradients never in p.grad."""
    plan = {LAYERS: mf.Random(k=2)}
    trained, watch, loss = _train(tmp_path, plan, seed_sgd={"momentum": 0.9}, weight_decay=0.1)
    assert torch.isfinite(torch.tensor(loss))
    assert all(none and pending > 0 for none, pending in watch.seen) and len(watch.seen) == STEPS
    reference = _model()
    decay = set(transformers.Trainer.get_decay_parameter_names(None, reference))  # (does not read self)
    groups = [{"params": [p for n, p in reference.named_parameters() if n in decay], "weight_decay": 0.1},
              {"params": [p for n, p in reference.named_parameters() if n not in decay], "weight_decay": 0.0}]
    _plain_loop(reference, plan, torch.optim.SGD(groups, lr=LR, momentum=0.9), 1.0)
    _assert_same(trained, reference)


def test_seed_sgd_argument_errors(tmp_path):
    with pytest.raises(TypeError, match=r"PlanTrainer\(seed_sgd=...\): expected a dict"):
        PlanTrainer(model=_model(), args=_args(tmp_path), plan={LAYERS: "random"}, seed_sgd=0.9)
    with pytest.raises(ValueError, match=r"learning rate as TrainingArguments\(learning_rate=...\)"):
        PlanTrainer(model=_model(), args=_args(tmp_path), plan={LAYERS: "random"}, seed_sgd={"lr": 0.1})


def test_seed_sgd_groups_and_logged_norm(tmp_path):
    """seed_sgd builds SeedSGD over the Trainer's weight-decay groups at its learning rate; without clipping the
    Trainer logs no gradient norm (p.grad alone would be a part of the gradient)."""
    model = _model()
    trainer = PlanTrainer(model=model, args=_args(tmp_path, weight_decay=0.1, max_grad_norm=0.0),
                          plan={LAYERS: "random"}, seed_sgd={"momentum": 0.5})
    opt = trainer.create_optimizer()
    assert isinstance(opt, mf.SeedSGD) and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == LR and g["momentum"] == 0.5 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert trainer._get_grad_norm(model) is None
