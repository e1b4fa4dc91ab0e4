"""What is particular to Activity (its generic properties are in test_base.py, over tests/support/strategies.py):
activation vs parameter inputs, per-example contraction on real modules, the batch-separability
requirement, and clear errors. Guessed's: test_guessed.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import madfunc as mf

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 5, dtype=DT, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_activity_perturbs_activations_per_example_and_parameters_jointly() -> None:
    """inspect's stats: the activation input (x @ w) counts per example, the segment's own parameter as a
    parameter; k tangents, one pass (plus the one-off separability check)."""
    x, y = _data()
    w, w2 = torch.randn(5, 4, dtype=DT), torch.randn(4, 3, dtype=DT)
    seg = mf.fwd(lambda z, w2: F.cross_entropy(torch.tanh(z) @ w2, y, reduction="none"), name="head")
    report = mf.inspect(lambda w, w2: seg(x @ w, w2).mean(), {"head": mf.Activity(k=3)}, w, w2, argnums=(0, 1))
    (row,) = report.rows
    assert row.differentiated_numel == 8 * 4 + 4 * 3 and row.tangents == 3


def test_activity_on_modules_under_use_plan_is_unbiased() -> None:
    """nn.Linear -> [Tanh -> Linear -> per-example loss] with Activity(k=2) on the bracket, under use_plan:
    the first layer's gradient (through the estimated activation cotangent) averages to backprop's.
    Test: |z| <= 5 on the projection of the mean onto the exact gradient (two-sided tail 5.7e-7)."""
    torch.manual_seed(0)
    x, y = _data(1)
    first = torch.nn.Linear(5, 6).double()
    rest = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    seg = mf.fwd(lambda z: F.cross_entropy(rest(z), y, reduction="none"), name="rest")
    F.cross_entropy(rest(first(x)), y, reduction="none").mean().backward()
    exact = first.weight.grad.clone().reshape(-1)
    draws = []
    for _ in range(1500):
        first.zero_grad()
        with mf.use_plan({"rest": mf.Activity(k=2)}):
            seg(first(x)).mean().backward()
        draws.append(first.weight.grad.reshape(-1).clone())
    u = torch.stack(draws) @ exact / exact.dot(exact)
    z = (float(u.mean()) - 1) / (float(u.std()) / math.sqrt(len(u)))
    assert abs(z) <= 5, (float(u.mean()), z)


def test_activity_refuses_a_segment_that_mixes_examples() -> None:
    """BatchNorm in training mode makes example b's output depend on every example: refused, by name."""
    bn = torch.nn.BatchNorm1d(4).double().requires_grad_(False)
    seg = mf.fwd(lambda z: bn(z).pow(2).sum(1), name="bn_block")
    x, _ = _data()
    w = torch.randn(5, 4, dtype=DT)
    with pytest.raises(ValueError, match=r"segment 'bn_block': Activity needs a batch-separable segment"):
        mf.mixed_grad(lambda w: seg(x @ w).sum(), {"bn_block": mf.Activity(k=2)})(w)
    bn.eval()  # running statistics: separable
    mf.mixed_grad(lambda w: seg(x @ w).sum(), {"bn_block": mf.Activity(k=2)})(w)


def test_activity_needs_per_example_outputs() -> None:
    x, y = _data()
    seg = mf.fwd(lambda z: F.cross_entropy(z, y), name="mean_loss")  # reduced over the batch inside
    with pytest.raises(ValueError, match=r"segment 'mean_loss': Activity contracts per example.*shape \[\]"):
        mf.mixed_grad(lambda w: seg(x @ w), {"mean_loss": mf.Activity()})(torch.randn(5, 3, dtype=DT))


def test_activity_batch_dim() -> None:
    """Sequence-first inputs (T, B, m): batch_dim=1 is exact in expectation; batch_dim=0 mixes time steps
    (an LSTM-like recurrence over dim 0) and is refused."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 6, 5, dtype=DT, generator=g), torch.randn(5, 5, dtype=DT, generator=g)
    seg = mf.fwd(lambda z: torch.tanh(z.cumsum(0)), name="recur")
    loss = lambda w: seg(x @ w).pow(2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="batch-separable"):
        mf.mixed_grad(loss, {"recur": mf.Activity(k=2)})(w)
    got = mf.mixed_grad(loss, {"recur": mf.Activity(k=2, batch_dim=1)})(w)
    assert got.shape == w.shape and torch.isfinite(got).all()


def test_activity_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"Activity\(distribution='orthogonal'\).*per example"):
        mf.Activity(distribution="orthogonal")
    with pytest.raises(ValueError, match=r"Activity\(k=0\): k must be >= 1"):
        mf.Activity(k=0)
    with pytest.raises(ValueError, match=r"Activity\(batch_dim=-1\)"):
        mf.Activity(batch_dim=-1)
    assert mf.Activity(batch_dim=(1, 0)) == mf.Activity(batch_dim=(0, 1)) and mf.Activity(batch_dim=(2,)).batch_dim == 2
    assert mf.Plan.from_string(str(mf.Plan({"a": mf.Activity(batch_dim=(3, 0))})))["a"] == mf.Activity(batch_dim=(0, 3))


def test_activity_over_examples_and_groups() -> None:
    """Ren et al.'s local losses per group of channels: z of shape (B, G, m) with one loss per example and
    group; Activity(batch_dim=(0, 1)) contracts per (example, group), so the relative variance is
    (m+1)/k with m the width of one group, not of the example. 1000 draws; |z| <= 5 on the mean
    projection and on the variance (two-sided normal tails 5.7e-7; see test_base.py for the margin
    of the skewed squared errors): false-failure rate below 2e-5."""
    g_ = torch.Generator().manual_seed(9)
    b, groups, m, k = 5, 3, 4, 2
    z0 = torch.randn(b, groups, m, dtype=DT, generator=g_)
    heads = torch.randn(groups, m, 3, dtype=DT, generator=g_)
    c = torch.randn(b, groups, 3, dtype=DT, generator=g_)
    body = lambda z: (torch.einsum("bgm,gmc->bgc", torch.tanh(z), heads) * c).sum(-1)  # noqa: E731
    seg = mf.fwd(body, name="groups")
    exact = torch.func.grad(lambda z: body(z).sum())(z0).reshape(-1)
    grad = mf.mixed_grad(lambda zs: sum(seg(z + 0.0).sum() for z in zs), {"groups": mf.Activity(k, batch_dim=(0, 1))})
    torch.manual_seed(2)
    draws = torch.stack([d.reshape(-1) for _ in range(2) for d in grad([z0.clone() for _ in range(500)])])
    u = draws @ exact / exact.dot(exact)
    z = (float(u.mean()) - 1) / (float(u.std()) / math.sqrt(len(u)))
    assert abs(z) <= 5, (float(u.mean()), z)
    r = ((draws - exact) ** 2).sum(1) / exact.dot(exact)
    theory = (m + 1) / k
    z = (float(r.mean()) - theory) / (float(r.std()) / math.sqrt(len(r)))
    assert abs(z) <= 5, (float(r.mean()), theory, z)
    mixing = mf.fwd(lambda z: torch.tanh(z).sum(-1, keepdim=True).expand(-1, -1, m), name="mixing")
    with pytest.raises(ValueError, match="batch-separable"):  # units along dim 2 that the body sums over
        mf.mixed_grad(lambda z: mixing(z + 0.0).sum(), {"mixing": mf.Activity(k, batch_dim=(0, 2))})(z0)


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_activity_on_ordinary_sequence_models(kind: str) -> None:
    """Linear embedding (reverse) -> [TransformerEncoderLayer(batch_first) or LSTM(batch_first)] as an
    Activity segment in training mode -> mean-pool head: the embedding's gradient averages to backprop's
    (400 draws, |z| <= 5 on the mean projection: two-sided tail 5.7e-7). Seq-first LSTM input needs
    batch_dim=1 and is refused without it."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 5, 8, dtype=DT), torch.tensor([0, 1, 2, 0])
    emb, head = torch.nn.Linear(8, 8).double(), torch.nn.Linear(8, 3).double()
    if kind == "transformer":
        body = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    else:
        lstm = torch.nn.LSTM(8, 8, batch_first=True).double()
        body = lambda h: lstm(h)[0]  # noqa: E731
    seg = mf.fwd(body, name="body")

    def loss() -> torch.Tensor:
        return F.cross_entropy(head(seg(emb(x)).mean(1)), y)

    loss().backward()
    exact = emb.weight.grad.reshape(-1).clone()
    draws = []
    for _ in range(400):
        emb.zero_grad()
        with mf.use_plan({"body": mf.Activity(k=2)}):
            loss().backward()
        draws.append(emb.weight.grad.reshape(-1).clone())
    u = torch.stack(draws) @ exact / exact.dot(exact)
    z = (float(u.mean()) - 1) / (float(u.std()) / math.sqrt(len(u)))
    assert abs(z) <= 5, (float(u.mean()), z)
    if kind == "lstm":
        seq_first = torch.nn.LSTM(8, 8).double()
        seg_sf = mf.fwd(lambda h: seq_first(h)[0], name="seq_first")
        with pytest.raises(ValueError, match="batch-separable"), mf.use_plan({"seq_first": mf.Activity(k=2)}):
            seg_sf(emb(x).transpose(0, 1)).sum().backward()
        with mf.use_plan({"seq_first": mf.Activity(k=2, batch_dim=1)}):
            seg_sf(emb(x).transpose(0, 1)).sum().backward()


def test_activity_draws_per_rank_tangents_and_random_shares_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks usually share torch's seed. Activity's per-example tangents must differ across ranks (N ranks of
    B examples then estimate like one process with N*B examples); Random's are shared (its coefficients
    reduce over ranks)."""
    x, y = _data()
    w, w2 = torch.randn(5, 4, dtype=DT), torch.randn(4, 3, dtype=DT)
    seg = mf.fwd(lambda z: F.cross_entropy(torch.tanh(z) @ w2, y, reduction="none"), name="head")

    def estimate(strategy: mf.Strategy, rank: int | None) -> torch.Tensor:
        if rank is not None:
            monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
            monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        torch.manual_seed(0)
        return mf.mixed_grad(lambda w: seg(x @ w).mean(), {"head": strategy})(w)

    alone, rank0, rank1 = (estimate(mf.Activity(k=2), r) for r in (None, 0, 1))
    assert not torch.equal(rank0, rank1) and not torch.equal(alone, rank1)
    assert torch.equal(estimate(mf.Random(2), 0), estimate(mf.Random(2), 1))


@pytest.mark.parametrize("strategy", [mf.Random(1, seeding="kept"), mf.Activity(1, seeding="kept")], ids=repr)
def test_kept_tangents_survive_a_second_backward(strategy: mf.Strategy) -> None:
    """seeding="kept": backward reuses the forward pass's tangents, so they must not be overwritten in place
    (the k=1 fast path of regenerated ones does): backward twice (retain_graph) gives one gradient twice.
    inspect counts the kept tangents in what the segment keeps."""
    x, _ = _data()
    w = torch.randn(5, 4, dtype=DT, requires_grad=True)
    w2 = torch.randn(4, 3, dtype=DT, requires_grad=True)
    seg = mf.fwd(lambda z, w2: torch.tanh(z) @ w2, name="layer")
    with mf.use_plan({"layer": strategy}):
        out = seg(x @ w, w2).pow(2).sum()
    first = torch.autograd.grad(out, (w, w2), retain_graph=True)
    again = torch.autograd.grad(out, (w, w2))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    report = mf.inspect(lambda w, w2: seg(x @ w, w2).pow(2).sum(), {"layer": strategy}, w.detach(), w2.detach(),
                        argnums=(0, 1))
    kept = (8 * 4 + 4 * 3) * 8  # one tangent per differentiated scalar, float64
    assert report.rows[0].saved_bytes == 8 * 3 * 8 + kept  # output tangents (1 x 8 x 3) + kept tangents
