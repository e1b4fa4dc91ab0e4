"""Generic tests over the strategies-under-test table (tests/support/strategies.py): every row, every setting.

* deterministic rows equal their value in float64 (Exact: torch.func.grad; Guessed(k=0): the projection
  of the gradient on the guess); stochastic rows are unbiased and their relative variance matches theory;
* the same ``torch.manual_seed`` gives the same estimate, another seed another one;
* lazy seeding gives what eager seeding gives;
* ``torch.func.vmap`` over ``mixed_grad`` equals a loop under the same seed;
* ``inspect``/``compare`` report the same schema for every row, and the string form round-trips.

False-failure rates (seeds are fixed; the rate is for a seed chosen at random), as in
test_random.py: each of the three statistical assertions of ``test_mean_and_variance`` is set at
a two-sided normal tail of 5.7e-7 (``|z| <= 5``, with an Edgeworth margin for the skewed squared errors
keeping it below 1e-5) or a chi-square(1) tail of 1e-6 (``T <= 23.9``, a bound for any Gaussian quadratic
form), so each test fails falsely with probability below 3e-5.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import record_relative_variance
from scipy import stats
from support.strategies import STRATEGIES, Row, Setting, body, make_setting

import madfunc as mf
from madfunc.plan import parse_strategy
from madfunc.strategies.tangents import DISTRIBUTIONS

Z_MAX = 5.0
T_MAX = float(stats.chi2.isf(1e-6, 1))
COPIES = 500  # independent segment calls (draws) per mixed_grad call

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {name: make_setting(name) for name in ("activations", "joint")}
CASES = [pytest.param(row, name, id=f"{row.id}-{name}") for row in STRATEGIES for name in SETTINGS]
SEG = mf.fwd(body, name="seg")


def _draws(strategy: mf.Strategy, s: Setting, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` estimates of the segment's input gradient, one per row: each copy of the model is its own
    segment call (own tangents), so one mixed_grad call gives COPIES independent draws."""

    def loss(copies):
        total = 0.0
        for copy in copies:
            z0, w2 = copy if s.joint else (copy, s.w2)
            total = total + (SEG(z0 + 0.0, w2) * s.c).sum()  # z0 + 0: an activation, computed upstream
        return total

    grad = mf.mixed_grad(loss, {"seg": strategy})
    torch.manual_seed(seed)
    rows = []
    for _ in range(max(count // COPIES, 1)):
        copies = [(s.z0.clone(), s.w2.clone()) if s.joint else s.z0.clone() for _ in range(min(count, COPIES))]
        for g in grad(copies):
            rows.append(torch.cat([t.reshape(-1) for t in g]) if s.joint else g.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize(("row", "setting"), CASES)
def test_mean_and_variance(row: Row, setting: str) -> None:
    s = SETTINGS[setting]
    strategy = row.strategy(s)
    g = s.exact
    if row.expected is not None:
        torch.testing.assert_close(_draws(strategy, s, 1)[0], row.expected(s), rtol=1e-10, atol=1e-12)
        return
    k = getattr(strategy, "k", 1)
    draws = _draws(strategy, s, 2000 if k == 1 else 1000, seed=1234)
    n_draws, mean = draws.shape[0], draws.mean(0)
    t_stat = n_draws * float(((mean - g) ** 2).sum()) / float(draws.var(0).sum())
    assert t_stat <= T_MAX, f"mean of draws is off: T = {t_stat:.2f} > {T_MAX:.1f}"
    u = draws @ g / g.dot(g)
    z = (float(u.mean()) - 1.0) / (float(u.std()) / math.sqrt(n_draws))
    assert abs(z) <= Z_MAX, f"mean projection on g is {float(u.mean()):.4f} (z = {z:.2f})"
    theory = row.theory(s) if row.theory is not None else None
    if theory is None:
        return
    r = ((draws - g) ** 2).sum(1) / g.dot(g)
    record_relative_variance(f"{row.id} ({setting}, n={s.n})", float(r.mean()), theory)
    z = (float(r.mean()) - theory) / (float(r.std()) / math.sqrt(n_draws))
    assert abs(z) <= Z_MAX, f"relative variance {float(r.mean()):.3f} vs theory {theory:.3f} (z = {z:.2f})"


@pytest.mark.parametrize(("row", "setting"), CASES)
def test_seed_reproducibility(row: Row, setting: str) -> None:
    s = SETTINGS[setting]
    strategy = row.strategy(s)
    first, again, other = (_draws(strategy, s, 1, seed)[0] for seed in (5, 5, 6))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert strategy.stochastic == (not torch.equal(first, other))


def _seeded_lazily(row: Row) -> bool:
    """Rows with a seeding option whose tangents can be drawn leaf by leaf (not orthogonal ones)."""
    strategy = row.strategy(SETTINGS["joint"])
    return hasattr(strategy, "seeding") and DISTRIBUTIONS[strategy.distribution].draw is not None


@pytest.mark.parametrize(("row", "setting"), [c for c in CASES if _seeded_lazily(c.values[0])])
def test_lazy_and_kept_equal_eager(row: Row, setting: str) -> None:
    s = SETTINGS[setting]
    strategy = row.strategy(s)
    lazy, eager, kept = (
        _draws(dataclasses.replace(strategy, seeding=x), s, 1, 3)[0] for x in ("lazy", "eager", "kept")
    )
    torch.testing.assert_close(lazy, eager, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kept, eager, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("row", "setting"), CASES)
def test_vmap_equals_a_loop_under_the_same_seed(row: Row, setting: str) -> None:
    s = SETTINGS[setting]
    strategy = row.strategy(s)
    zs = torch.stack([s.z0, 2 * s.z0, -s.z0])

    def loss(z0, w2):
        return (SEG(z0 + 0.0, w2) * s.c).sum()

    argnums = (0, 1) if s.joint else 0
    grad = mf.mixed_grad(loss, {"seg": strategy}, argnums=argnums)
    torch.manual_seed(11)
    # Random tangents under vmap: one set shared by the vmapped batch (randomness="same"), as in the loop.
    batched = torch.func.vmap(grad, in_dims=(0, None), randomness="same")(zs, s.w2)
    for i in range(zs.shape[0]):
        torch.manual_seed(11)
        one = grad(zs[i], s.w2)
        for got, want in zip(batched if s.joint else (batched,), one if s.joint else (one,), strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("row", "setting"), CASES)
def test_report_schema(row: Row, setting: str) -> None:
    s = SETTINGS[setting]
    strategy = row.strategy(s)
    argnums = (0, 1) if s.joint else 0
    report = mf.inspect(lambda z0, w2: (SEG(z0 + 0.0, w2) * s.c).sum(), {"seg": strategy}, s.z0, s.w2,
                        argnums=argnums)
    (seg_row,) = report.rows
    assert seg_row.strategy == repr(strategy) and seg_row.differentiated_numel == s.n
    assert seg_row.saved_bytes > 0 and (seg_row.tangents >= 1 if strategy.is_forward else seg_row.tangents == 0)
    compared = mf.compare(lambda z0, w2: (SEG(z0 + 0.0, w2) * s.c).sum(), {"seg": strategy}, s.z0, s.w2,
                          draws=3, argnums=argnums)
    figures = compared.per_segment["seg"]
    assert figures.differentiated == s.n and figures.draws == (3 if strategy.stochastic else 1)
    if row.expected is not None and row.theory is not None:  # exact
        assert figures.cosine == pytest.approx(1.0)


@pytest.mark.parametrize("row", STRATEGIES, ids=lambda r: r.id)
def test_string_form(row: Row) -> None:
    strategy = row.strategy(SETTINGS["joint"])
    if isinstance(strategy, mf.Guessed):
        with pytest.raises(TypeError, match="no string form"):
            str(strategy)
        return
    assert parse_strategy(str(strategy)) == strategy
    assert mf.Plan.from_string(f"seg={strategy}")["seg"] == strategy
