"""madfunc against its peer AutoMAD on AutoMAD's test CNN, exact forward mode ("Performance II", target 1).

``python benchmarks/automad_peer.py [--quick | --rounds N] [--threads N] [--malloc-default]``

The network (input 3x16x16): conv 3->4 k3, tanh, conv 4->5 k3, relu, avgpool 2, maxpool 2, flatten,
linear 45->7, MSE loss against a target (619 weights). Three gradient steps are timed side by side in one
process at batch 2 and 32: madfunc with the whole loss as one ``Exact()`` segment (``models.whole_cnn_loss``),
AutoMAD's layers in ``mode="jacobian"`` followed by ``MSELoss`` and the ``Fwd2Rev`` glue, and a plain backprop
step (``torch.func.grad(models.cnn_loss)``). Rounds are interleaved (the order alternates, see ``run.timeit``);
each ratio is the median of per-round ratios. Before timing, both gradients are checked against
``torch.func.grad`` for the same weights (AutoMAD's MSELoss sums, so its gradient is divided by the number of
loss terms); nothing is timed if they differ.

glibc's allocator makes the batch-32 numbers swing (AutoMAD's derivative tensors of several MB cross the
dynamic mmap threshold: page faults on every call), so by default the script re-executes itself with
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` pinned (glibc reads them at start-up only);
``--malloc-default`` runs with glibc's defaults instead. Report both. The minor page faults per call of each
candidate are printed. AutoMAD is read from ../shared/peers/automad beside the project, or $MADFUNC_AUTOMAD
(its README: put that folder on sys.path; never copy it into the project); without it the script says so and
exits. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from collections.abc import Callable

# ../shared/peers/automad beside the project (MADFUNC_AUTOMAD overrides it).
AUTOMAD_DIR = os.environ.get("MADFUNC_AUTOMAD") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "peers", "automad")
)
# 32 MiB is the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2); a fixed value also turns off
# the dynamic threshold. The trim threshold keeps freed heap memory instead of returning it to the kernel.
PINNED = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(512 * 2**20)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per batch size (default 21)")
    parser.add_argument("--quick", action="store_true", help="7 rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the madfunc / AutoMAD rows as JSON to PATH")
    parser.add_argument("--malloc-default", action="store_true",
                        help=f"run with glibc's allocator defaults instead of pinning {', '.join(PINNED)}")
    return parser.parse_args()


def ensure_malloc_env(default: bool) -> None:
    """Re-execute this script when the malloc variables in the environment are not the ones asked for."""
    wanted = {name: None for name in PINNED} if default else PINNED
    if all(os.environ.get(name) == value for name, value in wanted.items()):
        return
    env = {k: v for k, v in os.environ.items() if k not in PINNED}
    env.update({k: v for k, v in wanted.items() if v is not None})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)


args = parse_args()
ensure_malloc_env(args.malloc_default)  # before torch is imported: nothing heavy has run yet

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
from run import timeit  # noqa: E402

import madfunc as mf  # noqa: E402


def load_automad():
    if not os.path.isdir(AUTOMAD_DIR):
        print(f"AutoMAD not found at {AUTOMAD_DIR}: nothing to compare against, skipping.")
        sys.exit(0)
    sys.path.insert(0, AUTOMAD_DIR)
    import automad

    return automad


class AutoMADNet(torch.nn.Module):
    """The test CNN from AutoMAD's layers, exact forward mode, weights copied from a params tuple."""

    def __init__(self, automad, params: tuple) -> None:
        super().__init__()
        self.am = automad
        self.conv1 = automad.Conv2d(3, 4, 3, mode="jacobian")
        self.tanh = automad.Tanh()
        self.conv2 = automad.Conv2d(4, 5, 3, mode="jacobian")
        self.relu = automad.ReLU()
        self.avg = automad.AvgPool2d(2)
        self.max = automad.MaxPool2d(2)
        self.linear = automad.Linear(45, 7, mode="jacobian")
        self.loss = automad.MSELoss()
        self.f2r = automad.Fwd2Rev()
        for i, layer in enumerate((self.conv1, self.conv2, self.linear)):
            layer.weight = torch.nn.Parameter(params[2 * i].clone())
            layer.bias = torch.nn.Parameter(params[2 * i + 1].clone())
        self.weights = [p for layer in (self.conv1, self.conv2, self.linear) for p in (layer.weight, layer.bias)]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv2(self.tanh(self.conv1(x))))
        h = self.am.flatten(self.max(self.avg(h)), 1)
        return self.f2r(self.loss(self.linear(h), y))

    def grad(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """The gradient of the summed squared error (AutoMAD's MSELoss), as autograd delivers it to the weights."""
        return torch.autograd.grad(self(x, y), self.weights)


def check_gradients(automad, params: tuple, madfunc_step: Callable, batch: int) -> float:
    x, y = models.cnn_data(batch)
    reference = torch.func.grad(models.cnn_loss)(params, x, y)
    terms = y.numel()  # F.mse_loss averages over the batch*7 terms that AutoMAD's MSELoss sums
    automad_grad = [g / terms for g in AutoMADNet(automad, params).grad(x, y)]
    scale = max(g.abs().max().item() for g in reference)
    worst = 0.0
    for name, grads in (("AutoMAD", automad_grad), ("madfunc", madfunc_step(params, x, y))):
        diff = max((a - b).abs().max().item() for a, b in zip(grads, reference, strict=True))
        print(f"gradient check b{batch}: {name:<8} vs torch.func.grad  max abs diff {diff:.2e} "
              f"(largest gradient entry {scale:.2e})")
        worst = max(worst, diff / max(scale, 1.0))
    return worst


def page_faults(fn: Callable[[], object], calls: int = 5) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def print_row(target: str, what: str, ours: list[float], ref: list[float], ref_name: str) -> float:
    ratio = statistics.median(a / b for a, b in zip(ours, ref, strict=True))
    print(f"{target:<7} {what:<44} {statistics.median(ours) * 1e3:8.2f} ms vs {statistics.median(ref) * 1e3:8.2f} ms"
          f" ({ref_name:<8})  ratio {ratio:6.3f}", flush=True)
    return ratio


def main() -> None:
    torch.set_num_threads(args.threads)
    rounds, warmup = (7, 2) if args.quick else (args.rounds, 3)
    automad = load_automad()
    pinned = "glibc defaults" if args.malloc_default else " ".join(f"{k}={os.environ[k]}" for k in PINNED)
    print(f"madfunc vs AutoMAD, test CNN, exact forward mode: {args.threads} threads, {rounds} rounds, "
          f"torch {torch.__version__}, malloc: {pinned}, load average {os.getloadavg()[0]:.2f}", flush=True)
    params = models.cnn_params()
    madfunc_step = mf.mixed_grad(models.whole_cnn_loss, plan={"cnn": mf.Exact()})
    backprop_step = torch.func.grad(models.cnn_loss)
    worst = max(check_gradients(automad, params, madfunc_step, batch) for batch in (2, 32))
    if worst > 1e-5:
        print(f"gradients differ (relative max abs diff {worst:.2e} > 1e-5): not timing.")
        sys.exit(1)
    net = AutoMADNet(automad, params)
    rows = []
    for batch in (2, 32):
        x, y = models.cnn_data(batch)
        candidates = {"madfunc": lambda x=x, y=y: madfunc_step(params, x, y),
                      "AutoMAD": lambda x=x, y=y: net.grad(x, y),
                      "backprop": lambda x=x, y=y: backprop_step(params, x, y)}
        t = timeit(candidates, rounds, warmup)
        faults = {name: page_faults(fn) for name, fn in candidates.items()}
        ratio = print_row(f"1 (b{batch})", f"Exact() CNN b{batch}, madfunc / AutoMAD", t["madfunc"], t["AutoMAD"],
                          "AutoMAD")
        rows.append(dict(batch=batch, ratio=ratio, ours_ms=statistics.median(t["madfunc"]) * 1e3,
                         reference_ms=statistics.median(t["AutoMAD"]) * 1e3))
        print_row(f"  (b{batch})", "AutoMAD / backprop", t["AutoMAD"], t["backprop"], "backprop")
        print_row(f"  (b{batch})", "madfunc / backprop", t["madfunc"], t["backprop"], "backprop")
        print("        minor page faults per call: " + ", ".join(f"{k} {v:.0f}" for k, v in faults.items()))
    print(f"load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(malloc=pinned, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
