"""PyTorch's module_db as forward segments (GitHub issue 7), in train and in eval mode: every module either
gets the exact gradient (and the same running statistics) or is refused with an error naming the segment.

Each module runs as ``mf.fwd(module, name="mod")`` called as ``seg(params, *inputs)``, differentiating its
parameters and its floating inputs, under ``Exact``; it is compared with ``torch.func.grad`` of the plain call
and with plain ``.backward()`` under ``mf.use_plan`` (see tests/support/sweep_harness.py). Random modules (dropout) run
from the same seed on both sides. The default run covers a quick subset; ``pytest -m sweep`` runs all of them.
"""

from __future__ import annotations

import time

import pytest

# torch's op_db / module_db import torch's own test dependency, expecttest (a dev dependency of madfunc).
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest: pip install expecttest")
from support import sweep_harness as H  # noqa: E402

# Tiny modules: one intra-op thread is much faster here (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

MODULES = H.all_module_names()
MODES = {"train": True, "eval": False}

QUICK = (
    "nn.Linear",
    "nn.Conv2d",
    "nn.BatchNorm2d",  # train mode: batch statistics, and running statistics updated in place
    "nn.LayerNorm",
    "nn.GroupNorm",
    "nn.Embedding",
    "nn.EmbeddingBag",
    "nn.Dropout",  # random in train mode
    "nn.TransformerEncoderLayer",
    "nn.TransformerEncoderLayer.dropout",
    "nn.MultiheadAttention",
    "nn.LSTM",
    "nn.GRU",
    "nn.CTCLoss",
    "nn.CrossEntropyLoss",
    "nn.LazyConv1d",
)
QUICK_SAMPLES = 1  # module inputs are larger than op samples; the first constructor is the typical one


def test_quick_subset_exists() -> None:
    assert [name for name in QUICK if name not in MODULES] == []


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", [n for n in QUICK if n in MODULES])
def test_module_quick(name: str, mode: str) -> None:
    H.assert_not_bad(H.run_module(name, MODES[mode], samples=QUICK_SAMPLES, timeout=60.0))


@pytest.mark.sweep
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", MODULES)
def test_module_full(name: str, mode: str) -> None:
    start = time.perf_counter()
    with H.sweep_threads():
        result = H.run_module(name, MODES[mode], samples=H.SAMPLES, timeout=H.TIMEOUT)
    H.report(result, time.perf_counter() - start)
    H.assert_not_bad(result)


@pytest.mark.parametrize(
    ("name", "mode", "expected"),
    [
        ("nn.Linear", "train", H.PASS),
        ("nn.Conv2d", "eval", H.PASS),
        ("nn.BatchNorm2d", "train", H.PASS),  # gradients and the running statistics after the call
        ("nn.Dropout", "train", H.PASS),  # the same mask as the plain call, from the same seed
        # The attention output is a transposed view: plain autograd fills its dropout mask in memory order,
        # torch.func in logical order. Under use_plan the segment draws as plain autograd does (it was
        # "inherited" before madfunc/ops/dropout.py: madfunc == torch.func.grad != backward()).
        ("nn.TransformerEncoderLayer.dropout", "train", H.PASS),
    ],
)
def test_expected_category(name: str, mode: str, expected: str) -> None:
    result = H.run_module(name, MODES[mode], samples=QUICK_SAMPLES)
    assert result.category == expected, result.summary()
