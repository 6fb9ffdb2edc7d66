"""Backend selection, and (where CUDA and flash-linear-attention exist) the fla kernels against the torch path."""

from __future__ import annotations

import pytest
import torch

from infinitevl.ops import backend
from infinitevl.ops.gated_delta import gated_delta_rule_chunked


def test_cpu_tensors_use_the_torch_path():
    assert backend.select(torch.device("cpu")) == "torch"
    with backend.use_backend("torch"):
        assert backend.select(torch.device("cpu")) == "torch"


def test_forcing_fla_without_cuda_is_refused():
    with backend.use_backend("fla"), pytest.raises(RuntimeError, match="needs a CUDA device"):
        backend.select(torch.device("cpu"))


def test_environment_override_is_validated(monkeypatch):
    monkeypatch.setenv("INFINITEVL_BACKEND", "triton")
    with pytest.raises(ValueError, match="INFINITEVL_BACKEND='triton'"):
        backend.select(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"), backend.use_backend("cuda"):
        pass


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and backend.fla_installed()), reason="needs CUDA and flash-linear-attention"
)
@pytest.mark.parametrize("T", [1, 63, 200])
def test_fla_matches_torch_on_cuda(T):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, T, 4, 32, generator=gen), torch.randn(1, T, 2, 32, generator=gen)
    v = torch.randn(1, T, 2, 64, generator=gen)
    g, beta = -torch.rand(1, T, 4, generator=gen) * 0.5, torch.rand(1, T, 4, generator=gen)
    s0 = torch.randn(1, 4, 32, 64, generator=gen)
    ref_o, ref_s = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True)
    cuda = [x.cuda() for x in (q, k, v, g, beta, s0)]
    with backend.use_backend("fla"):
        o, s = backend.gated_delta_rule(*cuda[:5], initial_state=cuda[5])
    torch.testing.assert_close(o.cpu(), ref_o, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(s.cpu(), ref_s, atol=2e-3, rtol=2e-3)
