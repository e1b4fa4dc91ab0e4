"""madfunc.compare and madfunc.inspect: values against exact references and closed-form theory.

Statistical checks use Bernstein's inequality with the exact mean and variance of the per-draw
statistic, enumerated (Rademacher) or in closed form (orthogonal): each check fails falsely with
probability <= 1e-5, so the four checks in this file together fail falsely with probability < 1e-4.
The seeds are fixed, so a run is reproducible.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import madfunc as mf
from madfunc.tools.diagnostics import _t_quantile

DELTA = 1e-5  # false-failure probability of one statistical check


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only add contention (a 6x2 QR takes 15 ms with 2 busy threads, 12 us with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bernstein(draws: int, variance: float, bound: float, delta: float = DELTA) -> float:
    """t with P(|mean of `draws` iid - mu| >= t) <= delta, for |X - mu| <= bound and Var X = variance."""
    log = math.log(2 / delta)
    linear = 2 * bound * log / 3
    return (linear + math.sqrt(linear**2 + 8 * draws * log * variance)) / (2 * draws)


def one_segment_model(n_in: int = 3, n_out: int = 2, batch: int = 5):
    torch.manual_seed(1)
    layer = mf.fwd(lambda w, x: torch.tanh(x @ w), name="layer")

    def loss(w, x):
        return (layer(w, x) - 0.3).pow(2).sum()

    w = torch.randn(n_in, n_out, dtype=torch.float64)
    x = torch.randn(batch, n_in, dtype=torch.float64)
    return loss, w, x


def two_segment_model():
    torch.manual_seed(2)
    first = mf.fwd(lambda a, x: torch.tanh(x @ a), name="first")
    second = mf.fwd(lambda b, h: torch.sin(h @ b), name="second")

    def loss(p, x):
        return second(p["b"], first(p["a"], x)).pow(2).sum()

    params = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, 2, dtype=torch.float64)}
    return loss, params, torch.randn(6, 3, dtype=torch.float64)


def test_exact_plan_has_cosine_one_and_zero_error():
    loss, params, x = two_segment_model()
    report = mf.compare(loss, {"first": "exact", "second": mf.Exact(chunk_size=3)}, params, x, draws=3)
    for figures in (report.overall, *report.per_segment.values()):
        assert figures.cosine == pytest.approx(1.0, abs=1e-12)
        assert figures.relative_error < 1e-12
        assert figures.variance < 1e-24
        assert abs(figures.bias) < 1e-12 and figures.bias_norm < 1e-12
    assert list(report.per_segment) == ["first", "second"]
    assert report.time_plan > 0 and report.time_reference > 0
    assert json.loads(json.dumps(report.to_dict()))["per_segment"]["first"]["cosine"] == pytest.approx(1.0)
    assert "first" in str(report) and "second" in str(report)


def test_reference_plan_replaces_backprop():
    loss, params, x = two_segment_model()
    report = mf.compare(
        loss, {"first": "rev"}, params, x, reference={"first": "exact", "second": "exact"}, draws=1
    )
    assert report.relative_error < 1e-12
    assert report.reference.startswith("Plan(")


def rademacher_moments(g: torch.Tensor, k: int) -> tuple[float, float, float, float, float]:
    """Exact mean, variance and bound of X = ||g^-g||^2/||g||^2 and of B = <g^-g, g>/||g||^2 over all
    sign vectors (g^ = mean over k tangents of (v.g) v)."""
    n = g.numel()
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=torch.float64)
    single = (signs @ g)[:, None] * signs  # (2^n, n): one tangent's estimate
    combos = torch.stack(
        [single[list(idx)].mean(0) for idx in itertools.product(range(len(signs)), repeat=k)]
    )
    x = (combos - g).pow(2).sum(1) / g.dot(g)
    b = (combos - g) @ g / g.dot(g)
    return (
        float(x.mean()),
        float(x.var(unbiased=False)),
        float((x - x.mean()).abs().max()),
        float(b.var(unbiased=False)),
        float(b.abs().max()),
    )


def test_rademacher_variance_and_bias_match_theory():
    loss, w, x = one_segment_model()
    k, draws = 2, 1500
    g = torch.func.grad(loss)(w, x).reshape(-1)
    mean, var, bound, bias_var, bias_bound = rademacher_moments(g, k)
    n = g.numel()
    assert mean == pytest.approx((n - 1) / k, rel=1e-12)  # the closed form, checked by enumeration

    torch.manual_seed(0)
    report = mf.compare(loss, {"layer": mf.Random(k=k, distribution="rademacher")}, w, x, draws=draws)
    seg = report.per_segment["layer"]
    assert seg.variance_theory == (n - 1) / k and seg.differentiated == n
    assert seg.variance == report.variance  # one segment: the same draws
    assert abs(report.variance - mean) <= bernstein(draws, var, bound)
    assert abs(report.bias) <= bernstein(draws, bias_var, bias_bound)
    assert report.bias_ci[0] < report.bias < report.bias_ci[1]


def test_orthogonal_variance_matches_theory():
    loss, w, x = one_segment_model()
    n, k, draws = w.numel(), 2, 1500
    # g^ = (n/k) P g with P a uniform rank-k projection: X = (n/k)(n/k - 2) u + 1, u ~ Beta(k/2, (n-k)/2).
    a, b, c = k / 2, (n - k) / 2, (n / k) * (n / k - 2)
    mean = c * a / (a + b) + 1
    var = c**2 * a * b / ((a + b) ** 2 * (a + b + 1))
    bound = max(abs(1 - mean), abs(c + 1 - mean))
    assert mean == pytest.approx(n / k - 1)

    torch.manual_seed(0)
    report = mf.compare(loss, {"layer": mf.Random(k=k, distribution="orthogonal")}, w, x, draws=draws)
    assert report.per_segment["layer"].variance_theory == n / k - 1
    assert report.variance_theory == n / k - 1  # the segment's estimate is the whole gradient here
    assert abs(report.variance - mean) <= bernstein(draws, var, bound)


def test_per_segment_attribution_follows_the_noise():
    loss, params, x = two_segment_model()
    plan = {"first": mf.Random(k=3), "second": mf.Random(k=3, distribution="rademacher")}
    torch.manual_seed(0)
    report = mf.compare(loss, plan, params, x, draws=4)
    # `first` differentiates only its parameters; `second` also its activation input, so its error
    # flows back into `a` as well.
    assert report.per_segment["first"].leaves == ("a",)
    assert report.per_segment["first"].differentiated == 12
    assert report.per_segment["second"].leaves == ("a", "b")
    assert report.per_segment["second"].differentiated == 8 + 6 * 4
    # The (n-1)/k law is about `second`'s own inputs; the measured leaves include `a`, reached through the
    # estimated cotangent of its activation input: no theory is claimed there.
    assert report.per_segment["second"].variance_theory is None
    assert report.per_segment["first"].variance_theory == (12 + 1) / 3
    assert report.overall.leaves == ("a", "b") and report.variance_theory is None

    exact_second = mf.compare(loss, {"first": mf.Random(k=3), "second": "rev"}, params, x, draws=2)
    assert exact_second.per_segment["second"].relative_error == 0.0


def test_compare_errors_name_the_problem():
    loss, w, x = one_segment_model()
    with pytest.raises(ValueError, match=r"madfunc.compare\(draws=0\): draws must be an int >= 1"):
        mf.compare(loss, {}, w, x, draws=0)
    with pytest.raises(
        ValueError, match=r"plan key.* 'layr' matched no segment that ran. Segments that ran: 'layer'"
    ):
        mf.compare(loss, {"layr": "exact"}, w, x, draws=1)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 3, 5, 10, 31, 100):
        assert _t_quantile(dof) == pytest.approx(stats.t.ppf(0.975, dof), rel=2e-3)


def test_inspect_reports_sizes_and_bytes():
    torch.manual_seed(0)
    batch, n_in, n_out, k = 7, 16, 3, 5
    layer = mf.fwd(torch.nn.Linear(n_in, n_out), name="layer")
    wide = mf.fwd(lambda h: torch.tanh(h).repeat(1, 50), name="wide")
    head = mf.rev(lambda h: h.pow(2).sum(), name="head")

    def loss(params, x):
        return head(wide(layer(params, x)))

    params, x = dict(layer.module.named_parameters()), torch.randn(batch, n_in)
    report = mf.inspect(loss, {"layer": mf.Random(k=k), "wide": "exact"}, params, x)
    rows = {row.name: row for row in report.rows}
    n = n_in * n_out + n_out
    assert rows["layer"].differentiated == {"arg0": n, "arg1": 0}
    assert (rows["layer"].tangents, rows["layer"].output_numel) == (k, batch * n_out)
    assert rows["layer"].saved_bytes == k * batch * n_out * 4  # float32 output tangents
    assert rows["layer"].reverse_saved_bytes == batch * n_in * 4  # backprop keeps the input x
    assert rows["layer"].flags == ()
    # Exact over the activation input: one tangent per input scalar, each the size of the output.
    assert rows["wide"].tangents == batch * n_out and rows["wide"].output_numel == batch * n_out * 50
    assert rows["wide"].saved_bytes == (batch * n_out) ** 2 * 50 * 4
    assert rows["head"].strategy == "Reverse()" and rows["head"].tangents == 0
    assert rows["head"].saved_bytes == batch * n_out * 50 * 4  # pow keeps its input
    assert rows["head"].reverse_saved_bytes is None
    assert len(report.flags) == 1
    assert report.flags[0] == (
        "wide: keeps 86.1 KiB for backward (21 tangents x 1050 outputs) (largest differentiated input: arg0, "
        "21 scalars); backprop would keep 84 B: Reverse() or Random(k) with a small k is cheaper here."
    )
    assert "(!) wide: keeps" in str(report)
    assert json.loads(json.dumps(report.to_dict()))["rows"][0]["tangents"] == k


def test_inspect_flags_random_with_k_at_least_n_and_lists_nested_segments():
    inner = mf.rev(lambda h: torch.sin(h), name="inner")
    outer = mf.fwd(lambda w, x: inner(x * w).sum(dim=1), name="outer")
    w, x = torch.randn(3), torch.randn(4, 3)
    report = mf.inspect(lambda w, x: outer(w, x).sum(), {"outer": mf.Random(k=3)}, w, x)
    assert [(row.name, row.nested_in) for row in report.rows] == [("outer", None), ("inner", "outer")]
    assert report.flags == (
        "outer: k = 3 >= n = 3 differentiated scalars: Exact() gives the exact gradient with 3 tangents; "
        "use Exact() or a smaller k.",
    )
    assert "(inside outer)" in str(report)
