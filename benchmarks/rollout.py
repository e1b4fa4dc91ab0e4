"""A long rollout with few parameters: a learned-coefficient reaction-diffusion solver (issue 18's third model).

The model (importable: ``from rollout import rollout, rollout_loss, rollout_params, rollout_data, ROLLOUT``):
``rollout(params, x0, steps)`` integrates ``dx/dt = a*lap(x) + b*tanh(c*x + d) - e*x + f*sin(g*x) + h`` by
explicit Euler on a 256x16 state (256 independent rings of 16 cells, periodic Laplacian by ``roll``), with 8
learned scalar coefficients. 1,500 steps are about 19k tensor ops; the parameters are 8 scalars, so ``Exact``
pushes 8 tangents, while ``Reverse`` keeps every step's activations.

As a script: ``python benchmarks/rollout.py [--steps 1500] [--threads 1] [--rounds 3]`` measures, each in a
fresh child process (allocator pinned with ``MALLOC_ARENA_MAX=1``, so that RSS means the same in each): the
``Exact`` segment's first call (eager), its second call (which records the replay graph), its third (replayed)
and the ``Reverse`` plan; time (median over rounds, the cases interleaved within each round) and memory (peak
RSS during the call and RSS after it, both above the RSS before it, each read after ``malloc_trim``; and the
peak of live tensor bytes of one more call, ``mf.measure_peak``). Then ratios. ``--interleaved ROUNDS`` times
only Exact's steady state against Reverse, alternating in one process (the ratio to trust on a loaded machine).
Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import madfunc as mf

__all__ = ["ROLLOUT", "rollout", "rollout_data", "rollout_loss", "rollout_params"]

DT = 0.01


def rollout(params: torch.Tensor, x0: torch.Tensor, steps: int = 1500) -> torch.Tensor:
    """The state after ``steps`` explicit Euler steps of a reaction-diffusion system with coefficients ``params``.

    Args:
        params: 8 scalars ``(a, b, c, d, e, f, g, h)``, a tensor of shape ``(8,)``.
        x0: the initial state, ``(rings, cells)`` (256x16 in the benchmark); each row is a periodic ring.
        steps: the number of Euler steps (``dt = 0.01``). Default: 1500.

    Returns:
        The final state, the shape of ``x0``.

    Examples:
        >>> p, x0, _ = rollout_data(rings=4, cells=5)
        >>> rollout(p, x0, steps=3).shape
        torch.Size([4, 5])
    """
    a, b, c, d, e, f, g, h = params.unbind()
    x = x0
    for _ in range(steps):
        lap = x.roll(1, -1) + x.roll(-1, -1) - 2 * x
        force = a * lap + b * torch.tanh(c * x + d) - e * x + f * torch.sin(g * x) + h
        x = torch.add(x, force, alpha=DT)
    return x


# The rollout as one forward segment (its name in plans: "rollout").
ROLLOUT = mf.fwd(rollout, name="rollout")


def rollout_loss(params: torch.Tensor, x0: torch.Tensor, target: torch.Tensor, steps: int = 1500) -> torch.Tensor:
    """Mean squared error of the segmented rollout's final state against ``target`` (differentiate in ``params``).

    Examples:
        >>> p, x0, target = rollout_data(rings=4, cells=5)
        >>> g = mf.mixed_grad(rollout_loss, {"rollout": mf.Exact()})
        >>> g(p, x0, target, 3).shape
        torch.Size([8])
    """
    return F.mse_loss(ROLLOUT(params, x0, steps), target)


def rollout_params(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Coefficients of a stable, non-trivial system (diffusion, a tanh reaction, damping, a sine forcing)."""
    return torch.tensor([0.5, 0.8, 1.2, 0.1, 0.6, 0.3, 2.0, 0.05], dtype=dtype)


def rollout_data(rings: int = 256, cells: int = 16, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(params, x0, target)``: the coefficients, a random initial state and a random target."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(rings, cells, generator=gen, dtype=dtype)
    return rollout_params(dtype), x0, 0.1 * torch.randn(rings, cells, generator=gen, dtype=dtype)


# -- the measurement -------------------------------------------------------------------------------------
CASES = ("eager", "recording", "replayed", "reverse")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(case: str, steps: int, threads: int, limit: int | None) -> dict:
    """One case in this (fresh) process: calls up to the measured one, which is timed and sampled for RSS; then,
    but for the recording, one more call of the same kind under ``mf.measure_peak`` (live tensor bytes)."""
    import ctypes
    import threading
    import time

    from madfunc.engine import replay

    torch.set_num_threads(threads)
    if limit is not None:
        replay.MAX_RECORDED_CALLS = limit
    p, x0, target = rollout_data()
    strategy = mf.Reverse() if case == "reverse" else mf.Exact()
    g = mf.mixed_grad(rollout_loss, {"rollout": strategy})
    for _ in range({"eager": 0, "recording": 1, "replayed": 2, "reverse": 1}[case]):  # reverse: warmed once
        g(p, x0, target, steps)
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    trim(0)  # what earlier calls freed goes back: the peak is this call's
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # ru_maxrss is the process's lifetime peak: sample RSS instead
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    g(p, x0, target, steps)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss())
    import gc

    gc.collect()
    trim(0)  # freed memory that the allocator kept would count as resident
    resident = _rss()
    refused = replay.REFUSED.get("rollout")
    state = "replayed" if replay.replayed("rollout") else f"eager ({refused})" if refused else "eager"
    tensor_mb = float("nan")
    if case != "recording":
        if case == "eager":
            replay.RECORD_AFTER = 10**9  # (the measured call stays eager)
        with mf.measure_peak() as meter:
            g(p, x0, target, steps)
        tensor_mb = meter.peak_bytes / 2**20
    return {"case": case, "seconds": seconds, "peak_mb": (peak[0] - before) / 2**20,
            "resident_mb": (resident - before) / 2**20, "tensor_mb": tensor_mb, "state": state}


def _interleaved(steps: int, threads: int, rounds: int, limit: int | None) -> dict:
    """Steady-state time of Exact's calls (after its first two) against Reverse's, alternating in one process
    (the order alternates between rounds): the median of per-round ratios cancels the load of other processes."""
    import time

    from madfunc.engine import replay

    torch.set_num_threads(threads)
    if limit is not None:
        replay.MAX_RECORDED_CALLS = limit
    p, x0, target = rollout_data()
    grads = {name: mf.mixed_grad(rollout_loss, {"rollout": s}) for name, s in (("exact", mf.Exact()),
                                                                            ("reverse", mf.Reverse()))}
    for name, g in grads.items():
        for _ in range(2 if name == "exact" else 1):
            g(p, x0, target, steps)
    times: dict[str, list[float]] = {"exact": [], "reverse": []}
    for r in range(rounds):
        for name in ("exact", "reverse") if r % 2 == 0 else ("reverse", "exact"):
            start = time.perf_counter()
            grads[name](p, x0, target, steps)
            times[name].append(time.perf_counter() - start)
    ratios = [e / r for e, r in zip(times["exact"], times["reverse"], strict=True)]
    return {"exact": statistics.median(times["exact"]), "reverse": statistics.median(times["reverse"]),
            "ratio": statistics.median(ratios), "replayed": bool(replay.replayed("rollout"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record-limit", type=int, default=None,
                        help="replay.MAX_RECORDED_CALLS for the run (to measure a recording above the default limit)")
    parser.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                        help="only time Exact's steady state against Reverse, alternating in one process")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.threads, args.record_limit)))
        return
    if args.interleaved:
        out = _interleaved(args.steps, args.threads, args.interleaved, args.record_limit)
        print(f"rollout: {args.steps} steps, {args.threads} thread(s), {args.interleaved} interleaved rounds; Exact "
              f"({'replayed' if out['replayed'] else 'eager'}) {out['exact']:.3f} s, Reverse {out['reverse']:.3f} s "
              f"(medians); Exact / Reverse, median of per-round ratios: {out['ratio']:.2f}")
        return
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OMP_NUM_THREADS=str(args.threads))
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    for r in range(args.rounds):
        for case in CASES if r % 2 == 0 else tuple(reversed(CASES)):  # the order alternates between rounds
            limit = [] if args.record_limit is None else ["--record-limit", str(args.record_limit)]
            out = subprocess.run([sys.executable, __file__, "--child", case, "--steps", str(args.steps),
                                  "--threads", str(args.threads), *limit], env=env, capture_output=True, text=True,
                                 check=True)
            runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ("seconds", "peak_mb", "resident_mb", "tensor_mb")
    med = {c: {k: statistics.median(r[k] for r in runs[c]) for k in keys} for c in CASES}
    print(f"rollout: {args.steps} steps, state 256x16, 8 parameters; {args.threads} thread(s), "
          f"{args.rounds} rounds, medians; memory above the RSS before the call (MALLOC_ARENA_MAX=1)")
    print(f"{'call':<12}{'time s':>10}{'RSS peak MB':>13}{'resident MB':>13}{'tensor peak MB':>16}")
    for c in CASES:
        m = med[c]
        print(f"{c:<12}{m['seconds']:>10.3f}{m['peak_mb']:>13.1f}{m['resident_mb']:>13.1f}{m['tensor_mb']:>16.2f}")
    e, rev = med["eager"], med["reverse"]
    print(f"recording / eager time: {med['recording']['seconds'] / e['seconds']:.2f}")
    print(f"third call / reverse time: {med['replayed']['seconds'] / rev['seconds']:.2f}; "
          f"eager / reverse time: {e['seconds'] / rev['seconds']:.2f}")
    print(f"third call / reverse, tensor peak: {med['replayed']['tensor_mb'] / rev['tensor_mb']:.3f}; RSS peak: "
          f"{med['replayed']['peak_mb'] / max(rev['peak_mb'], 1e-3):.2f}")
    print(f"third call: {runs['replayed'][0]['state']}")


if __name__ == "__main__":
    main()
