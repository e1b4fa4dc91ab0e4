"""Random tangent directions, drawn leaf by leaf so that backward regenerates them bit for bit, one leaf
at a time, from one saved integer instead of keeping them in memory.

Each Random segment call gets one 62-bit seed from the transform call's tangent stream (``_rng``, so
``torch.manual_seed`` reproduces it); leaf ``i`` gets its own generator, seeded by a SplitMix64 hash of
``(seed, i)``. Leaves are thus independent streams: backward can regenerate any one leaf's tangents
without drawing the others. A large Gaussian leaf on CPU is drawn in chunks, each from a generator seeded
from the leaf's, on several threads at once (``draw_leaf``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import optree
import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode

from madfunc.core.checks import writes_first_operand
from madfunc.core.functorch import METADATA_OPS
from madfunc.core.registry import REGISTRY

__all__ = [
    "DISTRIBUTIONS", "Distribution", "LazySeeds", "SMALL_LEAF", "basis_block", "draw_leaf", "draw_tangents",
    "group_leaves", "leaf_seed",
]

_MASK64 = (1 << 64) - 1


def leaf_seed(seed: int, index: int) -> int:
    """The seed of leaf ``index``'s generator: SplitMix64 of ``seed`` advanced ``index + 1`` steps.

    SplitMix64 (Steele, Lea and Flood 2014) decorrelates nearby inputs, so leaf streams are independent
    in practice even though the per-call seeds and leaf indices are small, structured integers.
    """
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = REGISTRY.register(
    "tangents.sign_tables", dict, "Rademacher sign tables by dtype and device")


def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (256, 8) table: row b holds the signs (-1)^bit for the 8 bits of byte b, lowest bit first."""
    key = (dtype, device)
    table = _SIGN_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[key] = (1 - 2 * bits).to(dtype=dtype, device=device)
    return table


def _rademacher(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Random signs, 64 per random word: each byte of random bits selects a row of 8 ready-made signs.

    One gather of a 2 KiB table writes the output directly (no per-sign shifts, masks or casts), so it
    costs about as much as filling the output; drawing one random number per sign costs 20x more.
    """
    count = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 63) // 64,), dtype=torch.int64, device=device, generator=gen)
    index = words.view(torch.uint8).to(torch.int32)
    signs = torch.index_select(_sign_table(dtype, device), 0, index)
    return signs.view(-1)[:count].view(shape)


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


def _gaussian(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=gen)


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A tangent distribution (``E[v v^T] = I``): how it draws, and its variance law.

    ``draw(shape, dtype, device, generator)`` draws i.i.d. entries, leaf by leaf; ``None`` marks a
    distribution drawn jointly over all leaves (``orthogonal``), which cannot be regenerated one leaf at a
    time. ``variance(n, k)`` is ``E||g^ - g||^2 / ||g||^2`` of the forward gradient
    ``(1/k) sum_j (g . v_j) v_j`` in ``R^n``, derived from ``E[(g.v)^2 ||v||^2]``: ``(n + 2)||g||^2`` for
    Gaussian ``v``, ``n ||g||^2`` for signs (``||v||^2 = n``); orthogonal rows are not independent.
    """

    name: str
    draw: Callable[..., torch.Tensor] | None
    variance: Callable[[int, int], float]
    law: str  # the variance law as written in docs and reports
    chunk: int | None = None
    draw_into: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None


DISTRIBUTIONS: dict[str, Distribution] = {
    d.name: d
    for d in (
        # mt19937 and Box-Muller cost ~8 ns per entry on one thread: chunks of 2^17 halve that on two
        # (2^16 or 2^18 was slower for a 512 x 512 leaf, and for 16 of them).
        Distribution("gaussian", _gaussian, lambda n, k: (n + 1) / k, "(n+1)/k", chunk=2**17,
                     draw_into=lambda out, gen: out.normal_(generator=gen)),
        Distribution("rademacher", _rademacher, lambda n, k: (n - 1) / k, "(n-1)/k"),
        Distribution("orthogonal", None, lambda n, k: n / k - 1, "n/k - 1"),
    )
}


# On CPU, a leaf of a distribution with a ``chunk`` is drawn in chunks, chunk c from its own generator
# (seeded from the leaf's), so that chunks can be drawn on several threads at once: torch's CPU generator
# (mt19937) is serial, and Gaussian tangents cost half a backprop step of the MLP in benchmarks/RESULTS.md.
# The values depend on the chunk size, never on the number of threads.
_POOL: list = [None, 0]  # the drawing threads and their number, made on first use


def _pool(workers: int) -> ThreadPoolExecutor:
    if _POOL[1] != workers:
        old = _POOL[0]
        if old is not None:
            old.shutdown(wait=False)
        _POOL[:] = [ThreadPoolExecutor(workers, thread_name_prefix="madfunc-draw"), workers]
    return _POOL[0]


def _forget_pool() -> None:  # a forked child has none of its parent's threads: it makes its own
    _POOL[:] = [None, 0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def draw_leaf(
    distribution: str, k: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int, index: int
) -> torch.Tensor:
    """The ``k`` tangents of leaf ``index``, shape ``(k, *shape)``: a function of ``(seed, index)`` only.

    Not for ``"orthogonal"``, whose directions are orthogonal jointly over all leaves.
    """
    law = DISTRIBUTIONS[distribution]
    assert law.draw is not None, distribution  # joint distributions are drawn by draw_tangents
    own = leaf_seed(seed, index)
    full = (k, *shape)
    count, size = math.prod(full), law.chunk
    if size is None or device.type != "cpu" or count <= size:  # (accelerators draw in parallel already)
        return law.draw(full, dtype, device, _generator(device, own))
    draw_into = law.draw_into
    assert draw_into is not None, distribution  # a distribution drawn in chunks draws into them
    out = torch.empty(count, dtype=dtype, device=device)

    def fill(chunk: int) -> None:
        draw_into(out[chunk * size : (chunk + 1) * size], _generator(device, leaf_seed(own, chunk)))

    chunks = range((count + size - 1) // size)
    workers = min(torch.get_num_threads(), len(chunks))
    if workers > 1:
        list(_pool(workers).map(fill, chunks))  # torch releases the GIL while it draws
    else:
        for chunk in chunks:
            fill(chunk)
    return out.view(full)


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
    if DISTRIBUTIONS[distribution].draw is None:  # orthogonal: jointly over all leaves
        gen = _generator(device, seed)
        sizes = [math.prod(s) for s in shapes]
        common = torch.float64 if torch.float64 in dtypes else torch.float32
        flat = _orthogonal(k, sizes, common, device, gen)
        pieces = torch.split(flat, sizes, dim=1)
        return [p.reshape(k, *s).to(d) for p, s, d in zip(pieces, shapes, dtypes, strict=False)]
    return [
        draw_leaf(distribution, k, shape, dtype, device, seed, i)
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True))
    ]


class LazySeeds(TorchFunctionMode):
    """Seeds each leaf's tangents where an op first uses it, instead of on entry: lazy seeding.

    Inside a ``jvp`` (vmapped over ``pick``, the tangent's index ``j``; None: one tangent, no vmap), every
    op argument that *is* one of ``leaves`` is replaced by the dual ``make_dual(leaf, V[j])`` with
    ``V = make(index)`` of shape ``(k, *leaf.shape)``: the leaf itself as primal (so the primal work is
    done once, not per tangent), with tangent ``V[j]``. ``V`` is drawn on the spot and dropped after the
    op, so no leaf's tangents outlive its use (memory no longer grows with the number of leaves), and none
    are drawn for unused leaves. ``seeded`` records which leaves were reached; the caller must check that
    all were. (An earlier version seeded ``leaf + token @ V`` from a token of one-hot tangents: a (k x k)
    by (k x numel) product per use, 3x the cost of the gather ``V[j]``.)

    An in-place op (``x.add_``, ``x[i] = v``, ``out=``) under lazy seeding would act on the dual view
    instead of the eager path's own tensors; ``saw_inplace`` records any in-place op, and the caller then
    seeds eagerly, where in-place ops act on the real tensors.
    """

    def __init__(self, leaves: Sequence[torch.Tensor], pick: torch.Tensor | None, make) -> None:
        super().__init__()
        self.by_id = {id(t): (index, t) for index, t in enumerate(leaves)}
        self.pick = pick
        self.make = make
        self.seeded: set[int] = set()
        self.saw_inplace = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in METADATA_OPS:
            return func(*args, **kwargs)
        # optree's PyTree is a class to type checkers, so no plain tuple matches it (a stub limit)
        flat, spec = optree.tree_flatten((args, kwargs), none_is_leaf=True)  # pyright: ignore[reportArgumentType]
        # In-place methods keep their own first argument: mutating a leaf must still mutate the leaf,
        # so that the purity check names the segment.
        keep_first = writes_first_operand(func)
        self.saw_inplace |= keep_first or "out" in kwargs
        hit = False
        for pos, arg in enumerate(flat):
            entry = self.by_id.get(id(arg)) if isinstance(arg, torch.Tensor) else None
            if entry is None or entry[1] is not arg or (pos == 0 and keep_first):
                continue
            v = self.make(entry[0])
            flat[pos] = fwAD.make_dual(arg, v[0] if self.pick is None else v[self.pick])
            self.seeded.add(entry[0])
            hit = True
        if hit:
            args, kwargs = optree.tree_unflatten(spec, flat)
        return func(*args, **kwargs)


# A leaf this small joins the previous group of basis tangents instead of getting a jvp of its own.
# At small batch a vmap(jvp) call costs more in overhead than pushing a few more tangents through.
SMALL_LEAF = 64


def group_leaves(sizes: Sequence[int], chunk: int | None) -> list[list[tuple[int, int, int]]]:
    """Groups of ``(leaf, start, stop)`` slices of the basis, pushed through the segment together.

    A leaf larger than ``SMALL_LEAF`` starts a group; smaller ones join the group before them (usually
    the weight of the same layer, used at the same point), so their tangents cost no extra work there;
    small leaves before the first large one join its group.
    No group holds more than ``chunk`` tangents; a leaf larger than ``chunk`` is split across groups.
    """
    groups: list[list[tuple[int, int, int]]] = []
    count = 0
    for leaf, size in enumerate(sizes):
        start = 0
        while start < size:
            room = size - start if chunk is None else min(size - start, chunk)
            joins = groups and size <= SMALL_LEAF and (chunk is None or count + room <= chunk)
            if joins and start == 0:
                groups[-1].append((leaf, 0, size))
                count += size
                break
            groups.append([(leaf, start, start + room)])
            count = room
            start += room
    # Small leaves before the first large one (optree sorts dict keys: "conv1.bias" before "conv1.weight")
    # would otherwise get a pass of their own: they join the first large leaf's group.
    if len(groups) > 1 and all(sizes[leaf] <= SMALL_LEAF for leaf, _, _ in groups[0]) and groups[1][0][1] == 0:
        merged = groups[0] + groups[1]
        if chunk is None or sum(stop - start for _, start, stop in merged) <= chunk:
            groups[:2] = [merged]
    return groups


def basis_block(tensors: Sequence[torch.Tensor], which: Sequence[int], group: Sequence[tuple[int, int, int]],
                 count: int) -> list[torch.Tensor]:
    """Basis tangents for one group: row r is the r-th basis direction among the group's slices."""
    out = []
    row = 0
    for i, (_, start, stop) in zip(which, group, strict=False):
        x = tensors[i]
        basis = torch.zeros(count, x.numel(), dtype=x.dtype, device=x.device)
        # rows row..row+(stop-start) carry directions start..stop of this leaf: a shifted diagonal.
        basis[row : row + stop - start].diagonal(offset=start).fill_(1)
        out.append(basis.view(count, *x.shape))
        row += stop - start
    return out
