"""Dropout in forward segments draws the mask the plain code draws under the same seed (madfunc/_dropout.py).

Called from plain autograd (``use_plan``), the plain code's CPU dropout fills its noise in the memory order
of its input; under torch.func's transforms it is drawn in logical order. On a non-contiguous activation
(``nn.MultiheadAttention``'s output, so every ``TransformerEncoderLayer``) segments used to draw another
mask than the plain model: a different output and gradient from the same seed. Gradients are compared with
plain autograd in float64; under ``mixed_grad`` the reference is ``torch.func.grad``, whose dropout the
segment shares.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import madfunc as mf

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


class _Transposed(nn.Module):
    """A linear layer whose output is a transposed (non-contiguous) view, then ``drop``."""

    def __init__(self, drop) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6, dtype=DT)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)).transpose(0, 1)  # (6, B, ...) view of a (B, 6) result: strides (1, 6)
        return self.drop(h)


def _transformer() -> nn.Module:
    return nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.2, batch_first=True, dtype=DT)


MODELS = {
    "dropout": (lambda: _Transposed(nn.Dropout(0.4)), (5, 4)),
    "dropout_inplace": (lambda: _Transposed(lambda h: F.dropout(h * 1.0, 0.4, inplace=True)), (5, 4)),
    "alpha_dropout": (lambda: _Transposed(nn.AlphaDropout(0.3)), (5, 4)),
    "torch.dropout": (lambda: _Transposed(lambda h: torch.dropout(h, 0.25, True)), (5, 4)),
    "transformer": (_transformer, (3, 5, 8)),
}


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Random(3)], ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_use_plan_draws_the_plain_models_dropout_mask(name: str, strategy: mf.Strategy) -> None:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().train()
    x = torch.randn(*shape, dtype=DT)
    seg = mf.fwd(model, name="m")
    torch.manual_seed(5)
    plain = model(x)
    torch.manual_seed(5)
    with mf.use_plan({"m": strategy}):
        out = seg(x)
    assert torch.equal(out, plain) or torch.allclose(out, plain, rtol=1e-13, atol=1e-14)
    if isinstance(strategy, mf.Exact):  # and the gradient is the plain model's, from the same mask
        torch.manual_seed(5)
        with mf.use_plan({"m": strategy}):
            seg(x).pow(2).sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        torch.manual_seed(5)
        model(x).pow(2).sum().backward()
        for g, p in zip(got, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["dropout", "transformer"])
def test_mixed_grad_shares_torch_funcs_dropout(name: str) -> None:
    """Under mixed_grad the plain code runs under torch.func.grad, which draws dropout in logical order."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().train()
    params = dict(model.named_parameters())
    x = torch.randn(*shape, dtype=DT)
    seg = mf.fwd(model, name="m")
    torch.manual_seed(5)
    got = mf.mixed_grad(lambda p, x: seg(p, x).pow(2).sum(), {"m": mf.Exact()})(params, x)
    torch.manual_seed(5)
    want = torch.func.grad(lambda p, x: torch.func.functional_call(model, p, (x,)).pow(2).sum())(params, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
