"""The double-vjp forward-mode fallback (madfunc.ops.fallback), in float64 against exact references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap
from torch.overrides import TorchFunctionMode

from madfunc.ops import fallback as _fallback
from madfunc.ops.fallback import NoForwardRuleError, function_with_fallback, jvp_by_double_vjp

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(r"ignore:index_reduce\(\) is in beta:UserWarning"),
]
DT = torch.float64
K = 3  # tangents in the vmap(jvp) tests


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed), dtype=DT)


def _float_leaves(out):
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in out if o.is_floating_point()]


def _jacobian_jvp(f, xs, us):
    """sum_i J_i u_i from the materialized Jacobian (autograd rows, no vmap: see _by_jacobian_rows)."""
    outs = _float_leaves(f(*xs))
    result = []
    for k, y in enumerate(outs):
        jac = torch.autograd.functional.jacobian(lambda *a, k=k: _float_leaves(f(*a))[k], xs)
        result.append(
            sum(j.reshape(y.numel(), -1) @ u.reshape(-1) for j, u in zip(jac, us, strict=True)).reshape(y.shape)
        )
    return result


def _fallback_jvp(f, xs, us):
    return _float_leaves(jvp(lambda *a: jvp_by_double_vjp(f, *a), xs, us)[1])


def _fallback_vmap_jvp(f, xs, us_batch, randomness="error"):
    return _float_leaves(
        vmap(lambda *u: jvp(lambda *a: jvp_by_double_vjp(f, *a), xs, u)[1], randomness=randomness)(*us_batch)
    )


def _close(actual, expected, tol=1e-12):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


_spd = _randn(4, 4, seed=9) @ _randn(4, 4, seed=9).T + 4 * torch.eye(4, dtype=DT)
_tokens = torch.tensor([[1, 3], [4, 0]])
WITH_RULES = {
    "sin": (torch.sin, (_randn(3, 4),)),
    "matmul": (torch.matmul, (_randn(3, 4), _randn(4, 2, seed=1))),
    "conv2d": (
        lambda x, w, b: F.conv2d(x, w, b, padding=1),
        (_randn(2, 2, 5, 5), _randn(3, 2, 3, 3, seed=1), _randn(3, seed=2)),
    ),
    "softmax": (lambda x: torch.softmax(x, -1), (_randn(3, 5),)),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (5,), w, b), (_randn(3, 5), _randn(5, seed=1), _randn(5, seed=2))),
    "slogdet": (torch.linalg.slogdet, (_spd,)),
    "max_dim_indices": (lambda x: tuple(torch.max(x, dim=1)), (_randn(4, 6),)),
    "sort": (lambda x: tuple(torch.sort(x, dim=-1)), (_randn(3, 5),)),
    "embedding_int_input": (lambda w, t: F.embedding(t, w), (_randn(5, 3), _tokens)),
    "cholesky_solve": (lambda a, b: torch.linalg.solve(a, b), (_spd, _randn(4, 2, seed=3))),
    "eigh": (lambda a: torch.linalg.eigh(a + a.mT).eigenvalues, (_randn(4, 4, seed=4),)),
}


def _tangents(xs, seed=10, batch=None):
    lead = () if batch is None else (batch,)
    return tuple(
        torch.randn(*lead, *x.shape, generator=_g(seed + i), dtype=DT) if x.is_floating_point() else None
        for i, x in enumerate(xs)
    )


def _split(f, xs, us):
    """Only the float inputs are jvp primals; integer ones are closed over."""
    pos = [i for i, u in enumerate(us) if u is not None]

    def g(*floats):
        full = list(xs)
        for i, v in zip(pos, floats, strict=True):
            full[i] = v
        return f(*full)

    return g, tuple(xs[i] for i in pos), tuple(us[i] for i in pos)


@pytest.mark.parametrize("name", list(WITH_RULES))
def test_matches_torch_jvp_where_torch_has_a_rule(name):
    f, xs = WITH_RULES[name]
    g, prim, us = _split(f, xs, _tangents(xs))
    _close(_fallback_jvp(g, prim, us), _float_leaves(jvp(g, prim, us)[1]))
    _, _, ub = _split(f, xs, _tangents(xs, batch=K))
    expected = _float_leaves(vmap(lambda *u: jvp(g, prim, u)[1])(*ub))
    _close(_fallback_vmap_jvp(g, prim, ub), expected)


_lp = torch.log_softmax(_randn(6, 2, 5), -1)
WITHOUT_RULES = {
    # <= 25 rows: _cdist_forward, whose backward is not differentiable: the Jacobian-rows path
    "cdist_small": (torch.cdist, (_randn(4, 3), _randn(5, 3, seed=1))),
    # > 25 rows, p=2: _euclidean_dist, whose backward is differentiable: the double vjp
    "cdist_mm": (torch.cdist, (_randn(30, 3), _randn(27, 3, seed=1))),
    "embedding_bag": (
        lambda w: F.embedding_bag(torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), w, torch.tensor([0, 4]), mode="mean"),
        (_randn(10, 3),),
    ),
    "grid_sample": (
        lambda x, grid: F.grid_sample(x, grid, align_corners=False),
        (_randn(2, 3, 5, 5), torch.rand(2, 4, 4, 2, generator=_g(1), dtype=DT) * 2 - 1),
    ),
    "ctc_loss": (
        lambda lp: F.ctc_loss(lp, torch.tensor([[1, 2], [3, 3]]), torch.tensor([6, 6]), torch.tensor([2, 2])),
        (_lp,),
    ),
    "multi_margin_loss": (lambda x: F.multi_margin_loss(x, torch.tensor([1, 0, 3])), (_randn(3, 5),)),
    "multilabel_margin_loss": (
        lambda x: F.multilabel_margin_loss(x, torch.tensor([[1, 0, -1, 0, 0], [2, -1, 0, 0, 0]])),
        (_randn(2, 5),),
    ),
    "index_reduce_prod": (
        lambda s, x: s.index_reduce(0, torch.tensor([0, 2, 0]), x, "prod"),
        (_randn(3, 4), _randn(3, 4, seed=1)),
    ),
    "max_unpool2d": (lambda x: F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2), (_randn(1, 2, 4, 4),)),
    "scatter_reduce_prod": (
        lambda s, x: s.scatter_reduce(0, torch.tensor([0, 2, 0, 1]), x, "prod"),
        (_randn(3), _randn(4, seed=1)),
    ),
    "ormqr": (torch.ormqr, (_randn(4, 3), _randn(3, seed=1), _randn(4, 2, seed=2))),
}


@pytest.mark.parametrize("name", list(WITHOUT_RULES))
def test_matches_jacobian_where_torch_has_no_rule(name):
    f, xs = WITHOUT_RULES[name]
    us = _tangents(xs)
    expected = _jacobian_jvp(f, xs, us)
    _close(_fallback_jvp(f, xs, us), expected)
    ub = _tangents(xs, batch=K)
    batched = _fallback_vmap_jvp(f, xs, ub, randomness="same")
    for k in range(K):
        _close([b[k] for b in batched], _jacobian_jvp(f, xs, tuple(u[k] for u in ub)))


def test_scatter_reduce_prod_torch_rule_is_wrong_and_fallback_right():
    f, xs = WITHOUT_RULES["scatter_reduce_prod"]
    us = _tangents(xs)
    expected = _jacobian_jvp(f, xs, us)[0]
    assert (jvp(f, xs, us)[1] - expected).abs().max() > 1e-3  # torch's own rule (2.13) drops the tangent
    _close(_fallback_jvp(f, xs, us), [expected])


@pytest.mark.parametrize("name", ["cdist_mm", "grid_sample", "max_unpool2d", "ctc_loss"])
def test_outer_grad_of_the_primal_matches_plain_grad(name):
    f, xs = WITHOUT_RULES[name]

    def loss(fn):
        return lambda x0: (_float_leaves(fn(x0, *xs[1:]))[0] ** 2).sum()

    expected = grad(loss(f))(xs[0])
    torch.testing.assert_close(grad(loss(lambda *a: jvp_by_double_vjp(f, *a)))(xs[0]), expected, rtol=1e-12, atol=1e-12)
    x0 = xs[0].clone().requires_grad_()  # plain autograd too
    loss(lambda *a: jvp_by_double_vjp(f, *a))(x0).backward()
    torch.testing.assert_close(x0.grad, expected, rtol=1e-12, atol=1e-12)


def test_partial_tangents_pytrees_and_outputs_ignoring_inputs():
    def f(d, scale, *, power):
        return {"y": torch.sin(d["a"]) * scale, "z": d["b"].sum() ** power, "n": d["a"].argmax()}

    d = {"a": _randn(3, 4), "b": _randn(2, seed=1)}
    ua = _randn(3, 4, seed=2)
    out, t = jvp(lambda a: jvp_by_double_vjp(f, {"a": a, "b": d["b"]}, 2.0, power=3), (d["a"],), (ua,))
    ref_out, ref_t = jvp(lambda a: f({"a": a, "b": d["b"]}, 2.0, power=3), (d["a"],), (ua,))
    assert set(out) == {"y", "z", "n"} and out["n"].dtype == torch.int64 and torch.equal(out["n"], ref_out["n"])
    torch.testing.assert_close(t["y"], ref_t["y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t["z"], torch.zeros((), dtype=DT))  # z does not depend on a


def test_the_batch_of_tangents_is_one_pass(monkeypatch):
    calls = []
    original = _fallback._output_tangents
    monkeypatch.setattr(_fallback, "_output_tangents", lambda *a: calls.append(1) or original(*a))
    f, xs = WITHOUT_RULES["cdist_mm"]
    _fallback_vmap_jvp(f, xs, _tangents(xs, batch=16))
    assert len(calls) == 1


def test_forward_ad_dual_tensors():
    import torch.autograd.forward_ad as fwAD

    f, xs = WITHOUT_RULES["grid_sample"]
    us = _tangents(xs)
    expected = _jacobian_jvp(f, xs, us)[0]
    with fwAD.dual_level():
        out = jvp_by_double_vjp(f, *(fwAD.make_dual(x, u) for x, u in zip(xs, us, strict=True)))
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)


def test_non_differentiable_backward_with_large_output_raises_clearly():
    w = _randn(100, 8)
    idx = torch.arange(100) % 100
    offsets = torch.arange(0, 100, 10)  # 10 bags x 8 = 80 > JACOBIAN_ROWS_LIMIT output scalars
    with pytest.raises(
        NoForwardRuleError,
        match=r"(?s)embedding_bag has no forward-mode \(jvp\) rule, and its backward "
        r"is not differentiable.*PyTorch said: the derivative for '_embedding_bag_backward'",
    ):
        jvp(lambda w: jvp_by_double_vjp(F.embedding_bag, idx, w, offsets, mode="sum"), (w,), (w,))
    assert issubclass(NoForwardRuleError, NotImplementedError)


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(x, power):
        return x**power

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.power = inputs[1]

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return ctx.power * x ** (ctx.power - 1) * g, None


class _CubeOnce(_Cube):
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return ctx.power * x ** (ctx.power - 1) * g, None


class _CubeDetached(_Cube):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (ctx.power * x ** (ctx.power - 1) * g).detach(), None


def test_custom_function_without_jvp():
    x, u, ub = _randn(5), _randn(5, seed=1), _randn(K, 5, seed=2)
    with pytest.raises(NotImplementedError, match="You must implement the jvp function for custom autograd.Function"):
        jvp(lambda x: _Cube.apply(x, 3), (x,), (u,))
    cube = function_with_fallback(_Cube)
    torch.testing.assert_close(jvp(lambda x: cube(x, 3), (x,), (u,))[1], 3 * x**2 * u, rtol=1e-12, atol=1e-12)
    batched = vmap(lambda u: jvp(lambda x: cube(x, 3), (x,), (u,))[1], randomness="same")(ub)
    torch.testing.assert_close(batched, 3 * x**2 * ub, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad(lambda x: cube(x, 3).sum())(x), 3 * x**2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn_cls", [_CubeOnce, _CubeDetached])
def test_custom_function_with_non_differentiable_backward(fn_cls):
    cube = function_with_fallback(fn_cls)
    small, large = _randn(5), _randn(100)  # <= / > JACOBIAN_ROWS_LIMIT output scalars
    torch.testing.assert_close(jvp(lambda x: cube(x, 3), (small,), (small,))[1], 3 * small**3, rtol=1e-12, atol=1e-12)
    with pytest.raises(
        NoForwardRuleError, match=rf"{fn_cls.__name__}.apply has no forward-mode .* backward is not differentiable"
    ):
        jvp(lambda x: cube(x, 3), (large,), (large,))


def test_a_torch_function_mode_sees_custom_function_call_under_functorch():
    """How a segment could reroute ``SomeFunction.apply`` without user changes (see function_with_fallback)."""
    from torch._functorch.autograd_function import custom_function_call

    class Reroute(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is custom_function_call and not _fallback.has_jvp(args[0]):
                return function_with_fallback(args[0])(*args[1:], **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    x, u = _randn(5), _randn(5, seed=1)
    with Reroute():
        _, t = jvp(lambda x: _Cube.apply(x, 3), (x,), (u,))
    torch.testing.assert_close(t, 3 * x**2 * u, rtol=1e-12, atol=1e-12)
