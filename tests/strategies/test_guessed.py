"""What is particular to Guessed (its generic properties are in test_base.py, over tests/support/strategies.py):
errors naming the segment, compare's bias and cosine of a guess, a zero guess."""

from __future__ import annotations

import math

import pytest
import torch

import madfunc as mf

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def test_guessed_errors_name_the_segment_and_expected_shapes() -> None:
    seg = mf.fwd(lambda w, x: torch.tanh(x @ w), name="layer")
    x, w = torch.randn(4, 3, dtype=DT), torch.randn(3, 2, dtype=DT)
    bad = mf.Guessed(lambda w, x: [torch.ones(2, 3)])
    with pytest.raises(ValueError, match=r"segment 'layer': Guessed's guess .* shapes \[\[3, 2\]\].*got \[\[2, 3\]\]"):
        mf.mixed_grad(lambda w: seg(w, x).sum(), {"layer": bad})(w)
    with pytest.raises(TypeError, match="expected a callable"):
        mf.Guessed(guess=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Guessed\(k=-1\)"):
        mf.Guessed(lambda *a: [None], k=-1)


def test_compare_reports_the_bias_and_cosine_of_a_guess() -> None:
    """Guessed(k=0) returns (g.d) d: compare's cosine is cos t and its bias along g is -sin^2 t."""
    seg = mf.fwd(lambda w, x: torch.tanh(x @ w), name="layer")
    g_ = torch.Generator().manual_seed(5)
    x, w = torch.randn(4, 3, dtype=DT, generator=g_), torch.randn(3, 2, dtype=DT, generator=g_)
    exact = torch.func.grad(lambda w: torch.tanh(x @ w).sum())(w)
    guess = exact + 0.8 * exact.norm() * torch.randn(3, 2, dtype=DT, generator=g_) / math.sqrt(6)
    cos = float((guess * exact).sum() / (guess.norm() * exact.norm()))
    report = mf.compare(lambda w: seg(w, x).sum(), {"layer": mf.Guessed(lambda w, x: [guess])}, w)
    figures = report.per_segment["layer"]
    assert figures.cosine == pytest.approx(cos, rel=1e-9)
    assert figures.bias == pytest.approx(cos**2 - 1, rel=1e-9)


def test_guessed_with_a_zero_guess_is_the_random_part_alone() -> None:
    seg = mf.fwd(lambda w, x: torch.tanh(x @ w), name="layer")
    x, w = torch.randn(4, 3, dtype=DT), torch.randn(3, 2, dtype=DT)
    zero = mf.Guessed(lambda w, x: [None])
    assert torch.equal(mf.mixed_grad(lambda w: seg(w, x).sum(), {"layer": zero})(w), torch.zeros(3, 2, dtype=DT))
    torch.manual_seed(0)
    with_random = mf.mixed_grad(lambda w: seg(w, x).sum(), {"layer": mf.Guessed(lambda w, x: [None], k=2)})(w)
    torch.manual_seed(0)
    plain_random = mf.mixed_grad(lambda w: seg(w, x).sum(), {"layer": mf.Random(k=2)})(w)
    torch.testing.assert_close(with_random, plain_random)
