"""Random tangent directions: drawn from a private generator seeded from torch's RNG, so that backward
regenerates them bit for bit from one saved integer instead of keeping them in memory."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["draw_seed", "draw_tangents"]


def draw_seed() -> int:
    """A 62-bit seed from torch's default generator: ``torch.manual_seed(s)`` makes it reproducible."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _rademacher(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Random signs, 8 per random byte: far cheaper than drawing one random number per sign."""
    count = math.prod(shape)
    nbytes = (count + 7) // 8
    random_bytes = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=gen)
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    bits = (random_bytes.unsqueeze(-1) >> shifts) & 1
    signs = bits.reshape(-1)[:count].to(dtype).mul_(-2).add_(1)
    return signs.reshape(shape)


def _orthogonal(
    k: int, sizes: Sequence[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> torch.Tensor:
    """``k`` Haar-random orthonormal directions in R^n scaled by sqrt(n), as a (k, n) matrix."""
    n = sum(sizes)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    gaussian = torch.randn(n, k, dtype=work, device=device, generator=gen)
    q, r = torch.linalg.qr(gaussian, mode="reduced")
    # Sign-correct so that Q is Haar-distributed (QR alone is biased by its sign convention).
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs).T.mul_(math.sqrt(n)).to(dtype)


def draw_tangents(
    distribution: str,
    k: int,
    shapes: Sequence[torch.Size],
    dtypes: Sequence[torch.dtype],
    device: torch.device,
    seed: int,
) -> list[torch.Tensor]:
    """Draw ``k`` tangents for each leaf, as tensors of shape ``(k, *shape)``; same seed, same tangents.

    Every direction ``v`` (the concatenation over leaves of one row) has ``E[v v^T] = I``.
    """
    gen = _generator(device, seed)
    if distribution == "orthogonal":
        sizes = [math.prod(s) for s in shapes]
        common = torch.float64 if torch.float64 in dtypes else torch.float32
        flat = _orthogonal(k, sizes, common, device, gen)
        pieces = torch.split(flat, sizes, dim=1)
        return [p.reshape(k, *s).to(d) for p, s, d in zip(pieces, shapes, dtypes)]
    out = []
    for shape, dtype in zip(shapes, dtypes):
        full = (k, *shape)
        if distribution == "gaussian":
            out.append(torch.randn(full, dtype=dtype, device=device, generator=gen))
        elif distribution == "rademacher":
            out.append(_rademacher(full, dtype, device, gen))
        else:  # guarded by Random's constructor
            raise AssertionError(distribution)
    return out
