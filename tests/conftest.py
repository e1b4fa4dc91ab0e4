"""Shared model families for the exactness, dtype and imperative suites.

Every family is three *stages* (pure functions of a parameter dict and activations) plus *glue* that
composes them into a loss. The glue decides the graph: a chain, residual additions around segments, or
one stage called in a Python loop with shared weights. A test chooses, per *order*, which stages become
forward segments, reverse segments or nested segments, so one family definition covers every order.

Forward segments are named ``f_*`` and reverse segments ``r_*``: a test's plan ``{"f_*": strategy}``
then sets the strategy of every forward segment at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F

import madfunc as mf

Stage = Callable[..., Any]


class BackwardOnly(torch.autograd.Function):
    """Triples its input; defines no forward-mode rule (no ``jvp``), only a ``backward``: forward mode
    reaches it through madfunc's double-vjp fallback alone."""

    @staticmethod
    def forward(x):
        return x * 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 3


class _Opaque(BackwardOnly):
    """Its backward is not differentiable either, so forward mode cannot run it at all once the output has
    more than 64 scalars (the fallback's Jacobian-row limit). Tests use it to observe whether a segment
    runs in forward mode."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return g * 3


def opaque(x: torch.Tensor) -> torch.Tensor:
    """``3 * x.repeat(1, 17)``: a function only reverse mode can differentiate (see _Opaque)."""
    return _Opaque.apply(x.repeat(1, 17))


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: ``make(dtype)`` gives ``(params, x, y)``; ``glue(stages, params, x, y)`` gives
    ``(loss, aux)``; ``input_argnum`` is a float positional argument to differentiate besides params."""

    name: str
    stages: tuple[Stage, Stage, Stage]
    glue: Callable[..., tuple[torch.Tensor, Any]]
    make: Callable[[torch.dtype], tuple[dict, Any, torch.Tensor]]
    input_argnum: int = 1


def _normal(generator: torch.Generator, dtype: torch.dtype, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- MLP: a plain chain -----------------------------------------------------------------------------
def _mlp_make(dtype: torch.dtype):
    g = _generator(1)
    params = {
        "s0": {"w": _normal(g, dtype, 6, 8, scale=0.5), "b": _normal(g, dtype, 8, scale=0.1)},
        "s1": {"w": _normal(g, dtype, 8, 8, scale=0.4), "b": _normal(g, dtype, 8, scale=0.1)},
        "s2": {"w": _normal(g, dtype, 8, 3, scale=0.4), "b": _normal(g, dtype, 3, scale=0.1)},
    }
    return params, _normal(g, dtype, 5, 6), _normal(g, dtype, 5, 3)


def _mlp_glue(s, p, x, y):
    h = s[0](p["s0"], x)
    h = s[1](p["s1"], h)
    out = s[2](p["s2"], h)
    return ((out - y) ** 2).mean(), out


MLP = Family(
    "mlp",
    (
        lambda p, h: torch.tanh(h @ p["w"] + p["b"]),
        lambda p, h: F.gelu(h @ p["w"] + p["b"]),
        lambda p, h: h @ p["w"] + p["b"],
    ),
    _mlp_glue,
    _mlp_make,
)


# -- CNN with max and average pooling -----------------------------------------------------------------
def _cnn_make(dtype: torch.dtype):
    g = _generator(2)
    params = {
        "s0": {"w": _normal(g, dtype, 2, 1, 3, 3, scale=0.5), "b": _normal(g, dtype, 2, scale=0.1)},
        "s1": {"w": _normal(g, dtype, 3, 2, 3, 3, scale=0.4), "b": _normal(g, dtype, 3, scale=0.1)},
        "s2": {"w": _normal(g, dtype, 3, 3, scale=0.5), "b": _normal(g, dtype, 3, scale=0.1)},
    }
    y = torch.softmax(_normal(g, torch.float64, 2, 3), -1).to(dtype)  # soft class targets
    return params, _normal(g, dtype, 2, 1, 4, 4), y


def _cnn_glue(s, p, x, y):
    h = s[0](p["s0"], x)
    h = s[1](p["s1"], h)
    out = s[2](p["s2"], h)
    return F.cross_entropy(out, y), out


CNN = Family(
    "cnn",
    (
        lambda p, h: F.max_pool2d(torch.tanh(F.conv2d(h, p["w"], p["b"], padding=1)), 2),
        lambda p, h: F.avg_pool2d(F.silu(F.conv2d(h, p["w"], p["b"], padding=1)), 2),
        lambda p, h: h.flatten(1) @ p["w"] + p["b"],
    ),
    _cnn_glue,
    _cnn_make,
)


# -- Residual blocks: the skip connections are glue around the segments (a DAG across segments) ---------
def _res_make(dtype: torch.dtype):
    g = _generator(3)
    params = {
        "s0": {"w1": _normal(g, dtype, 6, 8, scale=0.4), "w2": _normal(g, dtype, 8, 6, scale=0.4)},
        "s1": {
            "ln_w": 1 + _normal(g, dtype, 6, scale=0.1),
            "ln_b": _normal(g, dtype, 6, scale=0.1),
            "w": _normal(g, dtype, 6, 6, scale=0.4),
        },
        "s2": {"w": _normal(g, dtype, 6, 2, scale=0.4), "b": _normal(g, dtype, 2, scale=0.1)},
    }
    return params, _normal(g, dtype, 4, 6), _normal(g, dtype, 4, 2)


def _res_glue(s, p, x, y):
    h = x + s[0](p["s0"], x)
    h = h + s[1](p["s1"], h)
    out = s[2](p["s2"], h)
    return ((out - y) ** 2).sum(), out


RESIDUAL = Family(
    "residual",
    (
        lambda p, h: F.gelu(h @ p["w1"]) @ p["w2"],
        lambda p, h: torch.tanh(F.layer_norm(h, (6,), p["ln_w"], p["ln_b"]) @ p["w"]),
        lambda p, h: h @ p["w"] + p["b"],
    ),
    _res_glue,
    _res_make,
)


# -- Attention block: causal scaled-dot-product attention, then an MLP, then a pooled head --------------
def _attention(p, h):
    batch, seq, dim = h.shape
    q, k, v = (h @ p["w_qkv"]).split(dim, dim=-1)
    q, k, v = (t.reshape(batch, seq, 2, dim // 2).transpose(1, 2) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return a.transpose(1, 2).reshape(batch, seq, dim) @ p["w_o"]


def _attn_make(dtype: torch.dtype):
    g = _generator(4)
    params = {
        "s0": {"w_qkv": _normal(g, dtype, 4, 12, scale=0.5), "w_o": _normal(g, dtype, 4, 4, scale=0.5)},
        "s1": {
            "ln_w": 1 + _normal(g, dtype, 4, scale=0.1),
            "ln_b": _normal(g, dtype, 4, scale=0.1),
            "w1": _normal(g, dtype, 4, 6, scale=0.5),
            "w2": _normal(g, dtype, 6, 4, scale=0.5),
        },
        "s2": {"w": _normal(g, dtype, 4, 3, scale=0.5)},
    }
    return params, _normal(g, dtype, 2, 5, 4), _normal(g, dtype, 2, 3)


def _attn_glue(s, p, x, y):
    h = x + s[0](p["s0"], x)
    h = h + s[1](p["s1"], h)
    out = s[2](p["s2"], h.mean(1))
    return ((out - y) ** 2).mean(), out


ATTENTION = Family(
    "attention",
    (
        _attention,
        lambda p, h: F.gelu(F.layer_norm(h, (4,), p["ln_w"], p["ln_b"]) @ p["w1"]) @ p["w2"],
        lambda p, h: h @ p["w"],
    ),
    _attn_glue,
    _attn_make,
)


# -- RNN: one cell segment called in a Python loop with shared weights -------------------------------------
def _rnn_make(dtype: torch.dtype):
    g = _generator(5)
    params = {
        "s0": {"w": _normal(g, dtype, 3, 5, scale=0.5)},
        "s1": {
            "w_h": _normal(g, dtype, 5, 5, scale=0.4),
            "w_x": _normal(g, dtype, 5, 5, scale=0.4),
            "b": _normal(g, dtype, 5, scale=0.1),
        },
        "s2": {"w": _normal(g, dtype, 5, 2, scale=0.5)},
    }
    return params, _normal(g, dtype, 4, 3, 3), _normal(g, dtype, 3, 2)


def _rnn_glue(s, p, x, y):
    xs = s[0](p["s0"], x)  # (time, batch, 5)
    h = torch.zeros_like(xs[0])
    for xt in xs.unbind(0):
        h = s[1](p["s1"], h, xt)
    out = s[2](p["s2"], h)
    return ((out - y) ** 2).mean(), out


RNN = Family(
    "rnn_loop",
    (
        lambda p, x: torch.tanh(x @ p["w"]),
        lambda p, h, xt: torch.tanh(h @ p["w_h"] + xt @ p["w_x"] + p["b"]),
        lambda p, h: h @ p["w"],
    ),
    _rnn_glue,
    _rnn_make,
)


# -- Embedding + layer norm: integer token inputs (never differentiated) ----------------------------------
def _emb_make(dtype: torch.dtype):
    g = _generator(6)
    params = {
        "s0": {
            "table": _normal(g, dtype, 10, 6),
            "pos": _normal(g, dtype, 4, 6, scale=0.1),
            "ln_w": 1 + _normal(g, dtype, 6, scale=0.1),
            "ln_b": _normal(g, dtype, 6, scale=0.1),
        },
        "s1": {"w": _normal(g, dtype, 6, 6, scale=0.4), "b": _normal(g, dtype, 6, scale=0.1)},
        "s2": {"w": _normal(g, dtype, 6, 2, scale=0.4)},
    }
    tokens = torch.randint(0, 10, (3, 4), generator=g)
    return params, tokens, _normal(g, dtype, 3, 2)


def _emb_glue(s, p, tokens, y):
    h = s[0](p["s0"], tokens)
    h = s[1](p["s1"], h)
    out = s[2](p["s2"], h.mean(1))
    return ((out - y) ** 2).mean() + 0.1 * (out * y).sum(), out


EMBEDDING = Family(
    "embedding_layernorm",
    (
        lambda p, t: F.layer_norm(F.embedding(t, p["table"]) + p["pos"], (6,), p["ln_w"], p["ln_b"]),
        lambda p, h: torch.tanh(h @ p["w"] + p["b"]),
        lambda p, h: h @ p["w"],
    ),
    _emb_glue,
    _emb_make,
    input_argnum=2,  # the tokens are integers; differentiate the (float) targets instead
)

FAMILIES = (MLP, CNN, RESIDUAL, ATTENTION, RNN, EMBEDDING)

ORDERS = ("fwd_rev", "rev_fwd", "alternating", "nested", "whole_loss")


def segmented_loss(family: Family, order: str, has_aux: bool) -> Callable[..., Any]:
    """The family's loss with its stages annotated as ``order`` says.

    - ``fwd_rev``: stage 0 forward, stages 1-2 reverse;
    - ``rev_fwd``: stage 0 reverse, stages 1-2 forward;
    - ``alternating``: forward, reverse, forward;
    - ``nested``: stage 0 is a forward segment whose body is an inner forward segment, stage 1 a forward
      segment whose body is an inner reverse segment, stage 2 reverse;
    - ``whole_loss``: the entire loss is one forward segment (no backprop anywhere).
    """
    s0, s1, s2 = family.stages
    if order == "fwd_rev":
        stages = [mf.fwd(s0, name="f_s0"), mf.rev(s1, name="r_s1"), mf.rev(s2, name="r_s2")]
    elif order == "rev_fwd":
        stages = [mf.rev(s0, name="r_s0"), mf.fwd(s1, name="f_s1"), mf.fwd(s2, name="f_s2")]
    elif order == "alternating":
        stages = [mf.fwd(s0, name="f_s0"), mf.rev(s1, name="r_s1"), mf.fwd(s2, name="f_s2")]
    elif order == "nested":
        inner0 = mf.fwd(s0, name="f_inner0")
        inner1 = mf.rev(s1, name="r_inner1")
        stages = [
            mf.fwd(lambda p, *a: inner0(p, *a) * 1.0, name="f_outer0"),
            mf.fwd(lambda p, *a: inner1(p, *a), name="f_outer1"),
            mf.rev(s2, name="r_s2"),
        ]
    elif order == "whole_loss":
        whole = mf.fwd(lambda p, x, y: family.glue(family.stages, p, x, y), name="f_whole")

        def loss(p, x, y):
            value, aux = whole(p, x, y)
            return (value, aux) if has_aux else value

        return loss
    else:
        raise AssertionError(order)

    def loss(p, x, y):
        value, aux = family.glue(stages, p, x, y)
        return (value, aux) if has_aux else value

    return loss


def plain_loss(family: Family, has_aux: bool) -> Callable[..., Any]:
    """The reference: the same loss with no annotations at all."""

    def loss(p, x, y):
        value, aux = family.glue(family.stages, p, x, y)
        return (value, aux) if has_aux else value

    return loss


def max_abs_error(actual: Any, expected: Any) -> float:
    """Largest absolute difference over two pytrees of tensors with the same structure."""
    pairs = zip(optree.tree_leaves(actual), optree.tree_leaves(expected), strict=True)
    return max((float((a.double() - e.double()).abs().max()) for a, e in pairs), default=0.0)


def assert_tree_close(actual: Any, expected: Any, *, rtol: float, atol: float) -> None:
    """Same pytree structure, and every leaf close (dtype and shape included)."""
    assert optree.tree_structure(actual) == optree.tree_structure(expected)
    for a, e in zip(optree.tree_leaves(actual), optree.tree_leaves(expected), strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread, restoring the setting afterwards.

    The models here are tiny: with 2 threads on a busy 2-core machine, torch's parallel regions
    (e.g. linalg.qr, conv, layer_norm) spend far longer starting and waiting for workers than computing
    (the exactness suite: 48 s on 2 threads, 4 s on one; linalg.qr of a 15 x 5 matrix: 8 ms vs 7 us).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The largest float64 error against torch.func.grad seen by the exactness tests, reported at the end.
_FLOAT64_ERRORS: dict[str, float] = {}


def record_float64_error(case: str, error: float) -> None:
    _FLOAT64_ERRORS[case] = error


# Measured vs theoretical E||g^ - g||^2 / ||g||^2 of the random strategies, reported at the end.
_RELATIVE_VARIANCES: dict[str, tuple[float, float]] = {}


def record_relative_variance(case: str, measured: float, theory: float) -> None:
    _RELATIVE_VARIANCES[case] = (measured, theory)


def pytest_terminal_summary(terminalreporter) -> None:
    for case, (measured, theory) in _RELATIVE_VARIANCES.items():
        terminalreporter.write_line(
            f"madfunc: relative variance {case}: measured {measured:.3f}, theory {theory:.3f}"
        )
    if _FLOAT64_ERRORS:
        case, worst = max(_FLOAT64_ERRORS.items(), key=lambda item: item[1])
        terminalreporter.write_line(
            f"madfunc: largest float64 |mixed_grad - torch.func.grad| over {len(_FLOAT64_ERRORS)} cases: "
            f"{worst:.3g} ({case})"
        )
