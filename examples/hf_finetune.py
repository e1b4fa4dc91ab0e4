"""Fine-tune a small causal LM from transformers with forward gradients on its decoder layers.

    python examples/hf_finetune.py              # about 75 s on 2 CPU cores; --help lists the options
    python examples/hf_finetune.py --smoke      # about 25 s, most of it starting Python 4 times

The model is a transformers causal LM built from a tiny config with random weights (nothing is downloaded),
at the library's defaults otherwise (KV cache on, dropout as configured, SDPA attention). The text is the
source of a few standard-library modules that ship with Python, tokenized byte-level (256 byte values plus
<bos>/<eos>), cut into fixed-length chunks for next-token prediction; the last 10% of each file is held out.

The decoder layers are marked as segments by module path, without editing the model:

    mf.mark_segments(model, {"model.layers.*": "fwd"})             # GPT-2: "transformer.h.*"
    with mf.use_plan({"model.layers.*": mf.Random(k=K)}):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()                                             # layers: forward gradients
    opt.step()                                                      # embeddings, head: backprop

Three methods, each in a child process of its own, from the same initial weights on the same batches:
"forward" (the plan above), "backprop" (plain autograd) and a control, "frozen": the parameters whose
gradients the forward run estimates (the layers, and the embeddings below them, whose cotangent is the
layers' estimate) stay fixed and the rest is trained by backprop, which shows what the forward run would
reach if its estimates taught nothing. Peak memory is read in a second, shorter child per method with
glibc's allocator pinned (pinned, steps run 2-2.5x slower here, so those runs are not the timed ones).

What to expect at the defaults (Llama, 2 layers of width 64, 200 steps of 16 x 64 tokens, k = 4; torch 2.13
on 2 shared CPU cores; losses are reproducible, times vary with the machine's load):

    method            held-out loss (start 5.55)   ms/step   peak MB (20 steps)
    fwd Random(k=4)   2.55                           91       46  (60 ms, 48 MB with --no-cache)
    backprop          2.17                           17       22
    control (frozen)  2.55                            9        7

The forward run's loss falls as far as the control's and no further: all of its progress comes from the LM
head and final norm, trained by backprop. With k = 4 the layers' forward gradients have a cosine of
0.002-0.007 with the true gradient (printed at the end of the run): each layer differentiates ~66k parameters
plus its ~66k input activations (relative variance (n + 1) / k), and each layer's input cotangent is the next
one's estimate, so the noise compounds down the stack. Expected progress per step is roughly k / n of
backprop's (SGD at its best step size), invisible in 200 steps. Hence the small default --fwd-lr (1e-4) on
those parameters: with AdamW, which scales each coordinate's noise to the learning rate, larger rates made the
loss worse (held-out at step 200: 3.07 with 3e-3 everywhere, rising after step 100; 2.62 with 1e-3 on the
layers and 3e-4 on the embeddings); k = 16 gave 2.54 at about 4x the time. At this depth the forward run's
peak memory is above backprop's (it keeps no activations inside a layer, but pushes k tangents at once through
each); it grows about half as fast with depth: at 8 layers, 71 MB against backprop's 67 MB (--no-cache). With
the KV cache on (transformers' default, also in training), each marked layer runs its body once more as plain
code to leave the cache as a plain call would, which costs the time difference above (pass --no-cache, i.e.
use_cache=False, when training does not need the cache).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parent process never imports torch: each method runs in a child
    import torch

    import madfunc as mf

# Text that ships with every CPython: the source of these standard-library modules (missing ones are skipped).
MODULES = ("argparse", "textwrap", "difflib", "functools", "dataclasses", "statistics", "random", "shlex",
           "heapq", "fractions", "calendar", "csv")
BOS, EOS = 256, 257  # byte-level tokens: 0..255 are bytes
VOCAB = 258
HELD_OUT = 0.1  # the last 10% of each file

# glibc's allocator, pinned in the children whose peak memory is read (benchmarks/run.py pins the mmap threshold
# the same way): by default glibc raises its mmap threshold to the largest block freed so far, after which large
# freed tensors stay in the process heap and the peak RSS depends on the order of earlier frees, not on what is
# alive. Pinned, blocks from 64 KiB up are mapped and unmapped on their own, and the heap's free top is returned
# above 128 KiB.
MALLOC_PINNED = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}

RESULT = "HF_FINETUNE_RESULT "  # a child's last stdout line: this prefix and its JSON

METHODS = ("forward", "backprop", "frozen")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags and options whose default the help text explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fine-tune a tiny transformers causal LM (random init, byte-level tokens, standard-library "
        "source as text) with forward gradients on its decoder layers and backprop elsewhere, and compare with "
        "plain backprop: loss, time per step, peak memory.",
        formatter_class=_Help,
    )
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=("llama", "gpt2"), default="llama",
                   help="transformers model: LlamaForCausalLM (layers 'model.layers.*') or GPT2LMHeadModel "
                   "('transformer.h.*', dropout 0.1 and tied embeddings by default)")
    m.add_argument("--layers", type=int, default=2, help="decoder layers")
    m.add_argument("--width", type=int, default=64, help="hidden size")
    m.add_argument("--heads", type=int, default=4, help="attention heads")
    m.add_argument("--no-cache", action="store_true",
                   help="train with use_cache=False (by default transformers builds a KV cache in every forward "
                   "call, training included, and the marked layers append to it)")
    d = p.add_argument_group("data")
    d.add_argument("--seq-len", type=int, default=64, help="tokens per chunk (next-token prediction within a chunk)")
    d.add_argument("--batch", type=int, default=16, help="chunks per step")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=200, help="optimizer steps per method")
    t.add_argument("--lr", type=float, default=3e-3,
                   help="AdamW learning rate: every parameter of the backprop run, and those that get exact "
                   "gradients in the others (LM head, final norm; GPT-2's tied token embeddings)")
    t.add_argument("--fwd-lr", type=float, default=None,
                   help="AdamW learning rate of the parameters that get forward-gradient estimates in the forward "
                   "run: the decoder layers and the embeddings below them (their cotangent is the layers' "
                   "estimate). Default: 1e-4 for --strategy random (noisy: larger rates make the loss worse), "
                   "--lr for exact")
    t.add_argument("--strategy", choices=("random", "exact"), default="random",
                   help="how the decoder layers are differentiated in the forward run: 'random' (forward "
                   "gradients, mf.Random(k)) or 'exact' (exact forward mode: one tangent per parameter and "
                   "activation, thousands of passes per step; only for tiny models)")
    t.add_argument("--k", type=int, default=4, help="tangents per forward gradient (mf.Random(k=K))")
    t.add_argument("--distribution", choices=("gaussian", "rademacher"), default="gaussian",
                   help="distribution of Random's tangents")
    t.add_argument("--chunk-size", type=int, default=256, help="tangents pushed at once by --strategy exact")
    t.add_argument("--methods", default=None,
                   help="comma-separated methods to run, each in its own process: 'forward' (the plan above), "
                   "'backprop' (plain autograd), 'frozen' (a control: the parameters the forward run estimates are "
                   "frozen, the rest trained by backprop, i.e. what the forward run gives if its estimates teach "
                   "nothing). Default: all three; with --smoke, forward,backprop")
    t.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the batches and the tangents")
    t.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (train and held-out loss)")
    t.add_argument("--eval-chunks", type=int, default=64, help="chunks per evaluation (each split)")
    t.add_argument("--memory-steps", type=int, default=20,
                   help="steps of each method's peak-memory run, a child process of its own with glibc's allocator "
                   "pinned (0: none)")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--smoke", action="store_true",
                   help="a quick check (seconds per method), overriding the sizes: 1 layer, width 16, 2 heads, "
                   "5 steps, sequence 16, batch 4, k 2")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)  # internal: its peak-memory run
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.width, args.heads, args.steps = 1, 16, 2, 5
        args.seq_len, args.batch, args.k, args.eval_every, args.eval_chunks = 16, 4, 2, 5, 8
    if args.fwd_lr is None:
        args.fwd_lr = 1e-4 if args.strategy == "random" else args.lr
    if args.methods is None:
        args.methods = "forward,backprop" if args.smoke else ",".join(METHODS)
    args.method_list = [s.strip() for s in args.methods.split(",") if s.strip()]
    bad = [s for s in args.method_list if s not in METHODS]
    if bad or not args.method_list:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    for name in ("layers", "width", "heads", "seq_len", "batch", "steps", "k", "chunk_size", "eval_every",
                 "eval_chunks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.memory_steps < 0:
        p.error("--memory-steps must be at least 0")
    if args.width % args.heads:
        p.error("--width must be a multiple of --heads")
    return args


# -- data -------------------------------------------------------------------------------------------------


def load_text() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Byte-level token streams (train, held-out) from the source of MODULES; each file is <bos> bytes <eos>."""
    import torch

    train, held, used = [], [], []
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not (spec.origin or "").endswith(".py") or not os.path.isfile(spec.origin):
            continue  # e.g. a distribution that ships bytecode only
        with open(spec.origin, "rb") as f:
            data = f.read()
        tokens = torch.tensor([BOS, *data, EOS], dtype=torch.long)
        cut = int(len(tokens) * (1 - HELD_OUT))
        train.append(tokens[:cut])
        held.append(tokens[cut:])
        used.append(name)
    if not used:
        raise SystemExit("hf_finetune: found none of the standard-library sources " + ", ".join(MODULES))
    return torch.cat(train), torch.cat(held), used


def fixed_chunks(stream: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """Up to ``count`` chunks of ``seq_len`` tokens, evenly spaced over the stream (the evaluation set)."""
    import torch

    starts = torch.linspace(0, len(stream) - seq_len - 1, count).long().unique()
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


# -- model ------------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str, tuple[str, ...]]:
    """The model (weights drawn from torch's seeded generator), the module pattern of its decoder layers, and
    the parameters upstream of them whose gradient flows only through them (in the forward run, estimates)."""
    try:
        import transformers
    except ImportError:
        raise SystemExit("hf_finetune: needs transformers (pip install transformers)") from None
    transformers.logging.set_verbosity_error()  # no notes about the tiny config's choices
    if args.arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=args.width, intermediate_size=4 * args.width,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
            max_position_embeddings=args.seq_len, bos_token_id=BOS, eos_token_id=EOS)
        return transformers.LlamaForCausalLM(config), "model.layers.*", ("model.embed_tokens.weight",)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=args.width, n_layer=args.layers, n_head=args.heads, n_positions=args.seq_len,
        bos_token_id=BOS, eos_token_id=EOS)
    # The token embeddings are tied to the LM head (an exact gradient from there too); positions are not.
    return transformers.GPT2LMHeadModel(config), "transformer.h.*", ("transformer.wpe.weight",)


def layer_strategy(args: argparse.Namespace) -> mf.Strategy:
    import madfunc as mf

    if args.strategy == "exact":
        return mf.Exact(chunk_size=args.chunk_size)
    return mf.Random(k=args.k, distribution=args.distribution)


# -- one method, in a child process -----------------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the high-water mark is the closest we have
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """This process's resident-memory high-water mark (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def evaluate(model: torch.nn.Module, chunks: torch.Tensor, batch: int) -> float:
    """Mean next-token loss (nats per token) over ``chunks``, in eval mode (no dropout), plain autograd off."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(chunks), batch):
            x = chunks[i : i + batch]
            total += model(input_ids=x, labels=x, use_cache=False).loss.item() * len(x)
            count += len(x)
    model.train(was_training)
    return total / count


def run_method(args: argparse.Namespace, method: str, memory: bool = False) -> dict:
    """Train one method from the seeded initial weights on the seeded batches.

    Returns the loss curve, the median step time and the layers' gradient cosines; with ``memory``, only
    the peak memory over the first ``--memory-steps`` steps (no evaluations, no progress bar).
    """
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    train_stream, held_stream, used = load_text()
    if len(held_stream) <= args.seq_len:
        raise SystemExit(f"hf_finetune: --seq-len {args.seq_len} is longer than the held-out text")
    train_eval = fixed_chunks(train_stream, args.seq_len, args.eval_chunks)
    held_eval = fixed_chunks(held_stream, args.seq_len, args.eval_chunks)

    torch.manual_seed(args.seed)  # the same initial weights in every method's process
    model, pattern, upstream = build_model(args)
    model.train()
    layers = {n for n, _ in model.named_parameters() if n.startswith(pattern.rstrip("*"))}
    # In the forward run, these get forward-gradient estimates: the layers' own, and the embeddings' (backprop of
    # the layers' estimated input cotangent). They train at --fwd-lr; the control freezes them instead.
    estimated = layers | set(upstream)
    plan = None
    if method == "forward":
        import madfunc as mf  # only here: the other methods' processes run plain PyTorch

        mf.mark_segments(model, {pattern: "fwd"})  # state_dict keys unchanged; segments "model.layers.0", ...
        plan = {pattern: layer_strategy(args)}
    elif method == "frozen":
        for n, p in model.named_parameters():
            p.requires_grad_(n not in estimated)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in estimated], "lr": args.fwd_lr if plan else args.lr},
              {"params": [p for n, p in named if n not in estimated], "lr": args.lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr)
    cache = {"use_cache": False} if args.no_cache else {}  # default: transformers' (a DynamicCache per call)
    batches = torch.Generator().manual_seed(args.seed + 1)  # the same batches in every method's process
    high = len(train_stream) - args.seq_len
    steps = min(args.memory_steps, args.steps) if memory else args.steps

    # Also in the memory run: the forward code paths warmed up (lazy tables, kernels) before the RSS is read.
    curve = [(0, evaluate(model, train_eval, args.batch), evaluate(model, held_eval, args.batch))]
    bar = Progress(args, method) if not memory else None
    times, running = [], None
    start_rss, earlier_peak = rss_bytes(), max_rss_bytes()
    for step in range(1, steps + 1):
        starts = torch.randint(0, high, (args.batch,), generator=batches)
        x = torch.stack([train_stream[s : s + args.seq_len] for s in starts.tolist()])
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if plan is None:
            loss = model(input_ids=x, labels=x, **cache).loss
            loss.backward()
        else:
            with mf.use_plan(plan):
                loss = model(input_ids=x, labels=x, **cache).loss
                loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if memory:
            continue
        value = loss.item()
        if not math.isfinite(value):
            raise SystemExit(f"hf_finetune: {method}: the loss is {value} at step {step}; lower --lr/--fwd-lr")
        running = value if running is None else 0.9 * running + 0.1 * value
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, train_eval, args.batch), evaluate(model, held_eval, args.batch)))
        bar.update(running, curve[-1][2])
    if memory:
        peak = max_rss_bytes()
        return dict(method=method, steps=steps, peak_mb=(peak - start_rss) / 2**20,
                    earlier_peak_mb=(earlier_peak - start_rss) / 2**20)
    bar.close()
    cosines = gradient_cosines(args, model, plan, pattern, layers, train_stream) if plan else None
    return dict(method=method, plan=str(mf.Plan(plan)) if plan else None, modules=used,
                train_tokens=len(train_stream), held_tokens=len(held_stream),
                params=sum(p.numel() for p in model.parameters()),
                layer_params=sum(p.numel() for n, p in model.named_parameters() if n in layers),
                estimated_params=sum(p.numel() for n, p in model.named_parameters() if n in estimated),
                curve=curve, step_s=statistics.median(times), threads=torch.get_num_threads(), cosines=cosines)


def gradient_cosines(args: argparse.Namespace, model: torch.nn.Module, plan: dict, pattern: str,
                     layers: set[str], stream: torch.Tensor, draws: int = 4) -> dict[str, float]:
    """Per decoder layer: the cosine between the plan's gradient and backprop's, mean over ``draws`` draws.

    On one training batch, in eval mode (no dropout, so both see the same function), at the final weights;
    tangents from a generator of their own, torch's RNG left as it was.
    """
    import torch

    import madfunc as mf

    starts = torch.randint(0, len(stream) - args.seq_len, (args.batch,),
                           generator=torch.Generator().manual_seed(args.seed + 2))
    x = torch.stack([stream[s : s + args.seq_len] for s in starts.tolist()])
    params = {n: p for n, p in model.named_parameters() if n in layers}
    base = pattern.rstrip("*")  # "model.layers."
    segments = list(dict.fromkeys(base + n[len(base) :].split(".")[0] for n in params))  # "model.layers.0", ...
    model.eval()

    def grads(**kw: object) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if kw:
            with mf.use_plan(plan, **kw):
                model(input_ids=x, labels=x, use_cache=False).loss.backward()
        else:
            model(input_ids=x, labels=x, use_cache=False).loss.backward()
        return {n: p.grad.detach().clone() for n, p in params.items()}

    exact = grads()
    tangents = torch.Generator().manual_seed(args.seed + 3)
    sums: dict[str, float] = {}
    for _ in range(draws):
        estimate = grads(generator=tangents)
        for layer in segments:
            names = [n for n in params if n.startswith(layer + ".")]
            a = torch.cat([estimate[n].flatten() for n in names])
            b = torch.cat([exact[n].flatten() for n in names])
            sums[layer] = sums.get(layer, 0.0) + torch.cosine_similarity(a, b, dim=0).item() / draws
    model.zero_grad(set_to_none=True)
    model.train()
    return sums


class Progress:
    """A tqdm bar with the running training loss and the last held-out loss (plain lines without tqdm)."""

    def __init__(self, args: argparse.Namespace, method: str) -> None:
        self.bar, self.step, self.total, self.method = None, 0, args.steps, method
        self.every = max(1, args.steps // 10)
        if args.no_progress:
            self.every = 0
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=args.steps, desc=f"{method:>8}", unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, loss: float, held: float) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", held_out=f"{held:.3f}", refresh=False)
            self.bar.update(1)
        elif self.every and (self.step % self.every == 0 or self.step == self.total):
            print(f"{self.method}: step {self.step}/{self.total}  loss {loss:.3f}  held-out {held:.3f}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the parent: one child per method, then the table -----------------------------------------------------


def run_child(method: str, argv: list[str], memory: bool) -> dict:
    """Run one method in a child process: training (its own environment) or, with ``memory``, the peak-memory
    run (glibc's allocator pinned, which makes steps slower, so it is not the run that is timed)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", method]
    env = dict(os.environ)
    if memory:
        cmd.append("--child-memory")
        env.update(MALLOC_PINNED)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if out.returncode != 0:
        sys.stdout.write(out.stdout)
        what = "peak-memory run" if memory else "run"
        raise SystemExit(f"hf_finetune: the {method} {what} failed (exit status {out.returncode})")
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT) :])


def describe(args: argparse.Namespace, method: str) -> str:
    if method == "backprop":
        return "backprop"
    if method == "frozen":
        return "control (frozen)"
    if args.strategy == "exact":
        return "fwd exact"
    return f"fwd Random(k={args.k})"


def report(args: argparse.Namespace, results: list[dict]) -> None:
    first = results[0]
    print(f"\n{args.arch}: {args.layers} layers, width {args.width}, {first['params']:,} parameters "
          f"({first['layer_params']:,} in the decoder layers); {first['train_tokens']:,} train / "
          f"{first['held_tokens']:,} held-out byte tokens from {', '.join(first['modules'])}; "
          f"{args.steps} steps of {args.batch}x{args.seq_len} tokens, {first['threads']} torch threads")
    for r in results:
        if r["plan"]:
            print(f"forward run: plan {r['plan']}; AdamW lr {args.fwd_lr:g} on the estimated parameters "
                  f"({r['estimated_params']:,}), {args.lr:g} on the rest")
            cos = ", ".join(f"{name} {c:+.3f}" for name, c in r["cosines"].items())
            print(f"  cosine of its layer gradients with backprop's (mean of 4 draws, final weights): {cos}")
    if any(r["method"] == "frozen" for r in results):
        print("control: those estimated parameters frozen, the rest trained by backprop at the same lr")
    for r in results:
        curve = "  ".join(f"{s}:{h:.3f}" for s, _, h in r["curve"])
        print(f"held-out loss by step, {describe(args, r['method'])}:  {curve}")
    print(f"\nloss: mean next-token cross-entropy (nats/token) over {args.eval_chunks} fixed chunks per split, eval "
          f"mode; uniform guessing is ln({VOCAB}) = {math.log(VOCAB):.2f}")
    print("ms/step: median wall time of a training step (forward, backward, AdamW step), evaluations excluded")
    if args.memory_steps:
        print(f"peak MB: in a separate run of the first {min(args.memory_steps, args.steps)} steps, the process's "
              "RSS high-water mark (getrusage ru_maxrss) minus its RSS just before the first step, with glibc's "
              "allocator pinned (" + " ".join(f"{k}={v}" for k, v in MALLOC_PINNED.items()) + ")")
    head = (f"{'method':<20} {'train start':>11} {'train end':>9} {'held-out start':>14} {'held-out end':>12} "
            f"{'ms/step (median)':>16} {'peak MB':>8}")
    print("\n" + head)
    print("-" * len(head))
    for r in results:
        (_, tr0, he0), (_, tr1, he1) = r["curve"][0], r["curve"][-1]
        peak = f"{r['memory']['peak_mb']:>8.1f}" if "memory" in r else f"{'-':>8}"
        print(f"{describe(args, r['method']):<20} {tr0:>11.3f} {tr1:>9.3f} {he0:>14.3f} {he1:>12.3f} "
              f"{1000 * r['step_s']:>16.1f} {peak}")
    for r in results:
        if "memory" in r and r["memory"]["earlier_peak_mb"] >= r["memory"]["peak_mb"]:
            print(f"note: {r['method']}: the process's peak came before training (data, model), so its figure "
                  "is an upper bound")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(RESULT + json.dumps(run_method(args, args.child, args.child_memory)), flush=True)
        return
    results = [run_child(method, argv, memory=False) for method in args.method_list]
    if args.memory_steps:
        steps = min(args.memory_steps, args.steps)
        print(f"peak memory: {', '.join(args.method_list)}, {steps} steps each, allocator pinned...", file=sys.stderr,
              flush=True)
        for r in results:
            r["memory"] = run_child(r["method"], argv, memory=True)
    report(args, results)


if __name__ == "__main__":
    main()
