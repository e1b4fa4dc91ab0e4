"""HuggingFace ``Trainer`` with a madfunc plan: :class:`PlanTrainer` (a subclass, not a fork).

It changes three things of ``transformers.Trainer`` and nothing else: each training step (forward and
backward) runs under :func:`madfunc.use_plan`; with ``seed_sgd=``, ``create_optimizer`` builds the
seed-fused :class:`madfunc.SeedSGD` (same parameter groups, learning rate and weight decay as the
Trainer's own optimizer); and when the optimizer is a ``SeedSGD``, gradient clipping goes through
:meth:`madfunc.SeedSGD.clip_grad_norm_`, which counts the gradients it holds as seeds (torch's
``clip_grad_norm_`` would see only ``p.grad``). Evaluation and prediction run the plain model.

This module imports transformers (and the Trainer imports accelerate); ``import madfunc`` does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

try:
    import transformers
except ImportError as error:  # pragma: no cover (the dev environment has it)
    raise ImportError(
        "madfunc.integrations.transformers needs HuggingFace transformers and accelerate: "
        "pip install 'madfunc[hf]' (or pip install transformers accelerate)."
    ) from error

from madfunc.marking import SegmentHandle, mark_segments
from madfunc.optim import SeedSGD
from madfunc.plan import PlanLike, as_plan
from madfunc.strategies.base import Strategy
from madfunc.transforms import use_plan

__all__ = ["PlanTrainer"]


def _seed_optimizer(optimizer: Any) -> SeedSGD | None:
    """The SeedSGD behind ``optimizer`` (accelerate wraps it in an ``AcceleratedOptimizer``), or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, SeedSGD) else None


class PlanTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose training steps run under a madfunc plan.

    Every argument of ``transformers.Trainer`` is accepted as is; the keyword arguments below are added.
    The loss and its backward run under ``mf.use_plan(plan, generator=generator)``, so each segment is
    differentiated as the plan says (reverse, exact forward, ``Random`` or ``SPSA`` estimates). With
    ``seed_sgd``, the optimizer is :class:`madfunc.SeedSGD` (``lr=args.learning_rate``, the Trainer's weight
    decay groups): a ``Random`` or ``SPSA`` segment's parameters then get their update from seeds, with no
    gradient buffer. Gradient clipping (``args.max_grad_norm > 0``, the Trainer's default) then uses the
    whole gradient's norm (:meth:`madfunc.SeedSGD.clip_grad_norm_`, one more draw of the tangents per
    step); ``max_grad_norm=0`` skips it, and the logged ``grad_norm`` with it. Plain ``torch.optim``
    optimizers (``args.optim`` or ``optimizers=``) work as with the Trainer itself, reading ``p.grad``.

    Args:
        *args: ``transformers.Trainer``'s positional arguments.
        plan: the plan (a ``Plan``, a dict of segment names or patterns to strategies, or a string form).
        segments: what to mark on the model first, as :func:`madfunc.mark_segments`'s ``spec`` (e.g.
            ``{"transformer.h.*": "fwd"}``); None if the model is marked already. The handle is kept in
            ``segment_handle``. Default: ``None``.
        seed_sgd: build :class:`madfunc.SeedSGD` as the optimizer, with these extra keyword arguments
            (``{"momentum": 0.9}``; ``{}`` for plain SGD); None keeps the Trainer's optimizer choice.
            Default: ``None``.
        generator: the generator of the tangent seeds (``use_plan``'s); None draws them from torch's
            default generator, which the Trainer seeds from ``args.seed``. Default: ``None``.
        **kwargs: ``transformers.Trainer``'s keyword arguments.

    Examples:
        >>> import contextlib, io, tempfile, torch, transformers, madfunc as mf
        >>> from madfunc.integrations.transformers import PlanTrainer
        >>> config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)
        >>> model = transformers.GPT2LMHeadModel(config)
        >>> data = [{"input_ids": torch.arange(8) % 32, "labels": torch.arange(8) % 32}] * 4
        >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=2,
        ...                                       report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3)
        >>> trainer = PlanTrainer(model=model, args=args, train_dataset=data, plan={"transformer.h.*": mf.Random(k=2)},
        ...                       segments={"transformer.h.*": "fwd"}, seed_sgd={"momentum": 0.9})
        >>> with contextlib.redirect_stdout(io.StringIO()):  # (the Trainer prints its metrics)
        ...     result = trainer.train()
        >>> result.global_step
        2
        >>> trainer.segment_handle.remove()
    """

    def __init__(self, *args: Any, plan: PlanLike, segments: Mapping[str, str | Strategy] | None = None,
                 seed_sgd: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
                 **kwargs: Any) -> None:
        self.plan = as_plan(plan)  # validated now, not at the first step
        if seed_sgd is not None and not isinstance(seed_sgd, Mapping):
            raise TypeError(
                f"PlanTrainer(seed_sgd=...): expected a dict of SeedSGD keyword arguments ({{}} for plain SGD) or "
                f"None, got {type(seed_sgd).__name__} {seed_sgd!r}."
            )
        if seed_sgd is not None and "lr" in seed_sgd:
            raise ValueError("PlanTrainer(seed_sgd=...): give the learning rate as "
                             "TrainingArguments(learning_rate=...), not in seed_sgd (the Trainer's scheduler sets it).")
        self.seed_sgd = None if seed_sgd is None else dict(seed_sgd)
        self.plan_generator = generator
        super().__init__(*args, **kwargs)
        self.segment_handle: SegmentHandle | None = None
        if segments is not None:
            self.segment_handle = mark_segments(self._module(), segments)
        seeded = self.seed_sgd is not None or _seed_optimizer(self.optimizer) is not None
        if seeded and self.args.max_grad_norm > 0 and not hasattr(transformers.Trainer, "_clip_grad_norm"):
            raise RuntimeError(  # (this Trainer clips p.grad alone, which misses the gradients held as seeds)
                f"PlanTrainer: transformers {transformers.__version__}'s Trainer has no _clip_grad_norm hook, so it "
                "would clip p.grad alone, without the gradients SeedSGD holds as seeds. Set "
                "TrainingArguments(max_grad_norm=0) or use transformers >= 5."
            )

    def _module(self) -> torch.nn.Module:
        model = self.model
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"PlanTrainer: expected a model (an nn.Module), got {type(model).__name__} {model!r}.")
        return model

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """``transformers.Trainer.training_step`` (loss and backward) under the plan."""
        with use_plan(self.plan, generator=self.plan_generator):
            return super().training_step(model, inputs, num_items_in_batch)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """With ``seed_sgd``: :class:`madfunc.SeedSGD` over the Trainer's weight-decay groups; else the Trainer's."""
        if self.optimizer is not None or self.seed_sgd is None:
            return super().create_optimizer(model)
        opt_model = self._module() if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        trained = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in trained if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in trained if n not in decay], "weight_decay": 0.0},
        ]
        self.optimizer = SeedSGD([g for g in groups if g["params"]], lr=self.args.learning_rate, **self.seed_sgd)
        return self.optimizer

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        """The Trainer's clipping hook: a SeedSGD clips the whole gradient, seeds included."""
        seed = _seed_optimizer(self.optimizer)
        if seed is None:
            return super()._clip_grad_norm(model)  # pyright: ignore[reportAttributeAccessIssue]
        return seed.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """The norm the Trainer logs: under a SeedSGD, the clipped one, or none without clipping (``p.grad``
        alone would be a part of the gradient)."""
        if grad_norm is None and _seed_optimizer(self.optimizer) is not None:
            return None
        return super()._get_grad_norm(model, grad_norm)  # pyright: ignore[reportAttributeAccessIssue]
