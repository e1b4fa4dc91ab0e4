"""measure_peak counts storages exactly: each figure here is computed by hand from the ops a block runs."""

from __future__ import annotations

import pytest
import torch

import madfunc as mf

DT = torch.float64
N = 100  # float64 vectors of N scalars: 800 bytes each


def test_fresh_allocations_count_until_freed() -> None:
    with mf.measure_peak() as m:
        a = torch.empty(100, dtype=torch.float32)  # 400
        b = torch.empty(50, dtype=DT)  # 400: 800 alive
        del a  # 400 alive
        c = torch.empty(10, dtype=torch.float32)  # 40: 440 alive
    assert (m.peak_bytes, m.live_bytes, m.allocated_bytes) == (800, 440, 840)
    del b, c


def test_views_and_in_place_results_count_no_bytes_of_their_own() -> None:
    with mf.measure_peak() as m:
        x = torch.zeros(16, 16)  # 1024
        views = [x[1:], x.t(), x.view(256), x.reshape(4, 64), x.detach(), x.expand(2, 16, 16)]
        x.add_(1).mul_(2)
        assert m.live_bytes == 1024
    assert m.peak_bytes == 1024
    del views


def test_tensors_from_before_the_block_never_count() -> None:
    w = torch.zeros(1000)
    with mf.measure_peak() as m:
        w.add_(1)
        v = w[:10].view(2, 5)
        w.copy_(torch.ones(1000))  # the ones count (4000) until freed; the copy reuses w's storage
    assert (m.peak_bytes, m.live_bytes) == (4000, 0)
    del v


def test_resize_in_place_counts_the_growth() -> None:
    with mf.measure_peak() as m:
        x = torch.empty(10)  # 40
        x.resize_(100)  # grows its own storage to 400
    assert (m.peak_bytes, m.live_bytes) == (400, 400)


def test_ops_inside_vmap_are_seen() -> None:
    x = torch.randn(4, 8, dtype=DT)
    with mf.measure_peak() as m:
        y = torch.func.vmap(lambda a: torch.sin(a).exp())(x)  # sin (256), then exp (256); sin freed
    assert (m.peak_bytes, m.live_bytes) == (512, 256)
    del y


def test_ops_inside_jvp_are_seen() -> None:
    x, t = torch.randn(N, dtype=DT), torch.randn(N, dtype=DT)
    with mf.measure_peak() as m:
        out, tangent = torch.func.jvp(torch.sin, (x,), (t,))  # sin(x), then t * cos(x): cos freed
    assert (m.peak_bytes, m.live_bytes) == (3 * 8 * N, 2 * 8 * N)
    del out, tangent


def test_autograd_backward_is_seen() -> None:
    w = torch.randn(N, dtype=DT, requires_grad=True)
    with mf.measure_peak() as m:
        loss = w.exp().sum()  # exp(w) (800, saved by ExpBackward) and the sum (8)
        loss.backward()  # the seed ones (8) and grad * exp(w) (800, becomes w.grad); exp(w) freed
    assert (m.peak_bytes, m.live_bytes) == (2 * 8 * N + 16, 8 * N + 8)
    assert w.grad is not None


def test_torch_func_grad_is_seen() -> None:
    w = torch.randn(N, dtype=DT)
    with mf.measure_peak() as m:
        g = torch.func.grad(lambda w: w.exp().sum())(w)  # the same four tensors as plain autograd
    assert (m.peak_bytes, m.live_bytes) == (2 * 8 * N + 16, 8 * N)
    del g


def test_nested_meters_both_count() -> None:
    with mf.measure_peak() as outer:
        a = torch.empty(100)  # 400
        with mf.measure_peak() as inner:
            b = torch.empty(25)  # 100
    assert (outer.peak_bytes, inner.peak_bytes) == (500, 100)
    del a, b


def test_figures_are_those_of_the_block() -> None:
    with mf.measure_peak() as m:
        a = torch.empty(100)
    del a  # freed after the block: live_bytes stays the block's
    assert (m.peak_bytes, m.live_bytes) == (400, 400)
    assert "peak=400 B" in repr(m)


def test_a_meter_is_used_once() -> None:
    m = mf.measure_peak()
    with m:
        pass
    with pytest.raises(RuntimeError, match=r"measure_peak: this meter was already used; make a new one"):
        with m:
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_from_the_allocator() -> None:
    torch.zeros(1, device="cuda")  # initialize CUDA
    with mf.measure_peak() as m:
        a = torch.empty(2**20, device="cuda")  # 4 MiB
    assert m.peak_bytes == 4 * 2**20
    assert m.cuda_peak_bytes is not None and m.cuda_peak_bytes >= 4 * 2**20
    del a
