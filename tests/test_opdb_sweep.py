"""PyTorch's op_db as forward segments (GitHub issue 7): every op either gets the exact gradient or is refused
with an error naming the segment; never a raw torch error, a silently wrong gradient or an anonymous warning.

Each sample runs as one ``mf.fwd(..., name="op")`` segment under ``Exact`` and is compared with torch's reverse
mode through ``mf.mixed_grad`` and through ``.backward()`` under ``mf.use_plan`` (see tests/support/sweep_harness.py).
The default run covers a quick, representative subset; ``pytest -m sweep`` runs every op (about a minute), and
``python benchmarks/sweep.py`` prints the summary table.
"""

from __future__ import annotations

import time

import pytest

# torch's op_db / module_db import torch's own test dependency, expecttest (a dev dependency of madfunc).
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest: pip install expecttest")
import torch
from support import sweep_harness as H  # noqa: E402

# Tiny samples: one intra-op thread is much faster here (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

OPS = H.ops_by_name()

# A representative subset for the default run: plain elementwise / reductions / matmul, complex outputs,
# random ops, scatter-style and index ops, pooling and unpooling, linalg decompositions, losses, and ops
# without forward-mode rules in torch (which must be refused by name).
QUICK = (
    "add",
    "sin",
    "exp",
    "pow",
    "where",
    "sum",
    "logsumexp",
    "cumsum",
    "matmul",
    "cat",
    "gather",
    "index_select",
    "softmax",
    "nn.functional.gelu",
    "nn.functional.conv2d",
    "nn.functional.layer_norm",
    "nn.functional.batch_norm",
    "nn.functional.embedding",
    "nn.functional.max_pool2d",
    "nn.functional.max_unpool2d",
    "nn.functional.interpolate.bilinear",
    "scatter_reduce.sum",
    "scatter_reduce.prod",
    "scatter_reduce.amax",
    "fft.rfft",
    "fft.fft",
    "polar",
    "view_as_complex",
    "complex",
    "nn.functional.dropout",
    "bernoulli",
    "normal",
    "nn.functional.rrelu",
    "linalg.svd",
    "linalg.eigh",
    "linalg.solve",
    "linalg.det",
    "linalg.qr",
    "nn.functional.cross_entropy",
    "nn.functional.mse_loss",
    "nn.functional.binary_cross_entropy",
    "nn.functional.kl_div",
    "nn.functional.multi_margin_loss",
    "cdist",
    "half",
)
QUICK_SAMPLES = 2  # the first samples are the typical ones; the rest add edge cases (and time)


def test_quick_subset_exists() -> None:
    """A renamed or removed OpInfo must not silently shrink the subset."""
    assert [name for name in QUICK if name not in OPS] == []


@pytest.mark.parametrize("name", [n for n in QUICK if n in OPS])
def test_op_quick(name: str) -> None:
    H.assert_not_bad(H.run_op(OPS[name], samples=QUICK_SAMPLES, timeout=60.0))


@pytest.mark.sweep
@pytest.mark.parametrize("name", list(OPS))
def test_op_full(name: str) -> None:
    start = time.perf_counter()
    with H.sweep_threads():
        result = H.run_op(OPS[name], samples=H.SAMPLES, timeout=H.TIMEOUT)
    H.report(result, time.perf_counter() - start)
    H.assert_not_bad(result)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sin", H.PASS),
        ("matmul", H.PASS),
        ("nn.functional.conv2d", H.PASS),
        ("nn.functional.dropout", H.PASS),  # random: the same numbers as the plain call, from the same seed
        # A 24000-scalar input: Exact's basis block would need 4.3 GiB, refused (by name) before allocating.
        ("slice", H.MADFUNC_ERROR),
        # Inputs up to 1e4: torch's own jvp and vjp rules differ by ~1e-7 relative; madfunc routes the op to
        # the double-vjp fallback so that forward segments agree with backprop.
        ("logcumsumexp", H.PASS),
        # PyTorch's forward rule for reduce="prod" is wrong; routed to the fallback.
        ("scatter_reduce.prod", H.PASS),
    ],
)
def test_expected_category(name: str, expected: str) -> None:
    result = H.run_op(OPS[name], samples=QUICK_SAMPLES)
    assert result.category == expected, result.summary()


# -- the harness itself: it must tell these categories apart -----------------------------------------------
class _WrongVjp(torch.autograd.Function):
    """2x with a correct forward-mode rule and a wrong backward: torch's own modes disagree."""

    generate_vmap_rule = True  # Exact pushes its basis tangents through vmap

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return 3 * grad

    @staticmethod
    def jvp(ctx, tangent):
        return 2 * tangent


def _x() -> torch.Tensor:
    return torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_harness_passes_a_correct_op() -> None:
    case = H.function_case("tanh", torch.tanh, [_x()])
    assert [r.category for r in H.run_case(case, H.OP_PLAN, H.OP_SEGMENT)] == [H.PASS, H.PASS]


def test_harness_blames_torch_when_its_own_modes_disagree() -> None:
    case = H.function_case("wrong_vjp", _WrongVjp.apply, [_x()])
    assert [r.category for r in H.run_case(case, H.OP_PLAN, H.OP_SEGMENT)] == [H.INHERITED, H.INHERITED]


def test_harness_reports_a_silently_wrong_gradient() -> None:
    # A segment that computes something else on every call: madfunc's run cannot match the reference, and
    # torch's forward mode (a third call) agrees with neither, so the harness must not excuse it as inherited.
    calls = [0]

    def drifting(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return x * calls[0]

    case = H.function_case("drifting", drifting, [_x()])
    assert [r.category for r in H.run_case(case, H.OP_PLAN, H.OP_SEGMENT)] == [H.MISMATCH, H.MISMATCH]


def test_harness_tells_named_errors_from_raw_ones() -> None:
    def refuse(x: torch.Tensor) -> torch.Tensor:
        if torch._C._functorch.is_functorch_wrapped_tensor(x):  # only inside madfunc's forward-mode run
            raise ValueError("segment 'op': a refusal that names the segment")
        return x

    def crash(x: torch.Tensor) -> torch.Tensor:
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            raise ValueError("an error that names nothing")
        return x

    for fn, expected in ((refuse, H.MADFUNC_ERROR), (crash, H.RAW_ERROR)):
        case = H.function_case(fn.__name__, fn, [_x()])
        # Mode (b): under plain autograd only madfunc's forward-mode run wraps tensors (torch.func.grad would
        # wrap the reference's too).
        assert H.run_mode(case, "backward", H.OP_PLAN, H.OP_SEGMENT).category == expected
