"""mixed_grad / use_plan behaviours around other transforms: vmap, higher order, no_grad, nesting."""

from __future__ import annotations

import pytest
import torch

import madfunc as mf

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


def _data():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, generator=g, dtype=DT)
    x = torch.randn(5, 3, generator=g, dtype=DT)
    return w, x


def _loss_with(seg):
    return lambda w, x: seg(w, x).pow(2).sum()


def test_higher_order_through_a_forward_segment_is_refused():
    """grad of mixed_grad would silently miss the tangents' own dependence on w (Hessian off by ~8)."""
    w, x = _data()
    loss = _loss_with(mf.fwd(lambda w, x: torch.tanh(x @ w), name="s"))
    with pytest.raises(NotImplementedError, match=r"segment 's': .*differentiated again.*first-order"):
        torch.func.grad(lambda w: mf.mixed_grad(loss)(w, x).pow(2).sum())(w)
    with pytest.raises(NotImplementedError, match=r"segment 's': .*first-order gradients only"):
        torch.func.hessian(lambda w: mf.mixed_grad(loss)(w, x).sum())(w)
    with pytest.raises(NotImplementedError, match=r"segment 's': forward-mode AD .* not supported"):
        torch.func.jvp(lambda w: mf.mixed_grad(loss)(w, x), (w,), (torch.ones_like(w),))


def test_create_graph_under_use_plan_is_refused():
    w, x = _data()
    seg = mf.fwd(lambda w, x: torch.tanh(x @ w), name="s")
    w = w.clone().requires_grad_()
    with mf.use_plan():
        loss = seg(w, x).pow(2).sum()
    with pytest.raises(NotImplementedError, match=r"segment 's': .*create_graph=True"):
        torch.autograd.grad(loss, w, create_graph=True)


def test_higher_order_through_reverse_segments_only_still_works():
    """Only forward segments limit the order: an all-reverse plan is plain torch.func."""
    w, x = _data()
    loss = _loss_with(mf.fwd(lambda w, x: torch.tanh(x @ w), name="s"))
    got = torch.func.hessian(lambda w: mf.mixed_grad(loss, {"s": "rev"})(w, x).sum())(w)
    want = torch.func.hessian(lambda w: torch.func.grad(loss)(w, x).sum())(w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_per_example_random_gradients_need_shared_randomness():
    w, x = _data()
    loss = lambda w, x: mf.fwd(lambda w, x: torch.tanh(x @ w), name="s")(w, x).pow(2).sum()  # noqa: E731
    per_example = mf.mixed_grad(loss, {"s": mf.Random(k=3, distribution="rademacher")})
    with pytest.raises(
        RuntimeError,
        match=r"segment 's': a Random strategy under torch.func.vmap needs "
        r"vmap\(\.\.\., randomness='same'\)",
    ):
        torch.func.vmap(per_example, in_dims=(None, 0))(w, x)
    torch.manual_seed(3)
    got = torch.func.vmap(per_example, in_dims=(None, 0), randomness="same")(w, x)
    torch.manual_seed(3)
    again = torch.func.vmap(per_example, in_dims=(None, 0), randomness="same")(w, x)
    assert torch.equal(got, again)
    # Every example's estimate is a combination of the same k = 3 directions: the stacked per-example
    # estimates span at most 3 dimensions (independent tangents per example would span 5).
    assert torch.linalg.matrix_rank(got.reshape(5, -1)) <= 3


def test_per_example_exact_gradients_match_torch_func():
    w, x = _data()
    loss = _loss_with(mf.fwd(lambda w, x: torch.tanh(x @ w), name="s"))
    got = torch.func.vmap(mf.mixed_grad(loss), in_dims=(None, 0))(w, x)
    want = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_no_grad_evaluation_runs_forward_segments_as_plain_code():
    layer = torch.nn.Linear(3, 2).double()
    seg = mf.fwd(layer, name="layer")
    x = torch.randn(4, 3, dtype=DT)
    with mf.use_plan({"layer": mf.Random(k=2)}):
        with torch.no_grad():
            y = seg(x)
        state = mf.engine.context.active()
        assert state is not None and state.calls[-1].stats.tangents == 0
    assert not y.requires_grad
    torch.testing.assert_close(y, layer(x).detach())


def test_plan_key_for_a_segment_nested_in_a_forward_segment_is_an_error():
    inner = mf.fwd(torch.sin, name="inner")
    outer = mf.fwd(lambda w: inner(w) * 2, name="outer")
    loss = lambda w: outer(w).sum()  # noqa: E731
    w = torch.randn(3, dtype=DT)
    with pytest.raises(
        ValueError,
        match=r"plan key 'inner' matches only segment 'inner', which ran inside "
        r"forward segment 'outer'.*no effect",
    ):
        mf.mixed_grad(loss, {"inner": "rev"})(w)
    # A pattern that also reaches a top-level segment is fine, and the outer one decides.
    torch.testing.assert_close(mf.mixed_grad(loss, {"*": "exact"})(w), 2 * torch.cos(w))
    # With the outer segment reverse, the inner one runs on its own and its key applies.
    torch.testing.assert_close(mf.mixed_grad(loss, {"outer": "rev", "inner": "exact"})(w), 2 * torch.cos(w))


def test_segment_called_outside_any_transform_is_the_plain_function():
    calls = []

    def body(w):
        calls.append(type(w))
        return w * 2

    seg = mf.fwd(body, name="body")
    w = torch.randn(3, dtype=DT)
    assert torch.equal(seg(w), w * 2)
    torch.testing.assert_close(torch.func.grad(lambda w: seg(w).sum())(w), torch.full_like(w, 2.0))
    assert mf.engine.context.active() is None


def test_exact_refuses_a_basis_that_cannot_fit_before_allocating_it():
    seg = mf.fwd(lambda w, x: torch.tanh(x @ w), name="big")
    w, x = torch.zeros(512, 512), torch.zeros(2, 512)  # 262144 basis tangents of 1 MiB each: 256 GiB
    with pytest.raises(MemoryError, match=r"segment 'big': Exact\(\) would push 262144 basis tangents.*256\.0 GiB"
                       r".*Exact\(chunk_size=\.\.\.\)"):
        mf.mixed_grad(lambda w, x: seg(w, x).sum())(w, x)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_lazy_and_eager_seeding_give_bit_identical_gradients(distribution):
    """Seeding only changes when tangents are drawn, never which: same seed, same gradient, bit for bit."""
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(6, 6, generator=g, dtype=DT) for _ in range(3)]
    x = torch.randn(4, 6, generator=g, dtype=DT)
    seg = mf.fwd(lambda ps, x: torch.tanh(torch.tanh(torch.tanh(x @ ps[0]) @ ps[1]) @ ps[2]), name="mlp")
    grads = {}
    for seeding in ("lazy", "eager"):
        torch.manual_seed(5)
        plan = {"mlp": mf.Random(k=3, distribution=distribution, seeding=seeding)}
        grads[seeding] = mf.mixed_grad(lambda ps, x: seg(ps, x).pow(2).sum(), plan)(params, x)
    for lazy, eager in zip(grads["lazy"], grads["eager"], strict=True):
        assert torch.equal(lazy, eager)


def test_seeding_is_validated_and_shown_only_when_set():
    assert repr(mf.Random(k=2)) == "Random(k=2, distribution='gaussian')"
    assert repr(mf.Random(k=2, seeding="lazy")) == "Random(k=2, distribution='gaussian', seeding='lazy')"
    assert eval(repr(mf.Random(k=2, seeding="eager")), vars(mf)) == mf.Random(k=2, seeding="eager")  # noqa: S307
    with pytest.raises(ValueError, match=r"Random\(seeding='later'\): unknown seeding; expected one of 'auto'"):
        mf.Random(seeding="later")


@pytest.mark.parametrize(
    "body",
    [
        lambda h: (h, h * 2),  # the leaf returned as it is, next to an op on it: once a silently wrong gradient
        lambda h: {"a": h.sin(), "b": h},
        lambda h: h,
        lambda h: h[0],
        lambda h: h.t(),
        lambda h: torch.ops.aten.mm(h, h.t()),
        lambda h: torch.stack([h, h.cos()]),
        lambda h: (h * 2).relu_(),  # in place on a temporary: legal, seeded eagerly
    ],
    ids=["leaf-and-op", "dict-with-leaf", "identity", "index", "transpose", "aten-op", "stack", "inplace-temp"],
)
def test_lazy_seeding_matches_eager_whatever_the_segment_does_with_its_input(body):
    """Lazy seeding sees a leaf only through the ops it passes; every other use must fall back to eager."""
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(5, 4, generator=g, dtype=DT)
    seg = mf.fwd(body, name="v")

    def loss(w, x):
        h = torch.tanh(x @ w)
        out = seg(h)
        leaves = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, tuple) else [out]
        return sum(((i + 2) * leaf).pow(2).sum() for i, leaf in enumerate(leaves)) + h.sum()

    grads = []
    for seeding in ("lazy", "eager"):
        torch.manual_seed(0)
        grads.append(mf.mixed_grad(loss, {"v": mf.Random(k=4, distribution="rademacher", seeding=seeding)})(w, x))
    # The same tangents and sums, but an eager segment with at most k output entries ("index": 3) contracts
    # its tangents in forward (Random.finish), in another order than lazy seeding's backward: equal to rounding.
    torch.testing.assert_close(*grads, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "body",
    [lambda h: (h[0].zero_(), h * 2)[1], lambda h: (h.__setitem__(0, 0.0), h * 2)[1]],
    ids=["view-zero_", "setitem"],
)
@pytest.mark.parametrize("seeding", ["lazy", "eager"])
def test_in_place_writes_to_a_view_of_the_input_are_refused_under_either_seeding(body, seeding):
    """Under lazy seeding such a write would land on a seeded copy and silently change the result."""
    w, x = torch.randn(4, 3, dtype=DT), torch.randn(5, 4, dtype=DT)
    seg = mf.fwd(body, name="v")
    plan = {"v": mf.Random(k=4, distribution="rademacher", seeding=seeding)}
    with pytest.raises(RuntimeError, match=r"segment 'v' modified .*in place"):
        mf.mixed_grad(lambda w, x: seg(torch.tanh(x @ w)).pow(2).sum(), plan)(w, x)


def test_wrapping_a_module_at_the_call_keeps_state_dict_keys_and_gradients():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)

        def forward(self, x):
            return self.head(torch.tanh(mf.fwd(self.stem, name="stem")(x)))

    torch.manual_seed(0)
    net, x = Net().double(), torch.randn(5, 4, dtype=DT)
    assert list(net.state_dict()) == ["stem.weight", "stem.bias", "head.weight", "head.bias"]
    with mf.use_plan({"stem": "exact"}):
        net(x).sum().backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x).sum().backward()
    for g, p in zip(got, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
