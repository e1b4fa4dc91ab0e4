"""torch.compile over a training step that calls mixed_grad or uses use_plan: madfunc's own calls run
eagerly (one graph break each, see ``madfunc.transforms._eager``), the step gives eager's result under the same
seed, and new tangent seeds never recompile (before, a seed was a Python int that Dynamo guarded on).
Backends "eager" and "aot_eager" keep the test fast; what is tested is Dynamo's tracing, which they share
with inductor."""

from __future__ import annotations

import pytest
import torch

import madfunc as mf

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Dynamo's own notes while it traces (graph breaks on pybind builtins), not madfunc's warnings.
    pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),  # Dynamo's import
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"),
]


def _mlp(params: tuple, x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1 + b1) @ w2 + b2


SEG = mf.fwd(_mlp, name="mlp")


def _loss(params: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (SEG(params, x) - y).pow(2).mean()


@pytest.mark.parametrize("strategy", [mf.Exact(), mf.Random(2), mf.Random(1, "rademacher", seeding="kept")],
                         ids=repr)
def test_compiled_step_matches_eager(strategy: mf.Strategy) -> None:
    g = torch.Generator().manual_seed(0)
    params = (torch.randn(6, 5, generator=g), torch.randn(5, generator=g), torch.randn(5, 3, generator=g),
              torch.randn(3, generator=g))
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    grad = mf.mixed_grad(_loss, {"mlp": strategy})

    def step(p: tuple, x: torch.Tensor, y: torch.Tensor) -> tuple:
        return grad(p, x, y)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    torch.manual_seed(3)
    got = compiled(params, x, y)
    torch.manual_seed(3)
    want = grad(params, x, y)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


STRATEGIES = [mf.Exact(), mf.Random(2), mf.Random(1, "rademacher", seeding="kept"), mf.Activity(2)]


# A recompilation raises (torch._dynamo.exc.RecompileError) instead of happening: the tests below count
# recompiles by requiring none. (Dynamo's counters record frames and graphs, not recompiles.)
no_recompiles = torch._dynamo.config.patch(error_on_recompile=True)


@no_recompiles
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
def test_mixed_grad_step_never_recompiles_on_new_seeds(strategy: mf.Strategy, backend: str) -> None:
    g = torch.Generator().manual_seed(1)
    params = tuple(torch.randn(*shape, generator=g) for shape in ((6, 5), (5,), (5, 3), (3,)))
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    grad = mf.mixed_grad(_loss, {"mlp": strategy})

    def step(p: tuple, x: torch.Tensor, y: torch.Tensor) -> tuple:
        return tuple(w - 0.1 * d for w, d in zip(p, grad(p, x, y), strict=True))

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend)
    eager_p, compiled_p = params, params
    for seed in range(4):  # each step draws new tangents (Exact has none: its passes must not recompile either)
        torch.manual_seed(seed)
        compiled_p = compiled(compiled_p, x, y)
        torch.manual_seed(seed)
        eager_p = step(eager_p, x, y)
        for a, b in zip(compiled_p, eager_p, strict=True):
            torch.testing.assert_close(a, b)


@no_recompiles
@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
def test_use_plan_training_step_never_recompiles_on_new_seeds(strategy: mf.Strategy) -> None:
    torch.manual_seed(0)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), mf.fwd(torch.nn.Sequential(torch.nn.Tanh(),
                                   torch.nn.Linear(5, 5)), name="mid"), torch.nn.Tanh(), torch.nn.Linear(5, 3))

    x, y = torch.randn(4, 6), torch.randn(4, 3)

    def trainer(net: torch.nn.Module):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with mf.use_plan({"mid": strategy}):
                loss = (net(x) - y).pow(2).mean()
                loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        return step

    eager_net, compiled_net = model(), model()
    eager = trainer(eager_net)
    torch._dynamo.reset()
    compiled = torch.compile(trainer(compiled_net), backend="eager")
    for seed in range(4):
        torch.manual_seed(seed)
        got = compiled(x, y)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, eager(x, y))
    for a, b in zip(compiled_net.parameters(), eager_net.parameters(), strict=True):
        torch.testing.assert_close(a, b)
