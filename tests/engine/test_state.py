"""Side effects happen once: a forward segment leaves the Python objects it reaches as one plain call does.

The engine runs a segment's body several times per call (here ``Exact(chunk_size=1)``: one pass per
differentiated scalar, and ``Random``'s lazy and eager tries). Each pass must start from the state before
the call, and the objects must end with one plain call's effects holding primal tensors (madfunc/engine/state.py).
Before issue 20, every pass appended (a KV cache's later passes attended to the earlier passes' keys: a
silently wrong gradient), and a list passed as an argument got no append at all (the engine rebuilds the
argument containers per pass).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import madfunc as mf

DT = torch.float64
STRATEGIES = [mf.Exact(chunk_size=1), mf.Exact(), mf.Random(k=3), mf.Random(k=3, seeding="lazy")]


def _wrapped(t: torch.Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 2, dtype=DT, generator=g), torch.randn(4, 3, dtype=DT, generator=g)


class Cache:
    """Like transformers' DynamicLayer: ``update`` rebinds ``keys`` to the old keys and the new ones."""

    def __init__(self) -> None:
        self.keys = torch.zeros(0, 2, dtype=DT)

    def update(self, k: torch.Tensor) -> torch.Tensor:
        self.keys = torch.cat([self.keys, k])
        return self.keys


@mf.fwd
def attend(w, x, cache):
    keys = cache.update(x @ w)  # reads every key in the cache, as attention over a KV cache does
    return torch.softmax(keys @ keys.T, -1) @ keys


def _cache_loss(w, x, cache):
    return attend(w, x, cache).square().sum()


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_a_cache_object_is_updated_once(strategy: mf.Strategy) -> None:
    w, x = _inputs()
    plain = Cache()
    plain.update(torch.ones(1, 2, dtype=DT))  # a cache holding one earlier step
    reference = torch.func.grad(_cache_loss)(w, x, plain)
    cache = Cache()
    cache.update(torch.ones(1, 2, dtype=DT))
    got = mf.mixed_grad(_cache_loss, plan={"attend": strategy})(w, x, cache)
    assert cache.keys.shape == plain.keys.shape == (5, 2)
    assert _wrapped(cache.keys) == _wrapped(plain.keys)  # no pass's dual or batched tensors; as a plain call
    torch.testing.assert_close(cache.keys, plain.keys, rtol=0, atol=1e-15)
    if isinstance(strategy, mf.Exact):
        torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)


@mf.fwd
def appending(w, x, store):
    store.append(x @ w)
    return torch.tanh(torch.cat(store)).sum(0)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_a_list_argument_is_appended_to_once(strategy: mf.Strategy) -> None:
    w, x = _inputs()
    first = torch.ones(1, 2, dtype=DT)
    plain, store = [first], [first]

    def loss(w, store):
        return appending(w, x, store).square().sum()

    # The lists reach the segment through a closure: torch.func.grad rebuilds the containers of its own
    # arguments (wrapping their tensors), so a list passed to it directly is not appended to, plainly either.
    reference = torch.func.grad(lambda w: loss(w, plain))(w)
    got = mf.mixed_grad(lambda w: loss(w, store), plan={"appending": strategy})(w)
    assert len(store) == len(plain) == 2 and store[0] is first
    torch.testing.assert_close(store[1], plain[1], rtol=0, atol=1e-15)
    if isinstance(strategy, mf.Exact):
        torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)


class Counting(nn.Module):
    """Counts its calls in a Python attribute and keeps its last output (as some models cache tables)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(DT)
        self.calls = 0
        self.last = None

    def forward(self, x):
        self.calls += 1
        self.last = self.lin(x)
        return torch.tanh(self.last)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_module_attributes_change_once_under_use_plan(strategy: mf.Strategy) -> None:
    _, x = _inputs()
    torch.manual_seed(0)
    module = Counting()
    seg = mf.fwd(module, name="counting")
    with mf.use_plan({"counting": strategy}):
        seg(x).sum().backward()
    assert module.calls == 1
    assert not torch._C._functorch.is_functorch_wrapped_tensor(module.last)
    torch.testing.assert_close(module.last, module.lin(x).detach(), rtol=0, atol=0)


class Steps:
    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.long)  # a step counter kept as a tensor, not a buffer


def test_an_in_place_write_into_a_reachable_tensor_is_refused() -> None:
    """A shallow copy cannot undo an in-place write (each pass would add 1): torch.func refuses to mutate a
    tensor captured from outside the transform, and the error names the segment and the fix."""
    w, x = _inputs()
    steps = Steps()

    @mf.fwd
    def counted(w, x, steps):
        steps.count.add_(1)
        return x @ w

    with pytest.raises(RuntimeError, match=r"segment 'counted' modified a tensor in place.*StaticCache"):
        mf.mixed_grad(lambda w: counted(w, x, steps).sum(), plan={"counted": mf.Exact(chunk_size=1)})(w)


def test_state_is_restored_when_a_pass_fails() -> None:
    """An error inside the body leaves the objects as they were before the call, not with a pass's wrappers."""
    w, x = _inputs()
    cache = Cache()

    @mf.fwd
    def failing(w, x, cache):
        cache.update(x @ w)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        mf.mixed_grad(lambda w: failing(w, x, cache).sum())(w)
    assert cache.keys.shape == (0, 2)


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Random(k=2)], ids=str)
def test_what_the_effects_hold_is_differentiated_as_plain_code(strategy: mf.Strategy) -> None:
    """A loss that also reads the cached keys gets their gradient too (by reverse mode, through the one plain
    run that left them), under use_plan and under mixed_grad."""
    w, x = _inputs()

    def loss(w, cache):
        out = attend(w, x, cache).square().sum()
        return out + cache.keys[-1].square().sum()

    plain, cache = Cache(), Cache()  # made outside the transforms, as a model's cache is
    reference = torch.func.grad(lambda w: loss(w, plain))(w)
    if isinstance(strategy, mf.Exact):
        got = mf.mixed_grad(lambda w: loss(w, cache), plan={"attend": strategy})(w)
        torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)
    # The keys' part alone (the segment's output unused): exact under any strategy, by reverse mode.
    plain = Cache()
    keys_only = torch.func.grad(lambda w: (attend(w, x, plain), plain.keys[-1].square().sum())[1])(w)
    w_leaf = w.clone().requires_grad_()
    cache = Cache()
    with mf.use_plan({"attend": strategy}):
        attend(w_leaf, x, cache)
        cache.keys[-1].square().sum().backward()
    torch.testing.assert_close(w_leaf.grad, keys_only, rtol=1e-12, atol=1e-12)


class _Layer(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.i, self.lin = i, nn.Linear(3, 3).to(DT)

    def forward(self, h, cache):
        cache.update(h[:, :2] * 2)  # what it writes carries the graph of the layers before it
        return torch.tanh(self.lin(h))


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Random(k=2)], ids=str)
def test_a_cache_written_by_segments_is_freed_after_the_step(strategy: mf.Strategy) -> None:
    """The engine lives as long as the graph; holding the cache there made a cycle through autograd's nodes
    (the cache's tensors lead back to the node), which Python's collector cannot free: 2.5 MB a step leaked
    on a tiny Llama with its default DynamicCache."""
    layers = nn.ModuleList([_Layer(0), _Layer(1)])
    mf.mark_segments(layers, {"*": "fwd"})
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)  # as an embedding's output: upstream needs a gradient
    refs = []
    for _ in range(2):
        cache = Cache()
        refs.append(weakref.ref(cache))
        with mf.use_plan({"*": strategy}):
            h = x
            for layer in layers:
                h = layer(h, cache)
            h.sum().backward()
        del cache, h
    gc.collect()
    assert [r() for r in refs] == [None, None]
