"""The models of the performance issue, written functionally (parameters as a tuple of tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import madfunc as mf


def mlp_params(depth: int, width: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(depth):
        params.append(torch.randn(width, width, generator=gen, dtype=dtype) / width**0.5)
        params.append(torch.zeros(width, dtype=dtype))
    return tuple(params)


def mlp_data(batch: int, width: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, width, generator=gen, dtype=dtype), torch.randn(batch, width, generator=gen, dtype=dtype)


def mlp_loss(params: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = x
    for w, b in zip(params[::2], params[1::2], strict=False):
        h = torch.tanh(h @ w + b)
    return F.mse_loss(h, y)


def _layer(w: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.tanh(h @ w + b)


LAYER = mf.fwd(_layer, name="layer")


def segmented_mlp_loss(params: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The MLP with every layer a segment (one name, called once per layer)."""
    h = x
    for w, b in zip(params[::2], params[1::2], strict=False):
        h = LAYER(w, b, h)
    return F.mse_loss(h, y)


MLP_SEGMENT = mf.fwd(mlp_loss, name="mlp")


def whole_mlp_loss(params: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The whole loss as one segment (a pure forward gradient under Random)."""
    return MLP_SEGMENT(params, x, y)


def cnn_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) * 0.3

    # 3*4*9+4 + 4*5*9+5 + 45*7+7 = 619 scalars
    return (r(4, 3, 3, 3), r(4), r(5, 4, 3, 3), r(5), r(7, 45), r(7))


def cnn_data(batch: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=gen, dtype=dtype), torch.randn(batch, 7, generator=gen, dtype=dtype)


def cnn_loss(params: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2, w3, b3 = params
    h = torch.tanh(F.conv2d(x, w1, b1))
    h = torch.relu(F.conv2d(h, w2, b2))
    h = F.max_pool2d(F.avg_pool2d(h, 2), 2)
    return F.mse_loss(F.linear(h.flatten(1), w3, b3), y)


CNN_SEGMENT = mf.fwd(cnn_loss, name="cnn")


def whole_cnn_loss(params: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return CNN_SEGMENT(params, x, y)
