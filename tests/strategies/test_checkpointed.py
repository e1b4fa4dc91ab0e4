"""What is particular to Checkpointed (its generic properties are in test_base.py, over tests/support/strategies.py):
exactness against Reverse in every transform and composed with forward segments, the same random draws in
the recomputation, side effects once (Python objects, module buffers, a KV cache), what it keeps for backward,
the string form and clear errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import madfunc as mf
from madfunc.engine import context as _context
from madfunc.plan import parse_strategy

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _dropped(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A body with dropout and a random draw of its own: its gradient depends on the masks."""
    return F.dropout(torch.tanh(h @ w), 0.4, training=True) + 0.1 * torch.randn_like(h) * h


A = mf.rev(_dropped, name="a")
B = mf.fwd(lambda w, h: torch.sin(h @ w), name="b")
C = mf.fwd(lambda w, h: torch.tanh(h) @ w, name="c")
SEGMENTS = {"a": A, "b": B, "c": C}


def _loss(order: tuple[str, ...]):
    def loss(w, x):
        h = x
        for name in order:
            h = SEGMENTS[name](w, h)
        return (h**2).sum()

    return loss


def _seeded(fn, *args, seed: int = 7):
    torch.manual_seed(seed)
    return fn(*args)


@pytest.mark.parametrize("order", list(itertools.permutations("abc")), ids="".join)
@pytest.mark.parametrize("others", ["exact", "random"])
def test_equals_reverse_composed_with_forward_segments_in_any_order(order: tuple[str, ...], others: str) -> None:
    """Same seed, same dropout masks and the same Random tangents: Checkpointed gives Reverse's gradient, and
    with every other segment exact, torch.func.grad's."""
    w, x = _rand(0, 4, 4), _rand(1, 3, 4)
    loss = _loss(order)
    other = mf.Exact() if others == "exact" else mf.Random(2)
    plan = {"b": other, "c": other}
    got = _seeded(mf.mixed_grad(loss, {"a": "ckpt", **plan}), w, x)
    want = _seeded(mf.mixed_grad(loss, {"a": "rev", **plan}), w, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if others == "exact":
        torch.testing.assert_close(got, _seeded(torch.func.grad(loss), w, x), rtol=1e-12, atol=1e-12)
    # the RNG state after the call is a plain call's: the recomputation put back what it redrew
    _seeded(mf.mixed_grad(loss, {"a": "ckpt", **plan}), w, x)
    after = torch.get_rng_state()
    _seeded(mf.mixed_grad(loss, {"a": "rev", **plan}), w, x)
    assert torch.equal(after, torch.get_rng_state())


def test_dropout_reproduced_under_every_transform() -> None:
    """mixed_grad_and_value, use_plan (loss.backward()), vmap over mixed_grad and the traceable engine: the
    gradient and value of Reverse under the same seed (a different mask in the recomputation would change it)."""
    w, x = _rand(0, 4, 4), _rand(1, 3, 4)
    loss = _loss(("a", "a"))
    ref_g, ref_v = _seeded(torch.func.grad_and_value(loss), w, x)
    g, v = _seeded(mf.mixed_grad_and_value(loss, {"a": "ckpt"}), w, x)
    torch.testing.assert_close((g, v), (ref_g, ref_v), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(g, _seeded(torch.func.grad(loss), w, x, seed=8))  # the masks matter
    leaf = w.clone().requires_grad_()
    torch.manual_seed(7)
    with mf.use_plan({"a": "ckpt"}):
        value = loss(leaf, x)
    value.backward()
    torch.testing.assert_close((leaf.grad, value.detach()), (ref_g, ref_v), rtol=1e-12, atol=1e-12)
    xs = torch.stack([x, 2 * x])
    for plan in ("ckpt", "rev"):
        torch.manual_seed(3)
        batched = torch.func.vmap(mf.mixed_grad(loss, {"a": plan}), in_dims=(None, 0), randomness="same")(w, xs)
        if plan == "ckpt":
            first = batched
    torch.testing.assert_close(first, batched, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # Dynamo's own
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace:UserWarning")  # (as in tests/test_compile.py)
def test_traceable_and_compiled_use_plan_match_autograd() -> None:
    """mixed_grad(traceable=True) runs a Checkpointed segment as plain reverse-mode code (documented), and
    use_plan inside torch.compile keeps the eager segment (compiler.disable'd dispatch and backward)."""
    block = mf.rev(lambda w, h: torch.tanh(h @ w), name="block")

    def loss(w, x):
        return (block(w, block(w, x)) ** 2).sum()

    w, x = _rand(0, 5, 5), _rand(1, 4, 5)
    want = torch.func.grad(loss)(w, x)
    torch.testing.assert_close(mf.mixed_grad(loss, {"block": "ckpt"}, traceable=True)(w, x), want)
    leaf = w.clone().requires_grad_()

    @torch.compile(backend="eager")
    def step(p, x):
        with mf.use_plan({"block": "ckpt"}):
            value = loss(p, x)
        value.backward()

    step(leaf, x)
    torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-12)


def test_python_side_effects_happen_once() -> None:
    """A body appending to a list in its closure and to a list it is given: once per call, as a plain call,
    though backward runs the body again; and the recomputation sees the list as the call did."""
    log: list[int] = []

    @mf.rev
    def body(w, h, seen):
        log.append(len(log))
        seen.append(len(log))
        return torch.sin(h * w) * len(log)  # reads the closure's state: the recomputation must see the call's

    w, h = _rand(0, 3), _rand(1, 3)
    seen: list[int] = []
    got = mf.mixed_grad(lambda w, h: body(w, h, seen).sum(), {"body": "ckpt"})(w, h)
    assert log == [0] and seen == [1]
    torch.testing.assert_close(got, torch.cos(h * w) * h)
    leaf = w.clone().requires_grad_()
    with mf.use_plan({"body": "ckpt"}):
        value = body(leaf, h, seen).sum()
    value.backward()
    assert log == [0, 1] and seen == [1, 2]
    torch.testing.assert_close(leaf.grad, 2 * torch.cos(h * w) * h)


def test_batchnorm_statistics_updated_once() -> None:
    """num_batches_tracked counts one call and the running statistics are Reverse's (use_plan, module segment)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.3),
                              torch.nn.Tanh()).double()
    seg = mf.rev(net, name="net")
    x = _rand(1, 8, 4)
    results = {}
    for plan in ("rev", "ckpt"):
        net[1].reset_running_stats()
        net.zero_grad()
        torch.manual_seed(5)
        with mf.use_plan({"net": plan}):
            value = (seg(x) ** 2).sum()
        value.backward()
        results[plan] = [p.grad.clone() for p in net.parameters()] + [b.clone() for b in net[1].buffers()]
    assert int(net[1].num_batches_tracked) == 1
    for got, want in zip(results["ckpt"], results["rev"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class _Cache:
    """A KV cache as transformers' DynamicCache changes one: it rebinds its tensor to a longer one."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys = keys


def test_cache_sees_the_entry_state_and_grows_once() -> None:
    """The recomputation attends to the keys the call saw (not to its own appended ones); the cache ends one
    append longer, holding keys with their graph (a later loss on them is differentiated)."""

    @mf.rev
    def attend(w, h, cache):
        cache.keys = torch.cat([cache.keys, h @ w])
        return torch.softmax(h @ cache.keys.T, dim=-1) @ cache.keys

    w, h = _rand(0, 4, 4), _rand(1, 2, 4)

    def loss(w, h):
        cache = _Cache(_rand(2, 3, 4))
        out = attend(w, h, cache)
        assert cache.keys.shape == (5, 4)
        return (out**2).sum() + cache.keys.sum()

    got = mf.mixed_grad(loss, {"attend": "ckpt"})(w, h)
    torch.testing.assert_close(got, torch.func.grad(loss)(w, h), rtol=1e-12, atol=1e-12)


def test_gpt2_blocks_checkpointed_match_autograd() -> None:
    """A tiny GPT-2 in train mode (dropout 0.1 everywhere, use_cache left at its default: a DynamicCache the
    blocks append to), its blocks marked Checkpointed: plain autograd's gradient under the same seed."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_inner=32, vocab_size=50, n_positions=16,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().train()
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(1))

    def grads(plan):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        with mf.use_plan(plan):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [6, 6]  # one append each
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    reference = grads({})
    with mf.mark_segments(model, {"transformer.h.*": "ckpt"}) as handle:
        assert set(handle.segments.values()) == {mf.Checkpointed()}
        got = grads({})
    scale = max(g.abs().max() for g in reference.values())
    for k, g in reference.items():
        torch.testing.assert_close(got[k], g, rtol=0, atol=1e-12 * scale, msg=k)


def _mlp(depth: int, width: int):
    ws = [_rand(i, width, width) / width**0.5 for i in range(depth)]

    def body(x, *ws):
        for w in ws:
            x = torch.tanh(x @ w)
        return x

    return mf.rev(body, name="mlp"), ws


def _saved_bytes(plan: str, seg, ws, x) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward over one step (every saved tensor, once), and the input gradient."""
    leaf = x.clone().requires_grad_()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mf.use_plan({"mlp": plan}):
        value = seg(leaf * 2.0, *ws).sum()
    value.backward()
    return sum(saved.values()), leaf.grad


def test_keeps_only_its_inputs() -> None:
    """A deep MLP body: Reverse keeps every layer's activation and weight, Checkpointed its inputs only (the
    activation input x * 2, and the weights it is given), with the same gradient; inspect says the same."""
    depth, width, batch = 12, 32, 64
    seg, ws = _mlp(depth, width)
    x = _rand(99, batch, width)
    kept, got = _saved_bytes("ckpt", seg, ws, x)
    full, want = _saved_bytes("rev", seg, ws, x)
    inputs = x.numel() * 8 + sum(w.numel() * 8 for w in ws)
    assert kept == inputs  # (leaf * 2.0 keeps nothing: its factor is a Python number)
    assert full > kept + depth * batch * width * 8 // 2  # at least one activation per layer beyond
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    report = mf.inspect(lambda h, *ws: seg(h * 2.0, *ws).sum(), {"mlp": "ckpt"}, x, *ws)
    (row,) = report.rows
    assert row.saved_bytes == x.numel() * 8  # the activation input; the weights exist anyway
    assert row.reverse_saved_bytes is not None and row.reverse_saved_bytes > row.saved_bytes
    # the planner's figures (SegmentStats): the recomputation keeps transiently what Reverse keeps throughout
    stats = {}
    for plan in ("ckpt", "rev"):
        with _context.planned_call(mf.Plan({"mlp": plan}), "test", measure=True) as state:
            seg(x.clone().requires_grad_() * 2.0, *(w.clone().requires_grad_() for w in ws))
        stats[plan] = state.calls[0].stats
    assert stats["ckpt"].recompute_bytes == stats["rev"].saved_bytes > 0
    assert stats["ckpt"].saved_bytes == x.numel() * 8 and stats["ckpt"].output_numel == batch * width


def test_saves_memory_under_mixed_grad() -> None:
    """Under torch.func.grad, backward records with create_graph: a recomputation run at the grad level kept
    its activations until the step's end (measured: all-Checkpointed peaked above all-Reverse). Run below
    that level, the peak of a chain of blocks is one block's activations plus what every block keeps (its
    input), below Reverse's, which keeps every block's activations."""
    depth, width, batch = 6, 32, 64
    segs = [mf.rev(lambda w, h: torch.tanh(torch.tanh(h @ w) * 1.5), name=f"b{i}") for i in range(depth)]
    ws = [_rand(10 + i, width, width) / width**0.5 for i in range(depth)]
    x = _rand(9, batch, width)

    def loss(ws, x):
        for seg, w in zip(segs, ws, strict=True):
            x = seg(w, x)
        return x.square().mean()

    peaks, grads = {}, {}
    for plan in ("rev", "ckpt"):
        with mf.measure_peak() as m:
            grads[plan] = mf.mixed_grad(loss, {f"b{i}": plan for i in range(depth)})(ws, x)
        peaks[plan] = m.peak_bytes
    for got, want in zip(grads["ckpt"], grads["rev"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    activation = batch * width * 8  # one (batch, width) float64 tensor
    # Reverse keeps >= 3 activations per block (two tanh outputs, the product); Checkpointed 1 per block (its
    # output, the next block's input) plus one block's recomputation at a time: at most depth + 6 activations
    # (the recomputation's 4, the cotangents' 2) and the weights' gradients.
    assert peaks["ckpt"] <= (depth + 6) * activation + depth * width * width * 8 < peaks["rev"]


def test_nested_forward_segment_runs_as_part_of_the_body() -> None:
    """A forward segment inside a Checkpointed one is part of its body (plain code, recomputed in backward)."""
    inner = mf.fwd(lambda w, h: torch.sin(h @ w), name="inner", strategy=mf.Random(1))
    outer = mf.rev(lambda w, h: torch.tanh(inner(w, h)) * h, name="outer")

    def loss(w, x):
        return (outer(w, x) ** 2).sum()

    w, x = _rand(0, 3, 3), _rand(1, 2, 3)
    got = mf.mixed_grad(loss, {"outer": "ckpt"})(w, x)  # (exact: Random(1) would not be)
    torch.testing.assert_close(got, torch.func.grad(loss)(w, x), rtol=1e-12, atol=1e-12)


def test_no_grad_and_undifferentiated_calls_are_plain() -> None:
    seg, ws = _mlp(2, 3)
    x = _rand(0, 2, 3)
    with mf.use_plan({"mlp": "ckpt"}):
        with torch.no_grad():
            out = seg(x, *ws)
        plain = seg(x, *ws)  # nothing requires grad
    torch.testing.assert_close(out, seg(x, *ws))
    assert not out.requires_grad and not plain.requires_grad


def test_backward_twice_with_retain_graph() -> None:
    seg, ws = _mlp(2, 3)
    x = _rand(0, 2, 3).requires_grad_()
    with mf.use_plan({"mlp": "ckpt"}):
        value = seg(x * 1.0, *ws).sum()
    value.backward(retain_graph=True)
    once = x.grad.clone()
    value.backward()
    torch.testing.assert_close(x.grad, 2 * once)


def test_string_form() -> None:
    assert str(mf.Checkpointed()) == "ckpt" and parse_strategy("ckpt") == mf.Checkpointed()
    assert parse_strategy("checkpointed") == mf.Checkpointed() == mf.Plan({"a": "ckpt"})["a"]
    assert mf.Plan.from_string("a=ckpt,b=rev")["a"] == mf.Checkpointed()
    assert not mf.Checkpointed().is_forward and mf.Checkpointed().recomputes and not mf.Reverse().recomputes
    with pytest.raises(ValueError, match="ckpt"):
        parse_strategy("ckpt:2")


def test_higher_order_refused() -> None:
    seg, ws = _mlp(2, 3)
    x = _rand(0, 2, 3).requires_grad_()
    with mf.use_plan({"mlp": "ckpt"}):
        value = seg(x * 1.0, *ws).sum()
    with pytest.raises(NotImplementedError, match="segment 'mlp'.*Checkpointed"):
        torch.autograd.grad(value, x, create_graph=True)

    def loss(h):
        return seg(h, *ws).sum()

    with pytest.raises(NotImplementedError, match="segment 'mlp'.*Checkpointed"):
        torch.func.grad(lambda h: mf.mixed_grad(loss, {"mlp": "ckpt"})(h).sum())(x.detach())


def test_second_backward_through_a_call_with_side_effects_is_refused() -> None:
    """Such a call releases its entry state in its first backward (see engine/checkpoint.py): a second one
    through the same graph is an error naming the segment, not a recomputation from the wrong state."""

    @mf.rev
    def grow(w, h, cache):
        cache.keys = torch.cat([cache.keys, h @ w])
        return (h @ cache.keys.T).sum()

    w = _rand(0, 3, 3).requires_grad_()
    with mf.use_plan({"grow": "ckpt"}):
        value = grow(w, _rand(1, 2, 3), _Cache(_rand(2, 1, 3)))
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="segment 'grow': backward ran twice"):
        value.backward()


def test_pytree_outputs_pass_through_and_integer_leaves() -> None:
    """An input returned as is, an integer output (not differentiable) and a dict: Reverse's gradient."""
    seg = mf.rev(lambda w, h: {"h": h, "y": torch.sin(w) * h, "i": torch.arange(3)}, name="s")

    def loss(w, h):
        out = seg(w, h * 1.0)
        return (out["h"] ** 2).sum() + out["y"].sum() + out["i"].sum()

    w, h = _rand(0, 3), _rand(1, 3)
    want = torch.func.grad(loss, argnums=(0, 1))(w, h)
    torch.testing.assert_close(mf.mixed_grad(loss, {"s": "ckpt"}, argnums=(0, 1))(w, h), want)
    leaves = w.clone().requires_grad_(), h.clone().requires_grad_()
    with mf.use_plan({"s": "ckpt"}):
        value = loss(*leaves)
    value.backward()
    torch.testing.assert_close((leaves[0].grad, leaves[1].grad), want)


def test_bad_output_named() -> None:
    seg = mf.rev(lambda w: None, name="empty")
    with pytest.raises(TypeError, match="segment 'empty' returned None"):
        mf.mixed_grad(lambda w: seg(w), {"empty": "ckpt"})(_rand(0, 2))
