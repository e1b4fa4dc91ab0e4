"""Exact strategies reproduce torch.func.grad: model families x strategies x orders x argnums/has_aux.

float64 tolerances are fixed in advance, not tuned: forward and reverse mode evaluate the same
derivatives with sums in different orders, so they agree to a few hundred ulps of the largest terms
(unit roundoff 1.1e-16); rtol 1e-10 / atol 1e-12 leaves a wide margin for that and none for a wrong
derivative.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch
from conftest import (
    FAMILIES,
    ORDERS,
    Family,
    assert_tree_close,
    max_abs_error,
    plain_loss,
    record_float64_error,
    segmented_loss,
)

import madfunc as mf

# Tiny models: one intra-op thread is ~10x faster here (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

RTOL64, ATOL64 = 1e-10, 1e-12

STRATEGIES = {
    "exact": mf.Exact(),
    "exact_chunk7": mf.Exact(chunk_size=7),
    "reverse": mf.Reverse(),
}

# (transform, argnums kind, has_aux)
VARIANTS = {
    "grad_params": ("grad", "params", False),
    "grad_input": ("grad", "input", False),
    "grad_tuple": ("grad", "tuple", False),
    "grad_aux": ("grad", "params", True),
    "value": ("value", "params", False),
    "value_aux_tuple": ("value", "tuple", True),
}


def _argnums(family: Family, kind: str):
    return {"params": 0, "input": family.input_argnum, "tuple": (0, family.input_argnum)}[kind]


def _check(family: Family, strategy: mf.Strategy, order: str, variant: str) -> None:
    transform, kind, has_aux = VARIANTS[variant]
    argnums = _argnums(family, kind)
    params, x, y = family.make(torch.float64)
    loss = segmented_loss(family, order, has_aux)
    plan = {"f_*": strategy}
    if transform == "grad":
        got = mf.mixed_grad(loss, plan, argnums=argnums, has_aux=has_aux)(params, x, y)
        want = torch.func.grad(plain_loss(family, has_aux), argnums=argnums, has_aux=has_aux)(params, x, y)
    else:
        got = mf.mixed_grad_and_value(loss, plan, argnums=argnums, has_aux=has_aux)(params, x, y)
        want = torch.func.grad_and_value(plain_loss(family, has_aux), argnums=argnums, has_aux=has_aux)(
            params, x, y
        )
        # (grad, value) or (grad, (value, aux)), as torch.func.grad_and_value
        assert isinstance(got, tuple) and len(got) == 2
        if has_aux:
            assert isinstance(got[1], tuple) and len(got[1]) == 2
    grads = got[0] if (has_aux or transform == "value") else got
    if isinstance(argnums, tuple):
        assert isinstance(grads, tuple) and len(grads) == len(argnums)
    assert_tree_close(got, want, rtol=RTOL64, atol=ATOL64)
    record_float64_error(f"{family.name}/{order}/{strategy!r}/{variant}", max_abs_error(got, want))
    # Not vacuous: the gradient is not all zeros.
    assert any(bool(leaf.abs().max() > 1e-3) for leaf in optree.tree_leaves(grads))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_orders_x_strategies(family: Family, strategy: str, order: str) -> None:
    """Every family x order x strategy, differentiating params and an input at once (argnums=(0, i))."""
    _check(family, STRATEGIES[strategy], order, "grad_tuple")


@pytest.mark.parametrize("order", ["alternating", "whole_loss"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_argnums_and_aux_variants(family: Family, variant: str, order: str) -> None:
    """torch.func's calling conventions and return structures, for a mixed order and a whole-loss segment
    (where ``aux`` itself comes out of a forward segment)."""
    _check(family, mf.Exact(), order, variant)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_annotations_are_transparent_outside_madfunc(family: Family) -> None:
    """torch.func.grad of the annotated model is ordinary backprop: bit-identical to the plain model."""
    params, x, y = family.make(torch.float64)
    for order in ORDERS:
        got = torch.func.grad(segmented_loss(family, order, False))(params, x, y)
        want = torch.func.grad(plain_loss(family, False))(params, x, y)
        for a, e in zip(optree.tree_leaves(got), optree.tree_leaves(want), strict=True):
            assert torch.equal(a, e), order


def _relative_error(got, want) -> float:
    num = sum(
        float(((a.double() - e) ** 2).sum())
        for a, e in zip(optree.tree_leaves(got), optree.tree_leaves(want), strict=True)
    )
    den = sum(float((e**2).sum()) for e in optree.tree_leaves(want))
    return math.sqrt(num / den)


# Unit roundoff: 2^-24 for float32, 2^-8 for bfloat16 (8 significant bits, about 2.4 decimal digits).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("order", ["fwd_rev", "alternating", "whole_loss"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_low_precision_smoke(family: Family, order: str, dtype: torch.dtype) -> None:
    """float32 / bfloat16: as accurate as plain backprop in the same dtype, measured against float64.

    Both the mixed-mode gradient and torch.func.grad in ``dtype`` round every intermediate to ``dtype``;
    they differ only in which roundings happen. The tolerance is derived, not tuned: the mixed-mode
    relative error (2-norm over all leaves, against the float64 gradient of the same rounded inputs)
    must be at most 8 x max(error of torch.func.grad in ``dtype``, unit roundoff u). With the
    per-layer error ~ u * sqrt(depth) both have, a factor 8 allows for unlucky accumulation without
    admitting a wrong derivative, whose relative error is O(1).
    """
    params, x, y = family.make(dtype)
    as64 = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    params64, x64, y64 = optree.tree_map(as64, (params, x, y))
    want64 = torch.func.grad(plain_loss(family, False))(params64, x64, y64)
    ref_low = torch.func.grad(plain_loss(family, False))(params, x, y)
    got = mf.mixed_grad(segmented_loss(family, order, False), {"f_*": mf.Exact()})(params, x, y)
    for leaf, p in zip(optree.tree_leaves(got), optree.tree_leaves(params), strict=True):
        assert leaf.dtype == p.dtype and leaf.shape == p.shape
    bound = 8 * max(_relative_error(ref_low, want64), UNIT_ROUNDOFF[dtype])
    assert _relative_error(got, want64) <= bound


def test_int_and_bool_leaves_match_torch_func_grad() -> None:
    """Integer leaves in the differentiated argument: torch.func.grad refuses them, and so does mixed_grad.

    torch.func.grad raises "only Tensors of floating point dtype can require gradients"; madfunc keeps
    torch.func.grad's semantics rather than silently returning zeros.
    """
    seg = mf.fwd(lambda p: (p["w"] * p["n"]).sum(), name="f_int")
    params = {"w": torch.ones(2, dtype=torch.float64), "n": torch.tensor([1, 2])}
    with pytest.raises(RuntimeError, match="floating point") as want:
        torch.func.grad(lambda p: (p["w"] * p["n"]).sum())(params)
    with pytest.raises(RuntimeError, match="floating point") as got:
        mf.mixed_grad(seg)(params)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Exact(chunk_size=2), mf.Random(k=3)], ids=repr)
def test_int_and_bool_inputs_of_a_segment_are_not_seeded(strategy: mf.Strategy) -> None:
    """Integer and bool tensors going into and out of a forward segment are passed through, never seeded."""

    def body(p, buffers, x):
        h = torch.where(buffers["mask"], x @ p["w"], 0.0)[buffers["index"]]
        return {"h": torch.tanh(h), "argmax": h.argmax(-1), "positive": h > 0}

    seg = mf.fwd(body, name="f_body")
    w = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    buffers = {
        "mask": torch.tensor([True, False, True, True, False]).unsqueeze(-1),
        "index": torch.tensor([0, 2, 3]),
    }

    def loss(p, buffers, x, f):
        out = f(p, buffers, x)
        assert out["argmax"].dtype == torch.int64 and out["positive"].dtype == torch.bool
        return (out["h"] ** 2).sum() + out["positive"].sum()

    got = mf.mixed_grad(loss, {"f_body": strategy})({"w": w}, buffers, x, seg)
    want = torch.func.grad(loss)({"w": w}, buffers, x, body)
    if isinstance(strategy, mf.Exact):
        assert_tree_close(got, want, rtol=RTOL64, atol=ATOL64)
    else:
        assert got["w"].shape == w.shape and bool(torch.isfinite(got["w"]).all())
    # Under plain autograd, what the segment keeps for backward is the output tangents of the float
    # output only: (tangents, 3, 4), with 12 tangents for Exact (w has 12 scalars) and k for Random.
    saved = []
    w_leaf = w.clone().requires_grad_()
    with mf.use_plan({"f_body": strategy}):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            out = seg({"w": w_leaf}, buffers, x)
    tangents = 12 if isinstance(strategy, mf.Exact) else strategy.k
    assert saved == [torch.Size([tangents, 3, 4])]
    (out["h"] ** 2).sum().backward()
    if isinstance(strategy, mf.Exact):
        torch.testing.assert_close(w_leaf.grad, want["w"], rtol=RTOL64, atol=ATOL64)


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Reverse()], ids=repr)
def test_per_example_gradients_under_vmap(strategy: mf.Strategy) -> None:
    """torch.func.vmap(mixed_grad(...)) gives per-example gradients equal to vmap(torch.func.grad)."""
    layer = lambda p, x: torch.tanh(x @ p["w"] + p["b"])  # noqa: E731
    seg = mf.fwd(layer, name="f_layer")
    g = torch.Generator().manual_seed(7)
    params = {
        "w": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "b": torch.randn(2, dtype=torch.float64, generator=g),
    }
    xs = torch.randn(4, 3, dtype=torch.float64, generator=g)

    def loss(p, x, f):
        return (f(p, x) ** 2).sum()

    got = torch.func.vmap(
        mf.mixed_grad(lambda p, x: loss(p, x, seg), {"f_layer": strategy}), in_dims=(None, 0)
    )(params, xs)
    want = torch.func.vmap(torch.func.grad(lambda p, x: loss(p, x, layer)), in_dims=(None, 0))(params, xs)
    assert_tree_close(got, want, rtol=RTOL64, atol=ATOL64)


def test_segment_reused_with_different_weights_and_inputs() -> None:
    """One segment called several times in one call (shared function, separate weights): exact per call."""
    block = lambda p, h: torch.sin(h @ p)  # noqa: E731
    seg = mf.fwd(block, name="f_block")
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(4, 4, dtype=torch.float64, generator=g) for _ in range(3)]
    x = torch.randn(2, 4, dtype=torch.float64, generator=g)

    def loss(ws, x, f):
        h = x
        for i, w in enumerate(ws):
            h = f(w, h) + (h if i % 2 else 0)  # a residual every other block
        return h.pow(2).sum()

    got = mf.mixed_grad(lambda ws, x: loss(ws, x, seg), argnums=(0, 1))(ws, x)
    want = torch.func.grad(lambda ws, x: loss(ws, x, block), argnums=(0, 1))(ws, x)
    assert_tree_close(got, want, rtol=RTOL64, atol=ATOL64)


# -- segment calling conventions ------------------------------------------------------------------------
def _g(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Exact(chunk_size=1), mf.Reverse()], ids=repr)
def test_keyword_and_non_tensor_arguments(strategy: mf.Strategy) -> None:
    """Tensors passed by keyword are seeded like positional ones; numbers and strings pass through."""

    def body(p, x, *, bias, scale=1.0, act="tanh"):
        h = (x @ p["w"] + bias) * scale
        return torch.tanh(h) if act == "tanh" else torch.sin(h)

    seg = mf.fwd(body, name="f_kw")
    p, x, bias = {"w": _g(0, 3, 2)}, _g(1, 4, 3), _g(2, 2)

    def loss(p, x, bias, f):
        return (f(p, x, bias=bias, scale=0.5, act="sin") ** 2).sum()

    got = mf.mixed_grad(lambda p, x, b: loss(p, x, b, seg), {"f_kw": strategy}, argnums=(0, 1, 2))(p, x, bias)
    want = torch.func.grad(lambda p, x, b: loss(p, x, b, body), argnums=(0, 1, 2))(p, x, bias)
    assert_tree_close(got, want, rtol=RTOL64, atol=ATOL64)


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Exact(chunk_size=4), mf.Random(k=2)], ids=repr)
def test_unused_outputs_unused_params_and_constant_outputs(strategy: mf.Strategy) -> None:
    """Outputs the loss ignores (no cotangent), a parameter the segment ignores, an output that does not
    depend on the parameters: Exact gives zeros where torch.func.grad does, and is exact elsewhere."""

    def body(p, x):
        used = torch.sin(x @ p["w"])
        return {"used": used, "ignored": used.exp(), "constant": x * 2, "count": (used > 0).sum()}

    seg = mf.fwd(body, name="f_multi")
    p = {"w": _g(0, 3, 2), "unused": _g(1, 5)}
    x = _g(2, 4, 3)

    def loss(p, x, f):
        out = f(p, x)
        return out["used"].sum() + out["constant"].sum()

    torch.manual_seed(0)
    got = mf.mixed_grad(lambda p, x: loss(p, x, seg), {"f_multi": strategy})(p, x)
    want = torch.func.grad(lambda p, x: loss(p, x, body))(p, x)
    if isinstance(strategy, mf.Exact):
        assert torch.equal(got["unused"], torch.zeros(5, dtype=torch.float64))
        assert_tree_close(got, want, rtol=RTOL64, atol=ATOL64)
    else:
        # A random tangent also has components on the unused parameter, so its estimate is zero-mean
        # noise, not zero: the forward-gradient estimator, unbiased but not sparse.
        assert got["unused"].shape == (5,) and bool(torch.isfinite(got["unused"]).all())


def test_decorator_forms_and_methods() -> None:
    @mf.fwd
    def plain(w, x):
        return torch.sin(x @ w)

    @mf.fwd(name="f_named", strategy="exact")
    def named(w, x):
        return torch.cos(x @ w)

    @mf.rev(name="r_named")
    def back(w, x):
        return torch.tanh(x @ w)

    class Layer:
        def __init__(self, scale: float) -> None:
            self.scale = scale

        @mf.fwd(name="f_method")
        def __call__(self, w, x):
            return torch.sin(x @ w) * self.scale

    assert plain.name == "plain" and named.name == "f_named" and back.name == "r_named"
    assert plain.__name__ == "plain" and plain.__doc__ is None  # functools.wraps-style metadata
    layer = Layer(3.0)
    w, x = _g(0, 3, 3), _g(1, 2, 3)

    def loss(w, x):
        return (plain(w, x) + named(w, x) + back(w, x) + layer(w, x)).pow(2).sum()

    def reference(w, x):
        h = x @ w
        return (torch.sin(h) + torch.cos(h) + torch.tanh(h) + torch.sin(h) * 3.0).pow(2).sum()

    got = mf.mixed_grad(loss, {"f_named": "exact", "r_named": "exact", "f_method": "exact"}, argnums=(0, 1))(
        w, x
    )
    want = torch.func.grad(reference, argnums=(0, 1))(w, x)
    assert_tree_close(got, want, rtol=RTOL64, atol=ATOL64)
