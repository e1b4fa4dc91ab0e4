"""Data parallelism on torch.distributed (README, "Distributed"; issue 10).

Two ranks (``distributed_worker.py``, gloo on 127.0.0.1) run every plan of ``PLANS`` in three styles:

* ``ddp``: DDP + ``use_plan(plan)``: DDP all-reduces every gradient (the Random estimate with shared tangents);
* ``ddp_scalar``: DDP + ``mf.ddp_comm_hook`` + ``use_plan(plan, process_group=...)``: Random segments
  all-reduce k coefficients, the hook the other gradients;
* ``functional``: ``mixed_grad(..., process_group=...)``.

Each is compared with one process on the concatenated batch with the same seeds (``activation``: the mean
over shards of single-process runs, see the worker), over 3 SGD steps, in float64. ``SHARED_LOSSES`` adds
parameters a Random segment does not read alone (handed over unread, tied, read by two calls): one step
each, functional (mean and sum) and DDP + hook. ``mark_segments`` under DDP (``distributed_marking_worker.py``,
run by the same workers): a model marked before or after wrapping, Exact and Random (with the hook), and a
tiny GPT-2 marked ``transformer.h.*``, one step each against one process on the concatenated batch. The
workers start once per session, each bounded by a timeout.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import optree
import pytest
import torch
from scipy import stats
from support import distributed_marking_worker as marking
from support import distributed_worker as worker

import madfunc as mf
from madfunc.engine.distributed import FINGERPRINT_NUMBERS

TESTS = pathlib.Path(__file__).resolve().parents[1]

WORLD, TIMEOUT_S = 2, 90
STYLES = ("ddp", "ddp_scalar", "functional")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The two ranks' results (see distributed_worker.main); fails with their output if one fails."""
    out = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "support.distributed_worker", str(r), str(WORLD), str(port), str(out)],
            cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:  # our own children only, by handle
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        pytest.fail("distributed worker failed:\n" + "\n".join(log[-4000:] for log in logs))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _relative(actual, expected) -> float:
    pairs = zip(optree.tree_leaves(actual), optree.tree_leaves(expected), strict=True)
    return max(float((a - e).abs().max() / e.abs().max().clamp_min(1e-300)) for a, e in pairs)


def _reference(name: str, style: str) -> str:
    return "reference_functional" if style == "functional" else "reference_module"


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", list(worker.PLANS))
def test_gradients_equal_one_process(ranks, name: str, style: str) -> None:
    for results in ranks:
        run, reference = results[name, style], results[name, _reference(name, style)]
        for step in range(worker.STEPS):
            assert _relative(run["grads"][step], reference["grads"][step]) <= 1e-12, (name, style, step)
        assert _relative(run["params"], reference["params"]) <= 1e-12


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", list(worker.PLANS))
def test_parameters_bit_identical_across_ranks(ranks, name: str, style: str) -> None:
    first, second = (results[name, style]["params"] for results in ranks)
    for a, b in zip(optree.tree_leaves(first), optree.tree_leaves(second), strict=True):
        assert torch.equal(a, b), (name, style)


def _expected_bytes(plan: dict) -> list[int]:
    """The scalar scheme's all-reduces per step: 8(k + fingerprint) per Random segment call, then the
    other segments' parameter gradients (float64) in one call."""
    random = {seg: s.k for seg, s in plan.items() if isinstance(s, mf.Random)}
    rest = sum(a * b + b for seg, (a, b) in worker.SIZES.items() if seg not in random)
    return [8 * (k + FINGERPRINT_NUMBERS) for k in random.values()] + [8 * rest]


@pytest.mark.parametrize("style", ["ddp_scalar", "functional"])
@pytest.mark.parametrize("name", list(worker.PLANS))
def test_scalar_scheme_sends_k_numbers_per_random_segment(ranks, name: str, style: str) -> None:
    expected = _expected_bytes(worker.PLANS[name])
    for results in ranks:
        assert results[name, style]["bytes"] == [expected] * worker.STEPS


SHARED_STYLES = ("functional", "functional_sum", "ddp_scalar")


@pytest.mark.parametrize("style", SHARED_STYLES)
@pytest.mark.parametrize("case", list(worker.SHARED_LOSSES))
def test_parameters_also_read_outside_the_segment_are_reduced(ranks, case: str, style: str) -> None:
    """A parameter handed to a Random segment but not read by it ("unread"), read inside and outside it
    ("tied"), or read by two calls ("twice"): the gradient of one process on the concatenated batch, the
    same on every rank (it was this rank's own outside the segment)."""
    scale = WORLD if style == "functional_sum" else 1  # the sum of the ranks' mean losses
    reference = "reference_module" if style == "ddp_scalar" else "reference_functional"
    for results in ranks:
        expected = {n: scale * g for n, g in results["shared"][case, reference].items()}
        assert _relative(results["shared"][case, style]["grads"], expected) <= 1e-12, (case, style)
    first, second = (results["shared"][case, style]["grads"] for results in ranks)
    for name in first:
        assert torch.equal(first[name], second[name]), (case, style, name)


@pytest.mark.parametrize("style", SHARED_STYLES)
@pytest.mark.parametrize("case", ["unread", "tied"])
def test_only_the_gradients_read_by_the_segment_alone_skip_the_reduction(ranks, case: str, style: str) -> None:
    """The Random segment's k coefficients, then in one call what else needs reducing: the head ("unread"),
    or w's part from outside the segment and c ("tied"); b is read by the segment alone and sends nothing."""
    k = worker.SHARED_PLAN["part"].k
    rest = {"unread": 2 * 8 + 2, "tied": 8 * 6 + 6}[case]
    for results in ranks:
        assert results["shared"][case, style]["bytes"] == [8 * (k + FINGERPRINT_NUMBERS), 8 * rest]


def test_seed_disagreement_is_refused(ranks) -> None:
    for results in ranks:
        message = results.get("guard")
        assert message is not None, "ranks seeded differently were not detected"
        assert "segment 'stem'" in message and "drew different Random tangents" in message
        assert "generator=torch.Generator().manual_seed(seed)" in message


def test_shared_generator_shares_tangents_whatever_torch_seed(ranks) -> None:
    first, second = (results["shared_generator"] for results in ranks)
    params, (x, y) = worker.initial_params(), worker.data(0)
    plan, generator = worker.PLANS["gaussian"], torch.Generator().manual_seed(7)
    reference = mf.mixed_grad(worker.functional_loss, plan, generator=generator)(params, x, y)
    assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(first), optree.tree_leaves(second), strict=True))
    assert _relative(first, reference) <= 1e-12


def test_grad_and_value_reduces_the_gradient_only(ranks) -> None:
    params, (x, y) = worker.initial_params(), worker.data(0)
    for rank, results in enumerate(ranks):
        grad, value = results["grad_and_value"]
        assert _relative(grad, results["gaussian", "functional"]["grads"][0]) <= 1e-12
        part = slice(rank * worker.BATCH // WORLD, (rank + 1) * worker.BATCH // WORLD)
        assert torch.allclose(value, worker.functional_loss(params, x[part], y[part]), rtol=1e-14, atol=0)


@pytest.mark.parametrize("scalar", [False, True], ids=["use_plan", "process_group"])
@pytest.mark.parametrize("name", ["exact", "gaussian"])
def test_fsdp2_fully_shard(ranks, name: str, scalar: bool) -> None:
    """FSDP2 on gloo/CPU: gradients as one process (with a process group: correct, though FSDP's
    reduce-scatter still sends the Random parameters' gradients: see README, "Distributed")."""
    for results in ranks:
        assert (name, "fsdp") not in results["errors"], results["errors"].get((name, "fsdp"))
        run = results[name, "fsdp_scalar" if scalar else "fsdp"]
        assert _relative(run, results[name, "reference_module"]["grads"][0]) <= 1e-12


# -- mark_segments under DDP (distributed_marking_worker.py) ----------------------------------------------


def _marked(ranks: list[dict], part: str = "blocks") -> list:
    for results in ranks:
        assert "marking" not in results["errors"], results["errors"]["marking"]
    return [results["marking"][part] for results in ranks]


@pytest.mark.parametrize("plan", list(marking.PLANS))
@pytest.mark.parametrize("order", marking.ORDERS)
def test_marked_model_under_ddp_equals_one_process(ranks, order: str, plan: str) -> None:
    """Marked before DDP, after it on the wrapper or on ddp.module: one step's gradients are one process's
    on the concatenated batch (Exact: plain autograd; Random, with mf.ddp_comm_hook: the same seed, see the
    worker), identical on every rank; a wrong reference (this rank's shard, another seed) is far off."""
    runs = _marked(ranks)
    for results in runs:
        assert (order, plan) not in results["errors"], results["errors"][order, plan]
        reference = results["reference", plan]
        assert _relative(results["wrong", plan], reference) > 1e-3, plan
        assert _relative(results[order, plan]["grads"], reference) <= 1e-12, (order, plan)
    first, second = (results[order, plan]["grads"] for results in runs)
    assert all(torch.equal(first[n], second[n]) for n in first), (order, plan)


@pytest.mark.parametrize("order", marking.ORDERS)
def test_marked_names_and_state_dict_under_ddp(ranks, order: str) -> None:
    """Marking the DDP wrapper names the segments with its "module." prefix; state_dict keys are unchanged."""
    names = [f"{marking.prefix(order)}blocks.{i}" for i in range(len(marking.SIZES))]
    for results in _marked(ranks):
        for plan in marking.PLANS:
            assert results[order, plan]["names"] == names
            assert results[order, plan]["keys"] == results["unmarked_keys"]
        assert results["unmarked_keys"][0] == "module.blocks.0.0.weight"


@pytest.mark.parametrize("plan", ["random_first", "random_all"])
@pytest.mark.parametrize("order", marking.ORDERS)
def test_marked_random_segments_send_k_numbers(ranks, order: str, plan: str) -> None:
    """Each Random segment call all-reduces k + 8 numbers; the hook then sends the other gradients only."""
    k = next(s.k for s in marking.PLANS[plan]("").values() if isinstance(s, mf.Random))
    call = 8 * (k + FINGERPRINT_NUMBERS)
    sizes = [a * b + b for a, b in (*marking.SIZES, marking.HEAD)]
    expected = {"random_first": [call, 8 * sum(sizes[1:])], "random_all": [call] * 3 + [8 * sizes[-1]]}[plan]
    for results in _marked(ranks):
        assert results[order, plan]["bytes"] == expected


def test_plan_names_of_a_model_marked_through_ddp(ranks) -> None:
    for results in _marked(ranks):
        assert "plan key 'blocks.*' matched no segment that ran" in results["unprefixed_plan"]
        assert "'module.blocks.0', 'module.blocks.1'" in results["unprefixed_plan"]
        assert "Did you mean 'blocks.*' (without the prefix 'module.')?" in results["prefixed_spec"]


def test_gpt2_marked_under_ddp_equals_one_process(ranks) -> None:
    """GPT-2 (float64, caches on, no dropout) marked transformer.h.* then wrapped, Exact: one process's
    gradients on the concatenated batch, identical on every rank, state_dict keys unchanged."""
    runs = _marked(ranks, "gpt2")
    if runs[0] is None:  # the workers could not import it (importorskip here would cost an import)
        pytest.skip("transformers is not installed")
    for results in runs:
        assert results["names"] == ["transformer.h.0", "transformer.h.1"]
        assert results["training"] and results["cache"] == "DynamicCache"
        assert results["keys"] == results["unmarked_keys"]
        assert _relative(results["wrong"], results["reference"]) > 1e-3
        assert _relative(results["grads"], results["reference"]) <= 1e-12
    first, second = (results["grads"] for results in runs)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_process_group_without_torch_distributed_is_refused() -> None:
    assert not torch.distributed.is_initialized()
    layer = mf.fwd(torch.nn.Linear(3, 1), name="layer")
    with pytest.raises(RuntimeError, match=r"use_plan\(process_group='world'\): torch.distributed is not initial"):
        with mf.use_plan({"layer": mf.Random(k=2)}, process_group="world"):
            pass
    grad = mf.mixed_grad(lambda p, x: layer(p, x).sum(), process_group="world")
    with pytest.raises(RuntimeError, match=r"mixed_grad\(process_group='world'\).*init_process_group"):
        grad(dict(layer.module.named_parameters()), torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"mixed_grad\(process_group=...\): expected a torch.distributed.Process"):
        mf.mixed_grad(lambda x: x.sum(), process_group=0)
    with pytest.raises(ValueError, match=r"use_plan\(reduction=...\): expected 'mean' or 'sum', got 'avg'"):
        with mf.use_plan(None, reduction="avg"):  # type: ignore[arg-type]
            pass


# -- unbiasedness of the distributed estimate ------------------------------------------------------------
# Simulated ranks, in one process: test_gradients_equal_one_process["activation"] shows that the
# two-rank scalar scheme's gradient equals, to 1e-15, the mean over the shards of single-process
# mixed_grad calls drawing the same tangents (one generator seed): parameters combine the mean of the
# shards' s, which by linearity is the mean of the shards' parameter gradients, and activation inputs
# take each shard's own s, as each single-process call does. So one draw of the distributed estimator is
# that mean, and many draws need no processes. The plan is "activation": a Random segment after a
# reverse one, where using the all-reduced s for activations would bias the upstream gradient.
#
# Statistic (as tests/strategies/test_random.py): T = D ||mean(g^) - g||^2 / tr(S) over all D draws and every
# parameter, S the sample covariance of one draw. By the CLT, D ||mean - g||^2 is a Gaussian quadratic form
# sum_i l_i chi2_1 with sum_i l_i = tr(Cov), whose tail beyond 1.54 is largest with all weight on one
# term (Szekely & Bakirov 2003): P(T > t) <= P(chi2_1 > t). t = chi2.isf(1e-6, 1) = 23.9; a trace
# estimated 20% low (far beyond its sampling error at D = 600) keeps the false-failure rate below 1e-5.
DRAWS = 600
T_MAX = float(stats.chi2.isf(1e-6, 1))


def _flat(tree) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in optree.tree_leaves(tree)])


@pytest.mark.usefixtures("one_thread")
def test_distributed_estimate_is_unbiased() -> None:
    params, (x, y) = worker.initial_params(), worker.data(0)
    plan = worker.PLANS["activation"]
    shards = [slice(r * worker.BATCH // WORLD, (r + 1) * worker.BATCH // WORLD) for r in range(WORLD)]
    exact = _flat(torch.func.grad(worker.functional_loss)(params, x, y))
    draws = []
    for draw in range(DRAWS):
        grad = mf.mixed_grad(worker.functional_loss, plan, generator=torch.Generator().manual_seed(draw))
        per_rank = [_flat(grad(params, x[s], y[s])) for s in shards]  # one seed: tangents shared
        draws.append(sum(per_rank) / WORLD)
    sample = torch.stack(draws)
    trace = float(sample.var(dim=0).sum())
    statistic = DRAWS * float(((sample.mean(0) - exact) ** 2).sum()) / trace
    assert statistic <= T_MAX, f"T = {statistic:.2f} > {T_MAX:.1f}: the distributed estimate looks biased"
