"""More transformers architectures than the default suite's zoo, tried the same way (``pytest -m sweep``).

Each: blocks marked by module path, ``Exact`` under ``use_plan`` in train and eval mode with library
defaults, against plain autograd under the same seed (tolerances: tests/support/hf_zoo.py). Not tried here,
with the reason: Mixtral in float64 (its grouped matmul has no float64 kernel, plain calls fail too; in
float32 it runs in forward mode), BLOOM (an old-style autograd.Function in its GeLU, which torch.func cannot
run: a ForwardModeError names the segment and the fix, tests/core/test_checks.py).
"""

from __future__ import annotations

import pytest
import torch
from support.hf_zoo import EXTRA, cache_tensors, relative_error

import madfunc as mf

pytest.importorskip("transformers")
pytestmark = [pytest.mark.sweep, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(EXTRA))
def test_exact_blocks_match_plain_autograd(name: str, train: bool) -> None:
    family = EXTRA[name]
    torch.manual_seed(0)
    model = family.build().train(train)
    inputs = family.inputs(torch.Generator().manual_seed(1))
    with mf.mark_segments(model, dict.fromkeys(family.blocks, "fwd")):
        torch.manual_seed(2)
        with mf.use_plan(dict.fromkeys(family.blocks, "exact")):
            out = model(**inputs)
            out.loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    plain = model(**inputs)
    plain.loss.backward()
    expected = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert relative_error(got, expected) <= family.tol
    ours, theirs = cache_tensors(getattr(out, "past_key_values", None)), cache_tensors(plain.get("past_key_values"))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):  # equal up to the rounding of the layers' inputs
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
