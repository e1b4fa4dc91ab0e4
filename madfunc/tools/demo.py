"""The built-in demo: a small CNN on scikit-learn's 8x8 handwritten digits, trained under several plans.

The model has three segments: ``features`` (two 3x3 convolutions, the first with ReLU and max-pooling),
``act`` (ReLU, max-pooling; no parameters) and ``head`` (a linear classifier). All are reverse mode unless
the plan says otherwise, so the empty plan is plain backprop.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import torch
import torch.nn.functional as F

from madfunc.core.text import text_table
from madfunc.plan import Plan
from madfunc.segment import rev
from madfunc.tools.diagnostics import compare
from madfunc.tools.reports import CompareReport
from madfunc.transforms import mixed_grad_and_value

__all__ = ["SEGMENTS", "DemoResult", "digits", "init_params", "loss_fn", "run_demo", "train"]

SEGMENTS = ("features", "act", "head")
_FEATURE_KEYS = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
_HEAD_KEYS = ("head.weight", "head.bias")
Params = dict[str, torch.Tensor]


def _missing(what: str, error: ImportError) -> RuntimeError:
    return RuntimeError(
        f'the madfunc demo needs {what} ({error}); install it with: pip install -e ".[demo]" '
        "(or pip install scikit-learn matplotlib)."
    )


def digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits (1797 images, 8x8, no download) as ``(x_train, y_train, x_test, y_test)``,
    pixels scaled to [0, 1], split at random with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - dev extra installs it
        raise _missing("scikit-learn", error) from None
    data = load_digits()  # a Bunch (sklearn's stubs also allow the return_X_y tuple, not asked for here)
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pyright: ignore[reportAttributeAccessIssue]
    y = torch.tensor(data.target, dtype=torch.int64)  # pyright: ignore[reportAttributeAccessIssue]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train_ = order[:n_test], order[n_test:]
    return x[train_], y[train_], x[test], y[test]


def init_params(seed: int = 0) -> Params:
    """Parameters of the built-in CNN (PyTorch's default initialisation, seeded)."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound

    return {
        "conv1.weight": uniform((4, 1, 3, 3), 9),
        "conv1.bias": uniform((4,), 9),
        "conv2.weight": uniform((8, 4, 3, 3), 36),
        "conv2.bias": uniform((8,), 36),
        "head.weight": uniform((10, 32), 32),
        "head.bias": uniform((10,), 32),
    }


@rev
def features(p: Params, x: torch.Tensor) -> torch.Tensor:
    """(B, 1, 8, 8) images -> (B, 8, 4, 4) pre-activations: conv-ReLU-pool, conv (336 parameters)."""
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)), 2)
    return F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1)


@rev
def act(z: torch.Tensor) -> torch.Tensor:
    """(B, 8, 4, 4) pre-activations -> (B, 32) features: ReLU, pool, flatten (no parameters; the place for
    activity perturbation: ``act=activity:16`` estimates each example's cotangent of ``z``)."""
    return F.max_pool2d(F.relu(z), 2).flatten(1)


@rev
def head(p: Params, h: torch.Tensor) -> torch.Tensor:
    """(B, 32) features -> (B, 10) logits (330 parameters)."""
    return F.linear(h, p["head.weight"], p["head.bias"])


def logits(params: Params, x: torch.Tensor) -> torch.Tensor:
    """The model: each segment gets only its own parameters, so it differentiates only those."""
    z = features({k: params[k] for k in _FEATURE_KEYS}, x)
    return head({k: params[k] for k in _HEAD_KEYS}, act(z))


def loss_fn(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the built-in CNN."""
    return F.cross_entropy(logits(params, x), y)


def accuracy(params: Params, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((logits(params, x).argmax(1) == y).float().mean())


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """One plan's training run: per-step losses and times, test accuracy curve, final accuracies,
    and the gradient quality at initialisation (a :class:`CompareReport`, or None)."""

    label: str
    losses: tuple[float, ...]
    step_seconds: tuple[float, ...]
    test_curve: tuple[tuple[int, float], ...]
    train_accuracy: float
    test_accuracy: float
    quality: CompareReport | None

    @property
    def ms_per_step(self) -> float:
        """Median milliseconds per training step (gradient and Adam update)."""
        return statistics.median(self.step_seconds) * 1e3


class _Progress:
    """Training progress on ``stream``: a tqdm bar on a terminal, else one line when done; None: silent."""

    def __init__(self, label: str, total: int, stream: TextIO | None) -> None:
        self.label, self.total, self.stream = label, total, stream
        self.start = time.perf_counter()
        self.bar = None
        if stream is not None and stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError as error:  # pragma: no cover - the demo extra installs it
                raise _missing("tqdm", error) from None
            self.bar = tqdm(total=total, desc=label, file=stream, unit="step")

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.stream is not None:
            self.stream.write(f"{self.label}: {self.total} steps in {time.perf_counter() - self.start:.1f} s\n")
            self.stream.flush()


def train(
    plan: Plan,
    data: Sequence[torch.Tensor],
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    eval_every: int = 20,
    label: str = "",
    progress: TextIO | None = None,
) -> tuple[Params, dict[str, Any]]:
    """Train the CNN with Adam under ``plan`` for ``steps`` minibatch steps; return params and a log."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    params = init_params(seed)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    grad_fn = mixed_grad_and_value(loss_fn, plan)
    gen = torch.Generator().manual_seed(seed + 1)
    losses, seconds, curve = [], [], [(0, accuracy(params, x_test, y_test))]
    bar = _Progress(label, steps, progress)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y_train), (batch_size,), generator=gen)
        start = time.perf_counter()
        grads, value = grad_fn(params, x_train[idx], y_train[idx])
        for key, p in params.items():
            p.grad = grads[key]
        opt.step()
        seconds.append(time.perf_counter() - start)
        losses.append(float(value))
        if step % eval_every == 0 or step == steps:
            curve.append((step, accuracy(params, x_test, y_test)))
        bar.update(losses[-1])
    bar.close()
    return params, {"losses": losses, "seconds": seconds, "curve": curve}


def run_demo(
    plans: Mapping[str, Plan],
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    draws: int = 16,
    out: str | None = "madfunc-demo.png",
    progress: TextIO | None = sys.stderr,
) -> list[DemoResult]:
    """Train the CNN once per plan, measure gradient quality at initialisation, optionally plot."""
    data = digits(seed)
    x_train, y_train = data[0], data[1]
    probe = torch.randint(0, len(y_train), (batch_size,), generator=torch.Generator().manual_seed(seed + 2))
    results = []
    for label, plan in plans.items():
        params, log = train(plan, data, steps, batch_size, lr, seed, label=label, progress=progress)
        torch.manual_seed(seed)
        quality = compare(loss_fn, plan, init_params(seed), x_train[probe], y_train[probe], draws=draws)
        results.append(
            DemoResult(
                label=label,
                losses=tuple(log["losses"]),
                step_seconds=tuple(log["seconds"]),
                test_curve=tuple(log["curve"]),
                train_accuracy=accuracy(params, x_train, y_train),
                test_accuracy=accuracy(params, data[2], data[3]),
                quality=quality,
            )
        )
    if out:
        plot(results, out)
    return results


def summary(results: Sequence[DemoResult]) -> str:
    """The demo's table: accuracy, time per step, and gradient quality against exact at initialisation."""
    headers = ("plan", "train acc", "test acc", "ms/step", "cosine", "rel.error", "variance", "theory")
    rows = []
    for r in results:
        q = r.quality
        random = {n: f for n, f in q.per_segment.items() if f.variance_theory is not None} if q else {}
        overall = f"{q.variance:.3g}" if q else "-"
        variance = " ".join(f"{n} {f.variance:.3g}" for n, f in random.items()) or overall
        theory = " ".join(f"{n} {f.variance_theory:.3g}" for n, f in random.items()) or "-"
        quality = (f"{q.cosine:.4f}", f"{q.relative_error:.3g}") if q else ("-", "-")
        rows.append(
            (
                r.label,
                f"{r.train_accuracy:.1%}",
                f"{r.test_accuracy:.1%}",
                f"{r.ms_per_step:.2f}",
                *quality,
                variance,
                theory,
            )
        )
    note = (
        "gradient quality at initialisation, one batch, against backprop: cosine and rel.error over all\n"
        "parameters; variance = E||g^-g||^2/||g||^2 of each random segment (over the leaves it "
        "reaches), and its theory"
    )
    return f"{text_table(headers, rows, left=1)}\n{note}"


def plot(results: Sequence[DemoResult], out: str) -> None:
    """Training loss, test accuracy and time per step of each plan, as a PNG at ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - dev extra installs it
        raise _missing("matplotlib", error) from None
    fig, (ax_loss, ax_acc, ax_time, ax_quality) = plt.subplots(1, 4, figsize=(20, 4.2))
    for i, r in enumerate(results):
        style = dict(label=r.label, color=f"C{i}", linestyle=("-", "--", ":", "-.")[i % 4])
        smooth, ema = [], r.losses[0] if r.losses else 0.0
        for value in r.losses:
            ema = 0.9 * ema + 0.1 * value
            smooth.append(ema)
        ax_loss.plot(range(1, len(smooth) + 1), smooth, **style)
        steps, accuracies = zip(*r.test_curve, strict=True)
        ax_acc.plot(steps, accuracies, marker=".", **style)
    ax_time.barh(
        [r.label for r in results], [r.ms_per_step for r in results], color=[f"C{i}" for i in range(len(results))]
    )
    ax_loss.set(xlabel="step", ylabel="training loss (EMA 0.9)", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1), title="test accuracy")
    ax_time.set(xlabel="ms per step (median)", title="time per step")
    ax_time.invert_yaxis()
    _quality_panel(ax_quality, results)
    ax_loss.legend(fontsize=8)
    fig.suptitle("madfunc demo: small CNN on sklearn digits (8x8)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _quality_panel(ax: Any, results: Sequence[DemoResult]) -> None:
    """Gradient quality at initialisation: each plan's cosine with backprop's gradient (bars), labelled with
    the measured relative variance ``E||g^-g||^2/||g||^2`` and, where a law applies, its theory."""
    labels, cosines, notes = [], [], []
    for r in results:
        q = r.quality
        if q is None:
            continue
        labels.append(r.label)
        cosines.append(q.cosine)
        lawful = [(name, f) for name, f in q.per_segment.items() if f.variance_theory is not None]
        if len(lawful) == 1:  # one random segment with a variance law: its measured variance next to the law
            name, f = lawful[0]
            notes.append(f"{name}: var {f.variance:.3g} (theory {f.variance_theory:.3g})")
        else:
            notes.append(f"var {q.variance:.3g}")
    bars = ax.barh(labels, cosines, color=[f"C{i}" for i in range(len(labels))])
    for bar, note in zip(bars, notes, strict=True):
        ax.text(0.02, bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
    ax.set(xlabel="cosine with the exact gradient", xlim=(0, 1.05), title="gradient quality at init")
    ax.invert_yaxis()
