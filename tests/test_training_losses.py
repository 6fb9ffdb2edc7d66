"""The hand-written losses against autograd through torch's own: `kl_divergence` against `F.kl_div` of
`F.log_softmax`, `cross_entropy` against `F.cross_entropy`, values and gradients, fp32 and bf16 logits, padding
masked, at shapes that cross the row and vocabulary chunk boundaries (small chunks, and the default ones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infinitevl.training.losses import cross_entropy, kl_divergence

# (batch, length, vocab, row_chunk, col_chunk): chunks that divide nothing; one row and one column per chunk; the
# default chunks crossed by the rows (> 512) and by the vocabulary (> 16384).
SHAPES = [(2, 9, 37, 4, 8), (1, 5, 11, 1, 1), (2, 300, 64, 512, 16384), (1, 6, 16384 + 29, 512, 16384)]
DTYPES = [torch.float32, torch.bfloat16]


def logits(shape, dtype, seed):
    B, T, V = shape
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g) * 3).to(dtype).requires_grad_()


def padding(B, T, seed) -> torch.Tensor:
    """[B, T] bool: real tokens, each row right-padded by a different amount (row 0 keeps a few)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
    lengths[0] = min(int(lengths[0]), max(1, T - 2))
    return torch.arange(T) < lengths[:, None]


def tolerance(dtype):
    # The reference takes the same bf16 inputs in fp32: both sides compute in fp32 and round the gradient to the
    # input dtype once at the end, where a last-bit difference is one bf16 step (at most 2^-7 relative).
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature,scale", [(1.0, True), (2.0, True), (0.7, False)])
def test_kl_divergence_matches_autograd(shape, dtype, temperature, scale):
    B, T, V, rows, cols = shape
    student, teacher = logits((B, T, V), dtype, 0), logits((B, T, V), dtype, 1).detach()
    mask = padding(B, T, 2)
    upstream = 0.37  # the gradient arriving from the loop's normalisation

    ours = kl_divergence(student, teacher, mask, temperature, scale, row_chunk=rows, col_chunk=cols)
    (ours * upstream).backward()
    grad, student.grad = student.grad, None

    log_s = F.log_softmax(student.float() / temperature, -1)
    log_t = F.log_softmax(teacher.float() / temperature, -1)
    per_token = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)  # KL(teacher || student)
    ref = (per_token * mask).sum() * (temperature**2 if scale else 1.0)
    (ref * upstream).backward()

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, student.grad, **tolerance(dtype))
    assert not grad[~mask].any()  # padding gets no gradient


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cross_entropy_matches_autograd(shape, dtype):
    B, T, V, rows, cols = shape
    x = logits((B, T, V), dtype, 3)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # a prompt: no targets
    labels[~padding(B, T, 5)] = -100  # padding
    labels[0, -1] = V - 1  # the last column of the last vocabulary chunk is a target
    labels[-1, 2] = 0  # and the first column of the first
    upstream = 1.9

    ours = cross_entropy(x, labels, row_chunk=rows, col_chunk=cols)
    (ours * upstream).backward()
    grad, x.grad = x.grad, None

    ref = F.cross_entropy(x.float()[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    (ref * upstream).backward()

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, x.grad, **tolerance(dtype))
    no_target = torch.cat([labels[:, 1:] == -100, torch.ones(B, 1, dtype=torch.bool)], 1)
    assert not grad[no_target].any()  # positions with no next-token target get no gradient


def test_losses_of_nothing_are_zero():
    x = logits((1, 4, 10), torch.float32, 6)
    assert float(kl_divergence(x, x.detach() + 1, torch.zeros(1, 4, dtype=torch.bool)).detach()) == 0.0
    ce = cross_entropy(x, torch.full((1, 4), -100))
    ce.backward()
    assert float(ce.detach()) == 0.0 and not x.grad.any()
