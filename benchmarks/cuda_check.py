"""madfunc's correctness on an accelerator: ``python benchmarks/cuda_check.py [--device cuda] [--only NAME ...]``.

1. Gradients, in float64: ``mf.mixed_grad`` against ``torch.func.grad`` and ``use_plan`` + ``backward()`` against
   plain autograd, of the same code, for ``Exact()`` and ``Random(k=n, distribution="orthogonal")`` (exact at
   ``k == n``), on ordinary models in train and eval mode. Each transform is called three times (eager; records;
   replays the recording) and every call is checked: the gradient, the model's output and its buffers after the
   call (BatchNorm's running statistics).
2. ``Random(k=4)`` with Gaussian and Rademacher tangents: the mean of independent estimates against the gradient,
   under mixed_grad, use_plan and mixed_grad(traceable=True), eagerly and compiled into one graph.
3. ``mixed_grad(traceable=True)`` with ``Exact``, eagerly and compiled, against ``torch.func.grad``.

One line per case with its error relative to the reference's scale and PASS/FAIL; exit status 1 on any FAIL.
Not a test (CI has no GPU); madfunc was developed and tested on CPU only.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import madfunc as mf
from madfunc.engine import replay as _replay

# Both sides compute the same float64 derivative along different paths; for these small models rounding stays
# below ~1e-12 of the gradient's scale (Exact: one contraction per basis tangent; orthogonal k = n: V^T V g with
# V orthogonal up to ~n eps). A real bug (another dropout mask, a dropped term) is an O(1) error.
TOL = 1e-9
# Per statistical check: the nominal false-failure rate. The z-test rests on the normal approximation of a
# mean of N k-term averages; at this tail its error is ~10% of the rate, so 1e-5 keeps the rate far below 1e-4.
ALPHA = 1e-5
FAILED: list[str] = []
REFUSED: list[str] = []
# Known limitations: a model (name prefix) madfunc may refuse, with the reason printed instead of FAIL, provided
# its error names the segment (a refusal the user can act on); any other error, or a wrong result, still fails.
KNOWN_REFUSALS: dict[str, str] = {}  # (cuDNN RNNs were one until madfunc ran them with cuDNN off)


def report(label: str, err: float, ok: bool, note: str = "") -> None:
    print(f"{label:<66} err {err:9.2e}  {'PASS' if ok else 'FAIL'}{'  ' + note if note else ''}", flush=True)
    if not ok:
        FAILED.append(label)


def refused(label: str, name: str, error: Exception) -> bool:
    """Report a known refusal (see KNOWN_REFUSALS) instead of a failure; False if it is none."""
    why = next((why for prefix, why in KNOWN_REFUSALS.items() if name.startswith(prefix)), None)
    if why is None or "segment 'net'" not in str(error):
        return False
    print(f"{label:<66} {'':13}  refused ({why}): {failure(error)[:90]}", flush=True)
    REFUSED.append(label)
    return True


def leaves(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x.detach()]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in leaves(x[k])]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in leaves(item)]
    return []


def rel_err(actual, expected) -> float:
    """max |actual - expected| over all leaves, relative to max |expected| (the gradient's scale)."""
    a, e = leaves(actual), leaves(expected)
    if len(a) != len(e) or any(p.shape != q.shape for p, q in zip(a, e, strict=True)):
        return math.inf
    scale = max((float(q.abs().max()) for q in e if q.numel()), default=0.0) or 1.0
    return max((float((p - q).abs().max()) for p, q in zip(a, e, strict=True) if p.numel()),
               default=0.0) / scale


# -- the models: (name, factory, input, target, loss of the output) -------------------------------------------------
def models(device: str) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)  # data on a CPU generator, then moved: the same numbers on any device

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=gen).to(device)

    def mse(out, y):
        return ((out - y) ** 2).mean()

    labels = torch.randint(0, 3, (4,), generator=gen).to(device)
    out = [
        ("mlp", lambda: nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 4)),
         randn(6, 8), randn(6, 4), mse),
        ("cnn", lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Linear(4 * 4 * 4, 3)),
         randn(4, 1, 8, 8), labels, F.cross_entropy),
    ]
    for p in (0.1, 0.0):
        out.append((f"transformer(dropout={p})",
                    lambda p=p: nn.TransformerEncoderLayer(16, 2, 32, dropout=p, batch_first=True),
                    randn(2, 5, 16), randn(2, 5, 16), mse))
    out.append(("lstm", lambda: nn.LSTM(4, 8), randn(5, 3, 4), randn(5, 3, 8), lambda o, y: mse(o[0], y)))
    return out


def failure(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}"


def reference(seed: int, fn, *args):
    """``fn(*args)`` after ``torch.manual_seed(seed)``; if it fails, once more with cuDNN off (cuDNN's RNN backward
    refuses eval mode), which computes the same function. Returns (result, note)."""
    try:
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator: both sides draw the same dropout numbers
        return fn(*args), ""
    except RuntimeError as error:
        torch.manual_seed(seed)
        with torch.backends.cudnn.flags(enabled=False):
            return fn(*args), f"(reference without cuDNN: {str(error).splitlines()[0][:60]})"


def replay_note(call: int) -> str:
    if call < 3:
        return ""
    if _replay.replayed("net"):
        return "[replayed]"
    return f"[eager: {_replay.REFUSED.get('net', 'not recorded')[:70]}]"


def check_model(name: str, factory, x, y, crit, training: bool, strategy_name: str, device: str) -> None:
    torch.manual_seed(0)  # the same initial parameters for every case of this model
    base = factory().to(device=device, dtype=torch.float64).train(training)
    n = sum(p.numel() for p in base.parameters())
    strategy = mf.Exact() if strategy_name == "exact" else mf.Random(k=n, distribution="orthogonal")
    plan = {"net": strategy}
    tag = f"{name}[{'train' if training else 'eval'}] {strategy_name}"
    params = {k: v.detach() for k, v in base.named_parameters()}

    # (a) mixed_grad vs torch.func.grad: the same loss over a plain copy and a segment-wrapped copy. The three
    # calls reuse one segment (the replay cache is keyed by the module), and each copy's buffers evolve alike.
    ref_mod, mf_mod = copy.deepcopy(base), copy.deepcopy(base)
    seg = mf.fwd(mf_mod, name="net")

    def loss_ref(p, buffers, x, y):
        # Buffers as an argument: torch.func.grad refuses BatchNorm's in-place update of captured buffers.
        # (madfunc's segment takes its module's buffers itself, as user code would.)
        out = torch.func.functional_call(ref_mod, (p, buffers), (x,))
        return crit(out, y), out

    def loss_mf(p, x, y):
        out = seg(p, x)
        return crit(out, y), out

    ref_t = torch.func.grad(loss_ref, has_aux=True)
    mf_t = mf.mixed_grad(loss_mf, plan=plan, has_aux=True)
    _replay.clear()
    for call in (1, 2, 3):
        label = f"{tag} mixed_grad call{call}"
        try:
            (g_ref, out_ref), note = reference(100 + call, ref_t, params, dict(ref_mod.named_buffers()), x, y)
        except Exception as error:  # noqa: BLE001 - nothing to compare with
            report(label + " grad", math.inf, False, "reference failed: " + failure(error))
            continue
        try:
            torch.manual_seed(100 + call)
            g_mf, out_mf = mf_t(params, x, y)
        except Exception as error:  # noqa: BLE001 - a failing transform is a result to report
            if refused(label, name, error):
                continue
            report(label + " grad", math.inf, False, f"{note} {failure(error)}".strip())
            traceback.print_exception(error, limit=-3, chain=False)  # where in madfunc it surfaced
            continue
        err = rel_err(g_mf, g_ref)
        report(label + " grad", err, err <= TOL, f"{note} {replay_note(call)}".strip())
        err = rel_err(out_mf, out_ref)
        report(label + " output", err, err <= TOL)
        err = rel_err(list(mf_mod.buffers()), list(ref_mod.buffers()))
        if list(ref_mod.buffers()):
            report(label + " buffers", err, err <= TOL)

    # (b) use_plan + backward() vs plain backward(), each on its own copy with its own parameters.
    ref_mod, mf_mod = copy.deepcopy(base), copy.deepcopy(base)
    seg = mf.fwd(mf_mod, name="net")

    def plain_step():
        ref_mod.zero_grad(set_to_none=True)
        out = ref_mod(x)
        crit(out, y).backward()
        return out

    _replay.clear()
    for call in (1, 2, 3):
        label = f"{tag} use_plan call{call}"
        for module in (ref_mod, mf_mod):
            module.zero_grad(set_to_none=True)
        try:
            out_ref, note = reference(100 + call, plain_step)
        except Exception as error:  # noqa: BLE001
            report(label + " grad", math.inf, False, "reference failed: " + failure(error))
            continue
        try:
            torch.manual_seed(100 + call)
            with mf.use_plan(plan):
                out_mf = seg(x)
                crit(out_mf, y).backward()
        except Exception as error:  # noqa: BLE001
            if refused(label, name, error):
                continue
            report(label + " grad", math.inf, False, f"{note} {failure(error)}".strip())
            traceback.print_exception(error, limit=-3, chain=False)  # where in madfunc it surfaced
            continue
        g_ref = [p.grad for p in ref_mod.parameters()]
        g_mf = [p.grad for p in mf_mod.parameters()]
        missing = any(g is None for g in g_mf)
        err = math.inf if missing else rel_err(g_mf, g_ref)
        report(label + " grad", err, err <= TOL, f"{note} {replay_note(call)}".strip())
        err = rel_err(out_mf, out_ref)
        report(label + " output", err, err <= TOL)
        if list(ref_mod.buffers()):
            err = rel_err(list(mf_mod.buffers()), list(ref_mod.buffers()))
            report(label + " buffers", err, err <= TOL)


# -- Random's statistics ------------------------------------------------------------------------------------------
def check_random(distribution: str, transform: str, draws: int, device: str, k: int = 4) -> None:
    gen = torch.Generator().manual_seed(1)
    w, b = (torch.randn(*s, dtype=torch.float64, generator=gen).to(device) for s in ((5, 3), (3,)))
    x, y = (torch.randn(16, *s, dtype=torch.float64, generator=gen).to(device) for s in ((5,), (3,)))
    seg = mf.fwd(lambda p, x: x @ p["w"] + p["b"], name="lin")

    def loss(p, x, y):
        return ((seg(p, x) - y) ** 2).mean()

    truth = torch.cat([g.flatten() for g in leaves(torch.func.grad(loss)({"w": w, "b": b}, x, y))])
    plan = {"lin": mf.Random(k=k, distribution=distribution)}
    grad = mf.mixed_grad(loss, plan=plan, traceable=transform.startswith("traceable"))
    if transform == "traceable compiled":  # one graph: inductor draws the tangents (other numbers, same law)
        torch._dynamo.reset()
        grad = torch.compile(grad, fullgraph=True)
    own = {"w": w.clone().requires_grad_(), "b": b.clone().requires_grad_()}

    def estimate(seed: int) -> torch.Tensor:
        # README, "Randomness": a call's tangents derive from torch's generator state on entry, so distinct
        # seeds give independent tangents and the same seed gives the same estimate bit for bit.
        torch.manual_seed(seed)
        if transform != "use_plan":
            g = grad({"w": w, "b": b}, x, y)
        else:
            for t in own.values():
                t.grad = None
            with mf.use_plan(plan):
                loss(own, x, y).backward()
            g = {name: t.grad for name, t in own.items()}
        return torch.cat([t.flatten() for t in leaves(g)])

    label = f"random(k={k},{distribution}) {transform}"
    first, again = estimate(7), estimate(7)
    report(label + " same seed, same estimate", float((first - again).abs().max()), torch.equal(first, again))
    est = torch.stack([estimate(10_000 + i) for i in range(draws)])  # (draws, n)
    n = truth.numel()
    # z-test per coordinate on the mean of `draws` i.i.d. estimates, with their sample standard deviation;
    # Bonferroni over the n coordinates keeps the whole check's false-failure rate at ALPHA.
    z = (est.mean(0) - truth) / (est.std(0) / math.sqrt(draws))
    threshold = statistics.NormalDist().inv_cdf(1 - ALPHA / (2 * n))
    worst = float(z.abs().max())
    bias = float((est.mean(0) - truth).abs().max() / truth.abs().max())
    # Informational: measured E||g^ - g||^2 / ||g||^2 against the README's law ((n+1)/k, (n-1)/k).
    measured = float(((est - truth) ** 2).sum(1).mean() / (truth**2).sum())
    theory = (n + 1) / k if distribution == "gaussian" else (n - 1) / k
    report(label + f" mean of {draws}", bias, worst <= threshold,
           f"max|z| {worst:.2f} <= {threshold:.2f}; rel. variance {measured:.3f} vs theory {theory:.3f}")


def check_traced(device: str) -> None:
    """mixed_grad(traceable=True) with Exact, eagerly and compiled into one graph, against torch.func.grad."""
    gen = torch.Generator().manual_seed(2)
    p = {name: torch.randn(*shape, dtype=torch.float64, generator=gen).to(device)
         for name, shape in (("w1", (6, 8)), ("b1", (8,)), ("w2", (8, 3)))}
    x, y = (torch.randn(10, n, dtype=torch.float64, generator=gen).to(device) for n in (6, 3))
    stem = mf.fwd(lambda p, x: torch.tanh(x @ p["w1"] + p["b1"]), name="stem")

    def loss(p, x, y):
        return ((stem(p, x) @ p["w2"] - y) ** 2).mean()

    truth = torch.func.grad(loss)(p, x, y)
    traced = mf.mixed_grad(loss, traceable=True)
    torch._dynamo.reset()
    for label, fn in (("eager", traced), ("compiled", torch.compile(traced, fullgraph=True))):
        for call in range(2):
            err = rel_err(fn(p, x, y), truth)
            report(f"traceable Exact, MLP, {label}, call {call + 1}", err, err <= TOL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", default=None,
                        help="model names (prefixes) to check; 'random', 'traced' too")
    parser.add_argument("--draws", type=int, default=4000, help="estimates per statistical check (default 4000)")
    args = parser.parse_args()
    wanted = lambda name: args.only is None or any(name.startswith(o) for o in args.only)  # noqa: E731
    print(f"# madfunc on {args.device} (torch {torch.__version__}"
          f"{', ' + torch.cuda.get_device_name() if args.device.startswith('cuda') else ''}); tolerance {TOL:g}")
    for name, factory, x, y, crit in models(args.device):
        if not wanted(name):
            continue
        for training in (True, False):
            for strategy in ("exact", "orthogonal"):
                check_model(name, factory, x, y, crit, training, strategy, args.device)
    if wanted("traced"):
        check_traced(args.device)
    if wanted("random"):
        for distribution in ("gaussian", "rademacher"):
            for transform in ("mixed_grad", "use_plan", "traceable", "traceable compiled"):
                check_random(distribution, transform, args.draws, args.device)
    if REFUSED:
        print(f"# {len(REFUSED)} refused as known (not failures): " + ", ".join(REFUSED))
    print(f"# {len(FAILED)} failed" + (": " + ", ".join(FAILED) if FAILED else ""))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
