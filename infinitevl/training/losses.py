"""Training losses, in fp32, as sums over valid tokens (the loop divides by the global token count, so that
gradient accumulation and data parallelism give the gradient of one big batch).

The training stages give the losses hidden states and the LM head, not logits: `head_cross_entropy` and
`head_kl_divergence` project only the positions that count (those with a target, or the masked tokens), `positions`
rows at a time, and compute each chunk's gradients (for the hidden states and the head) together with its loss, so
that the chunk's logits are dropped at once; backward only scales what was computed. No [T, vocab] tensor is built,
for the student or the teacher, and the work is the same as with whole logits (one projection per model, and the
two gradient products when they are needed). Within a chunk the vocabulary is read in column blocks, so its fp32
copy is not made either. `kl_divergence` and `cross_entropy` are the same losses on logits that already exist
(evaluation uses them, without gradients, on its small batches).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (rows of logits [R, V], first row's index, whether to return d(loss)/d(logits)) -> (loss per row [R], gradient)
BlockLoss = Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor | None]]


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


def _kl_block(
    student: torch.Tensor, teacher: torch.Tensor, inv: float, col_chunk: int, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [R, V]: KL(softmax(teacher * inv) || softmax(student * inv)) per row, and its gradient with respect to
    `student`, (p_student - p_teacher) * inv, in the student's dtype."""
    ls, lt = _lse(student, inv, col_chunk), _lse(teacher, inv, col_chunk)
    kl = torch.zeros(student.shape[0], device=student.device)
    g = torch.empty_like(student) if grad else None
    for c in range(0, student.shape[1], col_chunk):
        log_pt = teacher[:, c : c + col_chunk].float() * inv - lt.unsqueeze(-1)
        log_ps = student[:, c : c + col_chunk].float() * inv - ls.unsqueeze(-1)
        pt = log_pt.exp()
        kl += (pt * (log_pt - log_ps)).sum(-1)
        if g is not None:
            g[:, c : c + col_chunk] = ((log_ps.exp() - pt) * inv).to(g.dtype)
    return kl, g


def _ce_block(
    logits: torch.Tensor, targets: torch.Tensor, col_chunk: int, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [R, V] and targets [R] (all valid): cross-entropy per row, and its gradient softmax - onehot."""
    lse = _lse(logits, 1.0, col_chunk)
    loss = lse - logits.gather(1, targets.unsqueeze(-1)).squeeze(-1).float()
    if not grad:
        return loss, None
    g = torch.empty_like(logits)
    for c in range(0, logits.shape[1], col_chunk):
        p = (logits[:, c : c + col_chunk].float() - lse.unsqueeze(-1)).exp()
        hit = targets - c
        inside = (hit >= 0) & (hit < p.shape[1])
        p[inside.nonzero().squeeze(-1), hit[inside]] -= 1.0
        g[:, c : c + col_chunk] = p.to(g.dtype)
    return loss, g


def _hand_over(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The gradients a forward computed, taken off `ctx` (so they are freed once used): backward runs once."""
    if not hasattr(ctx, "grads"):
        raise RuntimeError("the chunked losses compute their gradients in forward; backward can run only once")
    grads = ctx.grads
    del ctx.grads
    return grads


class _LogitsLoss(torch.autograd.Function):
    """Sum of `block` over the rows `rows` of logits [N, V], `row_chunk` rows at a time, with its gradient."""

    @staticmethod
    def forward(ctx, logits, rows, block: BlockLoss, row_chunk: int, grad: bool):
        need = grad and ctx.needs_input_grad[0]
        total = torch.zeros((), device=logits.device)
        g = torch.zeros_like(logits) if need else None
        for r in range(0, rows.numel(), row_chunk):
            idx = rows[r : r + row_chunk]
            loss, block_grad = block(logits[idx], r, need)
            total = total + loss.sum()
            if g is not None:
                g[idx] = block_grad
        ctx.grads = (g,)  # not an input or output: kept on ctx, scaled in place by backward
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = _hand_over(ctx)
        return (g.mul_(grad_out) if g is not None else None), None, None, None, None


class _HeadLoss(torch.autograd.Function):
    """Sum of `block` over the rows of hidden [N, D] @ weight.T [V, D], `positions` rows at a time. The gradients
    for `hidden` and `weight` are computed chunk by chunk in forward; backward scales them (once)."""

    @staticmethod
    def forward(ctx, hidden, weight, block: BlockLoss, positions: int, grad: bool):
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        total = torch.zeros((), device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # [V, D], summed over chunks in fp32
        for i in range(0, hidden.shape[0], positions):
            h = hidden[i : i + positions]
            loss, g = block(F.linear(h, weight), i, need_h or need_w)  # [P, V] logits, dropped after this step
            total = total + loss.sum()
            if need_h:
                grad_h[i : i + positions] = g @ weight.to(g.dtype)
            if need_w and grad_w is None:
                grad_w = (g.t() @ h.to(g.dtype)).float()
            elif need_w and g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), h.to(g.dtype))  # in place: no second [V, D] tensor
            elif need_w:
                grad_w += (g.t() @ h.to(g.dtype)).float()
        ctx.weight_dtype = weight.dtype
        ctx.grads = (grad_h, grad_w)  # not inputs or outputs: kept on ctx, scaled in place by backward
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = _hand_over(ctx)
        dh = grad_h.mul_(grad_out) if grad_h is not None else None
        dw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def _next_token_targets(labels: torch.Tensor, device) -> torch.Tensor:
    """[B, T] labels aligned with the inputs -> [B * T] targets: position t predicts labels[t + 1], -100 for none."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return targets.to(device).reshape(-1)


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
    rows = mask.reshape(-1).to(student_logits.device).nonzero().squeeze(-1)
    teacher = teacher_logits.detach().reshape(-1, V)
    inv = 1.0 / temperature

    def block(s, first, grad):
        return _kl_block(s, teacher[rows[first : first + s.shape[0]]], inv, col_chunk, grad)

    grad = torch.is_grad_enabled()
    total = _LogitsLoss.apply(student_logits.reshape(-1, V), rows, block, row_chunk, grad)
    return total * (temperature**2 if scale_by_t2 else 1.0)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, row_chunk: int = 512, col_chunk: int = 16384
) -> torch.Tensor:
    """Sum of next-token cross-entropy over labels != -100 (labels aligned with inputs: position t predicts
    labels[t + 1])."""
    targets = _next_token_targets(labels, logits.device)
    rows = (targets >= 0).nonzero().squeeze(-1)

    def block(x, first, grad):
        return _ce_block(x, targets[rows[first : first + x.shape[0]]], col_chunk, grad)

    V = logits.shape[-1]
    return _LogitsLoss.apply(logits.reshape(-1, V), rows, block, row_chunk, torch.is_grad_enabled())


def head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, positions: int = 512, col_chunk: int = 16384
) -> torch.Tensor:
    """`cross_entropy` of the logits hidden [B, T, D] @ weight.T [V, D], projecting only the positions with a
    target, `positions` at a time (see the module docstring)."""
    targets = _next_token_targets(labels, hidden.device)
    rows = (targets >= 0).nonzero().squeeze(-1)
    h, t = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), targets[rows]

    def block(logits, first, grad):
        return _ce_block(logits, t[first : first + logits.shape[0]], col_chunk, grad)

    return _HeadLoss.apply(h, weight, block, positions, torch.is_grad_enabled())


def head_kl_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    positions: int = 512,
    col_chunk: int = 16384,
) -> torch.Tensor:
    """`kl_divergence` of the logits student_hidden [B, T, D] @ student_weight.T against teacher_hidden @
    teacher_weight.T, projecting only the positions where `mask` is set, `positions` at a time (see the module
    docstring)."""
    rows = mask.reshape(-1).to(student_hidden.device).nonzero().squeeze(-1)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows)
    teacher_weight = teacher_weight.detach()
    inv = 1.0 / temperature

    def block(logits, first, grad):
        teacher = F.linear(ht[first : first + logits.shape[0]], teacher_weight)
        return _kl_block(logits, teacher, inv, col_chunk, grad)

    total = _HeadLoss.apply(hs, student_weight, block, positions, torch.is_grad_enabled())
    return total * (temperature**2 if scale_by_t2 else 1.0)


def target_count(labels: torch.Tensor) -> int:
    """How many next-token targets a batch has (what `cross_entropy` sums over)."""
    return int((labels[:, 1:] != -100).sum())


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over the hidden dim and the tokens where `mask` is set, in fp32."""
    diff = (student.float() - teacher.detach().float()) * mask.unsqueeze(-1)
    return (diff * diff).sum()
