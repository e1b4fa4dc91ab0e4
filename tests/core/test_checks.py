"""Bad input gets a clear error naming the segment (issue 2's error list), with pinned messages."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import opaque
from torch import nn

import madfunc as mf

# Tiny models: one intra-op thread is ~10x faster here (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _w(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


# -- plans ------------------------------------------------------------------------------------------
def test_plan_key_matching_no_segment_lists_the_segments_that_ran() -> None:
    stem = mf.fwd(lambda w, x: torch.tanh(x @ w), name="stem")
    head = mf.rev(lambda w, x: (x @ w).sum(), name="head")
    loss = lambda w, x: head(w, stem(w, x))  # noqa: E731
    with pytest.raises(
        ValueError, match=r"mixed_grad: plan key.* 'stme' matched no segment that ran.*'stem', 'head'"
    ):
        mf.mixed_grad(loss, {"stme": "exact"})(_w(3, 3), _w(2, 3, seed=1))
    with pytest.raises(ValueError, match=r"'block\*' matched no segment.*Segments that ran: 'stem', 'head'"):
        mf.mixed_grad_and_value(loss, {"stem": "rev", "block*": "exact"})(_w(3, 3), _w(2, 3, seed=1))


def test_plan_key_when_no_segment_ran_says_none() -> None:
    with pytest.raises(ValueError, match=r"'stem' matched no segment that ran\. Segments that ran: none"):
        mf.mixed_grad(lambda w: (w**2).sum(), {"stem": "exact"})(_w(3))


def test_plan_checked_on_leaving_use_plan() -> None:
    layer = mf.fwd(nn.Linear(2, 1).to(DT), name="layer")
    with pytest.raises(
        ValueError, match=r"use_plan: plan key.* 'layr' matched no segment.*Segments that ran: 'layer'"
    ):
        with mf.use_plan({"layr": "rev"}):
            layer(_w(3, 2)).sum().backward()


@pytest.mark.parametrize("bad", ["forward", "backprop", "fwd", ""])
def test_unknown_strategy_string(bad: str) -> None:
    # Every string form parse_strategy reads is accepted ("random:16" too); the error lists them all.
    with pytest.raises(ValueError, match=rf"unknown strategy {bad!r}; valid strategies: rev \| reverse \| exact"):
        mf.Plan({"stem": bad})
    # raised when the transform is built, before any work
    with pytest.raises(ValueError, match=r"Plan entry 'stem': unknown strategy"):
        mf.mixed_grad(lambda w: w.sum(), {"stem": bad})
    with pytest.raises(ValueError, match=r"fwd\(strategy=\.\.\.\): unknown strategy"):
        mf.fwd(lambda w: w, name="f", strategy=bad)


def test_strategy_of_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"Plan entry 'stem': expected a strategy .* got int 3"):
        mf.Plan({"stem": 3})
    with pytest.raises(TypeError, match=r"Strategy is abstract"):
        mf.Plan({"stem": mf.Strategy()})
    with pytest.raises(TypeError, match=r"plan: expected None, a dict or a madfunc.Plan"):
        mf.mixed_grad(lambda w: w.sum(), ["stem"])


@pytest.mark.parametrize("bad", ["normal", "Gaussian", "sobol"])
def test_unknown_distribution(bad: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"Random\(distribution={bad!r}\): unknown distribution; expected one of "
        r"'gaussian', 'rademacher', 'orthogonal'",
    ):
        mf.Random(k=2, distribution=bad)


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one(k: int) -> None:
    with pytest.raises(ValueError, match=rf"Random\(k={k}\): k must be >= 1"):
        mf.Random(k=k)


@pytest.mark.parametrize("k", [1.5, True, "4", None])
def test_k_not_an_int(k) -> None:
    with pytest.raises(TypeError, match=r"Random\(k=\.\.\.\): expected an int >= 1"):
        mf.Random(k=k)


@pytest.mark.parametrize("chunk", [0, -1])
def test_chunk_size_below_one(chunk: int) -> None:
    with pytest.raises(ValueError, match=rf"Exact\(chunk_size={chunk}\): chunk_size must be >= 1"):
        mf.Exact(chunk_size=chunk)


@pytest.mark.parametrize("chunk", [2.0, False, "8"])
def test_chunk_size_not_an_int(chunk) -> None:
    with pytest.raises(TypeError, match=r"Exact\(chunk_size=\.\.\.\): expected an int >= 1 or None"):
        mf.Exact(chunk_size=chunk)


def test_orthogonal_with_k_above_n_names_the_segment() -> None:
    seg = mf.fwd(lambda w, x: x @ w, name="tiny")
    with pytest.raises(
        ValueError, match=r"segment 'tiny': Random\(k=5, distribution='orthogonal'\) needs k <= n.*4"
    ):
        mf.mixed_grad(lambda w, x: seg(w, x).sum(), {"tiny": mf.Random(k=5, distribution="orthogonal")})(
            _w(2, 2), _w(3, 2)
        )


def test_two_patterns_with_different_strategies() -> None:
    plan = mf.Plan({"block*": "exact", "*1": "rev"})
    with pytest.raises(
        ValueError, match=r"segment 'block1' is matched by several patterns with different strategies"
    ):
        plan.lookup("block1")
    seg = mf.fwd(lambda w: w.sin().sum(), name="block1")
    with pytest.raises(
        ValueError, match=r"'block1' is matched by several patterns.*'block\*' -> Exact.*'\*1' -> Reverse"
    ):
        mf.mixed_grad(seg, plan)(_w(3))
    # Same strategy from both patterns is not ambiguous.
    assert mf.Plan({"block*": "exact", "*1": mf.Exact()}).lookup("block1") == mf.Exact()


# -- segment names and identity -----------------------------------------------------------------------
def test_lambda_without_name() -> None:
    with pytest.raises(
        TypeError, match=r"fwd\(fn\): .* has no usable __name__ .* give the segment an explicit name"
    ):
        mf.fwd(lambda w: w)
    with pytest.raises(TypeError, match=r"rev\(fn\): .*explicit name, e.g. rev\(fn, name='stem'\)"):
        mf.rev(lambda w: w)


def test_module_without_name() -> None:
    with pytest.raises(
        TypeError, match=r"fwd\(module\): a module segment needs an explicit name, e.g. fwd\(model\.linear"
    ):
        mf.fwd(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"rev\(module\): a module segment needs an explicit name"):
        mf.rev(nn.Linear(2, 2))


def test_empty_or_non_string_name() -> None:
    with pytest.raises(TypeError, match=r"fwd\(name=\.\.\.\): expected a non-empty string, got ''"):
        mf.fwd(torch.sin, name="")
    with pytest.raises(TypeError, match=r"rev\(name=\.\.\.\): expected a non-empty string, got 3"):
        mf.rev(torch.sin, name=3)


def test_non_callable_segment() -> None:
    with pytest.raises(TypeError, match=r"fwd\(fn\): expected a callable, got Tensor"):
        mf.fwd(torch.ones(2), name="x")
    with pytest.raises(TypeError, match=r"mixed_grad\(fn, \.\.\.\): expected a callable, got int"):
        mf.mixed_grad(3)


def test_two_functions_under_one_name_in_one_call() -> None:
    a = mf.fwd(lambda w: torch.sin(w), name="block")
    b = mf.fwd(lambda w: torch.cos(w), name="block")
    with pytest.raises(
        ValueError,
        match=r"mixed_grad: two different functions ran under the segment name 'block' "
        r"in one call .*Give each segment its own name",
    ):
        mf.mixed_grad(lambda w: (a(w) + b(w)).sum())(_w(3))
    # fwd and rev of different functions under one name: same error
    c = mf.rev(torch.tanh, name="block")
    with pytest.raises(ValueError, match=r"two different functions ran under the segment name 'block'"):
        mf.mixed_grad(lambda w: (a(w) * c(w)).sum())(_w(3))
    m1, m2 = nn.Linear(3, 3).to(DT), nn.Linear(3, 3).to(DT)
    s1, s2 = mf.fwd(m1, name="lin"), mf.fwd(m2, name="lin")
    with pytest.raises(ValueError, match=r"segment name 'lin'.*Linear object at"):
        with mf.use_plan():
            s2(s1(_w(2, 3)))


def test_recreating_segments_is_fine() -> None:
    """Notebooks and loops re-create segments: between calls, and from one source within a call."""
    x = _w(3)

    def loss(w):
        h = w
        for _ in range(3):  # a lambda re-created from the same source in a loop, within one call
            h = mf.fwd(lambda v: torch.sin(v) * 2, name="block")(h)
        return h.sum()

    want = torch.func.grad(lambda w: torch.sin(torch.sin(torch.sin(w) * 2) * 2).mul(2).sum())(x)
    for _ in range(2):  # and re-created between calls (a fresh closure each time)
        torch.testing.assert_close(mf.mixed_grad(loss)(x), want, rtol=1e-12, atol=1e-14)
    # Re-creating a module segment between calls is fine too.
    module = nn.Linear(3, 1).to(DT)
    params = {k: v.detach() for k, v in module.named_parameters()}
    for _ in range(2):
        seg = mf.fwd(module, name="lin")
        mf.mixed_grad(lambda p, seg=seg: seg(p, _w(2, 3)).sum())(params)


# -- forward-mode rules ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("dist", lambda w, x: torch.cdist(x @ w, x)),
        (
            "sampler",
            lambda w, x: F.grid_sample(w.reshape(1, 1, 3, 3), x[:1, :2].reshape(1, 1, 1, 2), align_corners=False),
        ),
        ("pdist", lambda w, x: F.pdist(x @ w)),
    ],
)
def test_op_without_forward_rule_runs_by_the_fallback(name: str, body) -> None:
    """These raised ForwardModeError before the double-vjp fallback; now they match backprop."""
    seg = mf.fwd(body, name=name)
    loss = lambda w, x: seg(w, x).sin().sum()  # noqa: E731
    torch.testing.assert_close(
        mf.mixed_grad(loss, argnums=(0, 1))(_w(3, 3), _w(4, 3, seed=1)),
        torch.func.grad(lambda w, x: body(w, x).sin().sum(), argnums=(0, 1))(_w(3, 3), _w(4, 3, seed=1)),
        rtol=1e-10,
        atol=1e-12,
    )


def test_op_forward_mode_cannot_run_names_segment_and_op() -> None:
    seg = mf.fwd(lambda w, x: opaque(x @ w), name="op")
    loss = lambda w, x: seg(w, x).sum()  # noqa: E731
    with pytest.raises(
        mf.ForwardModeError, match=r"segment 'op' runs in forward mode, but the custom autograd.Function _Opaque"
    ) as info:
        mf.mixed_grad(loss)(_w(3, 3), _w(4, 3, seed=1))
    assert isinstance(info.value, NotImplementedError)  # still catchable as torch's error type
    # The suggested fix works and is exact.
    torch.testing.assert_close(
        mf.mixed_grad(loss, {"op": "rev"})(_w(3, 3), _w(4, 3, seed=1)),
        torch.func.grad(lambda w, x: opaque(x @ w).sum())(_w(3, 3), _w(4, 3, seed=1)),
        rtol=1e-10,
        atol=1e-12,
    )


def test_op_without_forward_rule_in_nested_segment_names_the_forward_segment() -> None:
    inner = mf.rev(lambda x: opaque(x), name="inner")
    outer = mf.fwd(lambda w, x: inner(x @ w), name="outer")
    with pytest.raises(mf.ForwardModeError, match=r"segment 'outer' runs in forward mode, but the custom"):
        mf.mixed_grad(lambda w, x: outer(w, x).sum())(_w(3, 3), _w(4, 3, seed=1))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Exact(chunk_size=5)], ids=repr)
def test_scaled_dot_product_attention_works_in_forward_segments(is_causal: bool, strategy) -> None:
    """Falls back to the math kernel (CPU's fused kernel has no forward-mode rule)."""

    def attend(w, x, mask):
        q, k, v = (x @ w).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if is_causal else mask, is_causal=is_causal
        )

    seg = mf.fwd(attend, name="attn")
    w, x = _w(4, 6), _w(2, 5, 4, seed=1)
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    mask.fill_diagonal_(True)
    loss = lambda w, x, f: f(w, x, mask).sin().sum()  # noqa: E731
    got = mf.mixed_grad(lambda w, x: loss(w, x, seg), {"attn": strategy}, argnums=(0, 1))(w, x)
    want = torch.func.grad(lambda w, x: loss(w, x, attend), argnums=(0, 1))(w, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -- purity and outputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("annotate", [mf.fwd, mf.rev], ids=["fwd", "rev"])
@pytest.mark.parametrize(
    "mutate",
    [lambda w, x: x.add_(1), lambda w, x: w.mul_(2)],
    ids=["data-input", "differentiated-input"],
)
def test_segment_mutating_an_input_in_place(annotate, mutate) -> None:
    def body(w, x):
        mutate(w, x)
        return x @ w

    seg = annotate(body, name="mutator")
    with pytest.raises(RuntimeError, match=r"segment 'mutator' modified .*in place.*x\.add_\(1\)"):
        mf.mixed_grad(lambda w, x: seg(w, x).sum())(_w(3, 2), _w(2, 3, seed=1))


@pytest.mark.parametrize("annotate", [mf.fwd, mf.rev], ids=["fwd", "rev"])
def test_in_place_ops_on_intermediates_are_fine(annotate) -> None:
    """The purity check must not fire on a segment's own temporaries."""

    def body(w, x):
        h = x @ w
        h.add_(1)
        h.mul_(torch.tanh(h))
        return h

    seg = annotate(body, name="scratch")
    w, x = _w(3, 2), _w(4, 3, seed=1)
    got = mf.mixed_grad(lambda w, x: seg(w, x).sin().sum(), argnums=(0, 1))(w, x)
    want = torch.func.grad(lambda w, x: body(w, x).sin().sum(), argnums=(0, 1))(w, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("annotate", [mf.fwd, mf.rev], ids=["fwd", "rev"])
@pytest.mark.parametrize(
    ("returned", "type_name"),
    [
        (lambda h: 1.5, "float"),
        (lambda h: "text", "str"),
        (lambda h: (h, 3), "int"),
        (lambda h: [h, {"b": np.ones(2)}], "ndarray"),
    ],
)
def test_segment_returning_non_tensor(annotate, returned, type_name: str) -> None:
    seg = annotate(lambda w: returned(torch.sin(w)), name="odd")

    def loss(w):
        seg(w)
        return w.sum()

    with pytest.raises(
        TypeError,
        match=rf"segment 'odd' returned a {type_name} .*a segment must return a tensor or a "
        r"pytree",
    ):
        mf.mixed_grad(loss)(_w(3))


@pytest.mark.parametrize(
    ("name", "body", "x"),
    [
        ("lppool", lambda x: F.lp_pool2d(x, 2, 2), torch.zeros(1, 1, 4, 4, dtype=DT)),
        ("sqrt", torch.sqrt, torch.tensor([0.0, 1.0, 4.0], dtype=DT)),
    ],
)
def test_non_finite_tangents_where_the_output_is_finite(name, body, x) -> None:
    seg = mf.fwd(body, name=name)
    assert bool(torch.isfinite(body(x)).all())
    with pytest.raises(
        FloatingPointError,
        match=rf"segment '{name}': forward mode produced non-finite output "
        r"tangents where the output itself is finite.*Mark the op rev\(\)",
    ):
        mf.mixed_grad(lambda x: seg(x).sum())(x)
    # Backprop through the same function stays finite for LPPool (the fix the message suggests).
    if name == "lppool":
        g = mf.mixed_grad(lambda x: seg(x).sum(), {name: "rev"})(x)
        assert bool(torch.isfinite(g).all())


def test_non_finite_primal_does_not_silently_poison_other_gradients() -> None:
    """log(0) = -inf in one output entry that the loss does not use: backprop gives [nan, 1], finite where
    it can be. Forward mode must not silently turn the finite entry into NaN: match it, or say so."""
    seg = mf.fwd(lambda x: torch.log(x), name="log")
    x = torch.tensor([0.0, 1.0], dtype=DT)
    want = torch.func.grad(lambda x: torch.log(x)[1:].sum())(x)
    assert torch.equal(want[1:], torch.tensor([1.0], dtype=DT))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = mf.mixed_grad(lambda x: seg(x)[1:].sum())(x)
        except FloatingPointError as error:  # an error naming the segment is an acceptable answer
            assert "'log'" in str(error)
            return
    if caught:  # so is a warning naming the segment
        assert any("'log'" in str(w.message) for w in caught)
        return
    torch.testing.assert_close(got[1:], want[1:])


class _OldStyle(torch.autograd.Function):
    """forward(ctx, ...) without setup_context (as transformers' Bloom GeLUFunction): torch.func cannot run it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_an_old_style_autograd_function_is_named_with_the_fix() -> None:
    seg = mf.fwd(lambda w, x: _OldStyle.apply(x @ w), name="old")
    w, x = torch.ones(3, 2), torch.ones(4, 3)
    with pytest.raises(mf.ForwardModeError, match=r"segment 'old' runs in forward mode, but .* old style .* rev\(\)"):
        mf.mixed_grad(lambda w: seg(w, x).sum())(w)
