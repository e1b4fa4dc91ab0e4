"""Unit tests of the forward engine's machinery: leaf grouping for Exact, the tangent generators
(Rademacher signs from random bits, per-leaf streams), regeneration in backward, the k == 1 path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import madfunc as mf
from madfunc.engine.rng import TangentStream
from madfunc.strategies.tangents import DISTRIBUTIONS, SMALL_LEAF, draw_leaf, draw_tangents, group_leaves, leaf_seed

CPU = torch.device("cpu")


@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 1000])
@pytest.mark.parametrize("sizes", [[108, 4, 180, 5, 315, 7], [4, 108, 5, 180], [1], [3, 2, 1], [200, 65, 64]])
def test_groups_cover_every_leaf_in_order(sizes: list[int], chunk: int | None) -> None:
    groups = group_leaves(sizes, chunk)
    flat = [piece for group in groups for piece in group]
    # in order, leaf by leaf, each leaf's slices tile [0, size): backward splits s by leaf sizes
    expected_leaf, expected_start = 0, 0
    for leaf, start, stop in flat:
        if start == 0 and leaf != expected_leaf:
            assert expected_start == sizes[expected_leaf]
            expected_leaf, expected_start = leaf, 0
        assert (leaf, start) == (expected_leaf, expected_start) and stop > start
        expected_start = stop
    assert (expected_leaf, expected_start) == (len(sizes) - 1, sizes[-1])
    for group in groups:
        if chunk is not None:
            assert sum(stop - start for _, start, stop in group) <= chunk
        # at most one large leaf per group: small leaves ride along
        assert sum(sizes[leaf] > SMALL_LEAF for leaf, start, _ in group if start == 0) <= 1


def test_weight_and_bias_share_one_jvp() -> None:
    groups = group_leaves([108, 4, 180, 5, 315, 7], None)
    assert [[leaf for leaf, _, _ in g] for g in groups] == [[0, 1], [2, 3], [4, 5]]


def test_leading_small_leaves_join_the_first_group() -> None:
    """optree's sorted keys put each bias before its weight: still one pass per layer (3, not 4)."""
    groups = group_leaves([4, 108, 5, 180, 7, 315], None)
    assert [[leaf for leaf, _, _ in g] for g in groups] == [[0, 1, 2], [3, 4], [5]]
    assert [[leaf for leaf, _, _ in g] for g in group_leaves([4, 108], 100)] == [[0], [1], [1]]  # over the chunk


def _cnn(params: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2, w3, b3 = params
    h = torch.tanh(F.conv2d(x, w1, b1))
    h = torch.relu(F.conv2d(h, w2, b2))
    h = F.max_pool2d(F.avg_pool2d(h, 2), 2)
    return F.mse_loss(F.linear(h.flatten(1), w3, b3), y)


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Exact(chunk_size=50), mf.Exact(chunk_size=200)], ids=repr)
def test_grouped_exact_matches_backprop_in_float64(strategy: mf.Exact) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (5, 4, 3, 3), (5,), (7, 45), (7,)]
    params = tuple(torch.randn(s, generator=gen, dtype=torch.float64) * 0.3 for s in shapes)
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    seg = mf.fwd(_cnn, name="cnn")
    got = mf.mixed_grad(lambda p, x, y: seg(p, x, y), {"cnn": strategy}, argnums=(0, 1))(params, x, y)
    want = torch.func.grad(_cnn, argnums=(0, 1))(params, x, y)
    for g, w in zip([*got[0], got[1]], [*want[0], want[1]], strict=False):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rademacher_signs_are_fair_independent_and_regenerable(dtype: torch.dtype) -> None:
    n, k = 24, 20_000  # n not a multiple of 8 or 64: the tail of the last random word is cut off
    v = draw_leaf("rademacher", k, (n,), dtype, CPU, seed=123, index=5)
    assert v.shape == (k, n) and v.dtype == dtype
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(v, draw_leaf("rademacher", k, (n,), dtype, CPU, seed=123, index=5))
    # E[v v^T] = I: off-diagonal entries of the sample second moment are means of k fair signs, sd
    # 1/sqrt(k); 6 sd bounds all 552 of them with a false-failure rate below 1e-6.
    second = v.double().T @ v.double() / k
    off = second - torch.eye(n, dtype=torch.float64)
    assert off.abs().max() < 6 / math.sqrt(k)
    assert (v.double().mean(0).abs() < 6 / math.sqrt(k)).all()


def test_leaves_and_calls_get_independent_streams() -> None:
    seeds = {leaf_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
    a = draw_leaf("rademacher", 4000, (16,), torch.float64, CPU, seed=7, index=0)
    b = draw_leaf("rademacher", 4000, (16,), torch.float64, CPU, seed=7, index=1)
    c = draw_leaf("rademacher", 4000, (16,), torch.float64, CPU, seed=8, index=0)
    for other in (b, c):  # cross moments of independent fair signs: mean 0, sd 1/sqrt(4000)
        assert (a.T @ other / 4000).abs().max() < 6 / math.sqrt(4000)


def test_gaussian_leaves_are_standard_normal_and_regenerable() -> None:
    v = draw_leaf("gaussian", 50_000, (3, 2), torch.float64, CPU, seed=99, index=2)
    assert torch.equal(v, draw_leaf("gaussian", 50_000, (3, 2), torch.float64, CPU, seed=99, index=2))
    flat = v.reshape(50_000, 6)
    assert flat.mean(0).abs().max() < 6 / math.sqrt(50_000)
    assert (flat.var(0) - 1).abs().max() < 6 * math.sqrt(2 / 50_000)


def test_large_leaves_are_drawn_in_independent_chunks_whatever_the_threads() -> None:
    """A large Gaussian leaf is drawn chunk by chunk (in parallel on CPU): the values must not depend on
    the number of threads, and the chunks must be independent streams, not copies of one. (Rademacher
    leaves are not chunked.)"""
    distribution = "gaussian"
    CHUNK = DISTRIBUTIONS[distribution].chunk  # noqa: N806
    k, shape = 2, (CHUNK + 37,)  # 3 chunks, the last a partial one
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = draw_leaf(distribution, k, shape, torch.float64, CPU, seed=11, index=4)
        torch.set_num_threads(3)
        parallel = draw_leaf(distribution, k, shape, torch.float64, CPU, seed=11, index=4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel) and serial.shape == (k, *shape)
    flat = serial.reshape(-1)
    n = flat.numel()
    # mean 0 and variance 1 over 2^19 entries: 6 sd bounds each (false-failure rate below 1e-8)
    assert flat.mean().abs() < 6 / math.sqrt(n)
    assert (flat.var() - 1).abs() < 6 * math.sqrt(2 / n)  # (var of v^2 is 2 for Gaussian, 0 for signs)
    first, second, third = flat[:CHUNK], flat[CHUNK : 2 * CHUNK], flat[2 * CHUNK :]
    assert (first @ second / CHUNK).abs() < 6 / math.sqrt(CHUNK)  # independent chunks: mean 0, sd 1/sqrt(CHUNK)
    assert (first[: third.numel()] @ third / third.numel()).abs() < 6 / math.sqrt(third.numel())


def test_draw_tangents_is_draw_leaf_per_leaf() -> None:
    shapes, dtypes = [torch.Size([3, 4]), torch.Size([5])], [torch.float32, torch.float64]
    for dist in ("gaussian", "rademacher"):
        both = draw_tangents(dist, 3, shapes, dtypes, CPU, 42)
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=False)):
            assert torch.equal(both[i], draw_leaf(dist, 3, shape, dtype, CPU, 42, i))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_random_gradient_is_the_forward_gradient_of_the_regenerated_tangents(k: int, distribution: str) -> None:
    """The estimate equals (1/k) sum_j (g . v_j) v_j for the tangents drawn from the call's seed."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)

    def loss(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w + b).pow(2).sum()

    seg = mf.fwd(loss, name="layer")
    plan = {"layer": mf.Random(k=k, distribution=distribution)}
    torch.manual_seed(2024)
    got = mf.mixed_grad(lambda w, b, x: seg(w, b, x), plan, argnums=(0, 1))(w, b, x)
    torch.manual_seed(2024)  # the seed the call's tangent stream gave its one Random segment call
    seed = TangentStream("test").segment_seed("layer")
    v = [draw_leaf(distribution, k, t.shape, t.dtype, CPU, seed, i) for i, t in enumerate((w, b))]
    true = torch.func.grad(loss, argnums=(0, 1))(w, b, x)
    s = sum((vi.reshape(k, -1) @ gi.reshape(-1)) for vi, gi in zip(v, true, strict=False))
    for g, vi in zip(got, v, strict=False):
        torch.testing.assert_close(g, torch.tensordot(s / k, vi, dims=1), rtol=1e-12, atol=1e-12)
    torch.manual_seed(2024)  # and the whole call is bit-identical under the same torch seed
    again = mf.mixed_grad(lambda w, b, x: seg(w, b, x), plan, argnums=(0, 1))(w, b, x)
    assert all(torch.equal(a, c) for a, c in zip(got, again, strict=False))


@pytest.mark.parametrize("k", [1, 4])
def test_lazy_seeding_gives_the_same_gradient_as_eager_seeding(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lazy seeding (each leaf's tangents drawn where it is first used) changes no bit of the estimate's
    inputs: same tangents, same directional derivatives; shared weights are seeded at every use."""
    from madfunc.strategies import random as _random
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(6, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)

    def loss(params: list, x: torch.Tensor) -> torch.Tensor:
        w0, w1, w2 = params
        h = torch.tanh(x @ w0)
        h = torch.tanh(h @ w1.T) + h.shape[0] * 0.0  # a metadata query on an activation, a view of a leaf
        return torch.sin(h @ w0 @ w2).sum()  # w0 used twice

    seg = mf.fwd(loss, name="net")
    plan = {"net": mf.Random(k=k, distribution="rademacher")}
    results = []
    for threshold in (0, 2**62):  # everything lazy, then nothing lazy
        monkeypatch.setattr(_random, "LAZY_SEEDING_BYTES", threshold)
        torch.manual_seed(11)
        results.append(mf.mixed_grad(lambda p, x: seg(p, x), plan)(params, x))
    for lazy, eager in zip(*results, strict=False):
        torch.testing.assert_close(lazy, eager, rtol=1e-12, atol=1e-12)


def test_lazy_seeding_falls_back_when_a_leaf_is_never_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leaf no op touches (unused, or reached only outside torch functions) gets eager seeding:
    the estimate is the same as with eager seeding throughout (random, unbiased, also for that leaf)."""
    from madfunc.strategies import random as _random
    w, unused = torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    seg = mf.fwd(lambda w, u, x: (w * x).sum(), name="partial")
    results = []
    for threshold in (0, 2**62):
        monkeypatch.setattr(_random, "LAZY_SEEDING_BYTES", threshold)
        torch.manual_seed(0)
        results.append(mf.mixed_grad(lambda w, u: seg(w, u, torch.arange(3.0, dtype=torch.float64)),
                                     {"partial": mf.Random(k=2)}, argnums=(0, 1))(w, unused))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=False))


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "orthogonal"])
def test_one_tangent_for_several_leaves(distribution: str) -> None:
    """k == 1 skips the vmap and scales the regenerated tangent in place; orthogonal ones are views."""
    w, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    seg = mf.fwd(lambda w, b: torch.tanh(w + b).sum(), name="tiny")
    g = mf.mixed_grad(lambda w, b: seg(w, b), {"tiny": mf.Random(k=1, distribution=distribution)}, argnums=(0, 1))(w, b)
    assert g[0].shape == (3, 2) and g[1].shape == (2,) and all(torch.isfinite(t).all() for t in g)
