"""CUDA-only trust checks (skipped without a GPU; run on a lent H100 before landing, see benchmarks/RESULTS.md).

Recurrent layers on CUDA: nn.LSTM / GRU / RNN run cuDNN kernels that read their weights' storage
(``flatten_parameters``, ``data_ptr``), which torch.func's wrapped tensors have none of, and CUDA's native
cells have no forward-mode rule. A forward segment around them must still give the plain model's gradient.
The reference is plain autograd with cuDNN on (``torch.func.grad`` itself fails there). Deterministic
float64 identities: the tolerance is rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import madfunc as mf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN's recurrent kernels)")
DT = torch.float64


@pytest.mark.parametrize("transform", ["mixed_grad", "use_plan"])
@pytest.mark.parametrize("kind", ["exact", "orthogonal"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_run_in_forward_mode(cls: type[nn.Module], kind: str, transform: str) -> None:
    torch.manual_seed(0)
    rnn = cls(3, 4, num_layers=2, batch_first=True).to("cuda", DT)
    x = torch.randn(2, 5, 3, dtype=DT, device="cuda")
    rnn(x)[0].pow(2).sum().backward()
    want = {name: p.grad.clone() for name, p in rnn.named_parameters()}
    rnn.zero_grad()
    seg = mf.fwd(rnn, name="rnn")
    n = sum(p.numel() for p in rnn.parameters())  # Random with k = n orthogonal tangents is exact
    strategy = mf.Exact() if kind == "exact" else mf.Random(k=n, distribution="orthogonal")
    if transform == "mixed_grad":
        got = mf.mixed_grad(lambda p, x: seg(p, x)[0].pow(2).sum(), {"rnn": strategy})(
            dict(rnn.named_parameters()), x)
    else:
        with mf.use_plan({"rnn": strategy}):
            seg(x)[0].pow(2).sum().backward()
        got = {name: p.grad for name, p in rnn.named_parameters()}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
