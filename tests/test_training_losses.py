"""The hand-written losses against autograd through torch's own: `kl_divergence` against `F.kl_div` of
`F.log_softmax`, `cross_entropy` against `F.cross_entropy`, values and gradients, fp32 and bf16 logits, padding
masked, at shapes that cross the row and vocabulary chunk boundaries (small chunks, and the default ones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from infinitevl.training.losses import cross_entropy, head_cross_entropy, head_kl_divergence, kl_divergence

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
    hidden, weight = head_inputs(1, 4, 3, 10, torch.float32, 6)
    ce = head_cross_entropy(hidden, weight, torch.full((1, 4), -100))
    ce.backward()
    assert float(ce.detach()) == 0.0 and not hidden.grad.any() and weight.grad is None


# (batch, length, hidden, vocab, positions, col_chunk): chunks of positions that divide nothing, one position per
# chunk, and the default chunk of 512 crossed.
HEAD_SHAPES = [(2, 9, 8, 37, 4, 8), (1, 5, 4, 11, 1, 16384), (2, 300, 16, 50, 512, 16384)]


def head_inputs(B, T, D, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 3).to(dtype).requires_grad_()
    return hidden, weight


def assert_grads_close(ours, ref, dtype):
    """Gradients of the projection: in bf16 the reference makes one product over all positions, the loss one per
    chunk (summed in fp32), so they differ by bf16 roundings of partial sums, relative to the largest entry."""
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2**-6, atol=2**-7 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_head_cross_entropy_matches_autograd_through_the_projection(shape, dtype):
    B, T, D, V, positions, cols = shape
    hidden, weight = head_inputs(B, T, D, V, dtype, 7)
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[~padding(B, T, 9)] = -100

    ours = head_cross_entropy(hidden, weight, labels, positions=positions, col_chunk=cols)
    (ours * 0.6).backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    logits = F.linear(hidden, weight).float()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    (ref * 0.6).backward()

    torch.testing.assert_close(ours, ref, rtol=1e-5 if dtype == torch.float32 else 2**-7, atol=1e-5)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert_grads_close(grads[0], hidden.grad, dtype)
    assert_grads_close(grads[1], weight.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_head_kl_divergence_matches_autograd_through_both_projections(shape, dtype):
    B, T, D, V, positions, cols = shape
    hidden, weight = head_inputs(B, T, D, V, dtype, 10)
    t_hidden, t_weight = head_inputs(B, T, 2 * D, V, dtype, 11)  # a wider teacher, as distillation has
    mask = padding(B, T, 12)
    temperature = 2.0

    ours = head_kl_divergence(
        hidden, weight, t_hidden, t_weight, mask, temperature, positions=positions, col_chunk=cols
    )
    (ours * 0.6).backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    assert t_hidden.grad is None and t_weight.grad is None  # the teacher gets no gradient
    log_s = F.log_softmax(F.linear(hidden, weight).float() / temperature, -1)
    log_t = F.log_softmax(F.linear(t_hidden, t_weight).detach().float() / temperature, -1)
    per_token = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    ref = (per_token * mask).sum() * temperature**2
    (ref * 0.6).backward()

    torch.testing.assert_close(ours, ref, rtol=1e-5 if dtype == torch.float32 else 2**-7, atol=1e-5)
    assert_grads_close(grads[0], hidden.grad, dtype)
    assert_grads_close(grads[1], weight.grad, dtype)
    assert not grads[0][~mask].any()


def test_a_frozen_head_gets_no_gradient_no_grad_mode_computes_none_and_backward_runs_once():
    hidden, weight = head_inputs(1, 6, 4, 9, torch.float32, 13)
    labels = torch.randint(0, 9, (1, 6), generator=torch.Generator().manual_seed(14))
    head_cross_entropy(hidden, weight.detach(), labels).backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        value = head_cross_entropy(hidden, weight, labels)
    assert not value.requires_grad
    loss = head_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(value, loss.detach())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):  # its gradients were handed over
        loss.backward()


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation returns while the mode is on (only tensors whose last dim is
    `last_dim`, when given): what the operations build, forward and backward."""

    def __init__(self, last_dim: int | None = None):
        super().__init__()
        self.last_dim = last_dim
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and (self.last_dim is None or t.shape[-1] == self.last_dim):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(loss, last_dim: int | None = None) -> int:
    with LargestTensor(last_dim) as seen:
        loss().backward()
    return seen.largest


def test_head_losses_never_build_a_tensor_of_all_positions_by_vocabulary():
    """What `losses.py` promises: with hidden [1, 256, 8] and a vocabulary of 1000, the largest tensor the losses
    make (forward and backward) is one chunk of positions by vocabulary or a gradient of an input's size, while the
    same loss on logits has to build them whole (256 x 1000)."""
    B, T, D, V, positions = 1, 256, 8, 1000, 16
    hidden, weight = head_inputs(B, T, D, V, torch.float32, 15)
    t_hidden, t_weight = head_inputs(B, T, D, V, torch.float32, 16)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(17))
    mask = torch.ones(B, T, dtype=torch.bool)
    bound = max(positions * V, V * D, B * T * D)
    assert bound < B * T * V // 10
    assert largest_tensor(lambda: head_cross_entropy(hidden, weight, labels, positions=positions)) <= bound
    kl = largest_tensor(lambda: head_kl_divergence(hidden, weight, t_hidden, t_weight, mask, positions=positions))
    assert kl <= bound
    assert largest_tensor(lambda: cross_entropy(F.linear(hidden, weight), labels)) >= B * T * V
