"""Training losses, in fp32, as sums over valid tokens (the loop divides by the global token count, so that
gradient accumulation and data parallelism give the gradient of one big batch).

`kl_divergence` and `cross_entropy` work through the vocabulary in blocks of rows and columns with hand-written
gradients: no [T, vocab] fp32 tensor is ever materialised, let alone two (teacher and student) at once.
"""

from __future__ import annotations

import torch


def _lse(x: torch.Tensor, scale: float, col_chunk: int) -> torch.Tensor:
    """logsumexp(x * scale) over the last dim of a [R, V] block, reading `col_chunk` columns at a time."""
    m = torch.full((x.shape[0],), float("-inf"), device=x.device)
    s = torch.zeros(x.shape[0], device=x.device)
    for c in range(0, x.shape[1], col_chunk):
        block = x[:, c : c + col_chunk].float() * scale
        bm = block.amax(-1)
        new_m = torch.maximum(m, bm)
        s = s * torch.exp(m - new_m) + torch.exp(block - new_m.unsqueeze(-1)).sum(-1)
        m = new_m
    return m + s.log()


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weight, temperature, row_chunk, col_chunk):
        inv = 1.0 / temperature
        total = torch.zeros((), device=student.device)
        lse_s = torch.empty(student.shape[0], device=student.device)
        lse_t = torch.empty(student.shape[0], device=student.device)
        rows = weight.nonzero().squeeze(-1)
        for r in range(0, rows.numel(), row_chunk):
            idx = rows[r : r + row_chunk]
            s, t = student[idx], teacher[idx]
            ls, lt = _lse(s, inv, col_chunk), _lse(t, inv, col_chunk)
            lse_s[idx], lse_t[idx] = ls, lt
            kl = torch.zeros(idx.numel(), device=student.device)
            for c in range(0, s.shape[1], col_chunk):
                log_pt = t[:, c : c + col_chunk].float() * inv - lt.unsqueeze(-1)
                log_ps = s[:, c : c + col_chunk].float() * inv - ls.unsqueeze(-1)
                kl += (log_pt.exp() * (log_pt - log_ps)).sum(-1)
            total = total + (kl * weight[idx]).sum()
        ctx.save_for_backward(student, teacher, weight, lse_s, lse_t, rows)
        ctx.args = (inv, row_chunk, col_chunk)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, weight, lse_s, lse_t, rows = ctx.saved_tensors
        inv, row_chunk, col_chunk = ctx.args
        grad = torch.zeros_like(student)
        for r in range(0, rows.numel(), row_chunk):
            idx = rows[r : r + row_chunk]
            w = (weight[idx] * grad_out * inv).unsqueeze(-1)
            for c in range(0, student.shape[1], col_chunk):
                ps = (student[idx, c : c + col_chunk].float() * inv - lse_s[idx].unsqueeze(-1)).exp()
                pt = (teacher[idx, c : c + col_chunk].float() * inv - lse_t[idx].unsqueeze(-1)).exp()
                grad[idx, c : c + col_chunk] = ((ps - pt) * w).to(grad.dtype)
        return grad, None, None, None, None, None


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    row_chunk: int = 512,
    col_chunk: int = 16384,
) -> torch.Tensor:
    """Sum over tokens where `mask` is set of KL(softmax(teacher / T) || softmax(student / T)); logits [..., V].
    Multiplied by T^2 (Hinton) unless `scale_by_t2` is False, so gradients keep their size across temperatures."""
    V = student_logits.shape[-1]
    weight = mask.reshape(-1).to(torch.float32)
    total = _KL.apply(
        student_logits.reshape(-1, V),
        teacher_logits.detach().reshape(-1, V),
        weight,
        float(temperature),
        row_chunk,
        col_chunk,
    )
    return total * (temperature**2 if scale_by_t2 else 1.0)


class _CE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, row_chunk, col_chunk):
        rows = (targets >= 0).nonzero().squeeze(-1)
        lse = torch.empty(logits.shape[0], device=logits.device)
        total = torch.zeros((), device=logits.device)
        for r in range(0, rows.numel(), row_chunk):
            idx = rows[r : r + row_chunk]
            lse[idx] = _lse(logits[idx], 1.0, col_chunk)
            total = total + (lse[idx] - logits[idx, targets[idx]].float()).sum()
        ctx.save_for_backward(logits, targets, lse, rows)
        ctx.args = (row_chunk, col_chunk)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse, rows = ctx.saved_tensors
        row_chunk, col_chunk = ctx.args
        grad = torch.zeros_like(logits)
        for r in range(0, rows.numel(), row_chunk):
            idx = rows[r : r + row_chunk]
            for c in range(0, logits.shape[1], col_chunk):
                p = (logits[idx, c : c + col_chunk].float() - lse[idx].unsqueeze(-1)).exp()
                hit = (targets[idx] - c).clamp(min=-1)
                inside = (hit >= 0) & (hit < p.shape[1])
                p[inside.nonzero().squeeze(-1), hit[inside]] -= 1.0
                grad[idx, c : c + col_chunk] = (p * grad_out).to(grad.dtype)
        return grad, None, None, None


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, row_chunk: int = 512, col_chunk: int = 16384
) -> torch.Tensor:
    """Sum of next-token cross-entropy over labels != -100 (labels aligned with inputs: position t predicts
    labels[t + 1])."""
    V = logits.shape[-1]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1).to(logits.device)
    return _CE.apply(logits.reshape(-1, V), targets.reshape(-1), row_chunk, col_chunk)


def target_count(labels: torch.Tensor) -> int:
    """How many next-token targets a batch has (what `cross_entropy` sums over)."""
    return int((labels[:, 1:] != -100).sum())


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over the hidden dim and the tokens where `mask` is set, in fp32."""
    diff = (student.float() - teacher.detach().float()) * mask.unsqueeze(-1)
    return (diff * diff).sum()
