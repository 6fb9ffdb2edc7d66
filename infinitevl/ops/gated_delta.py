"""The gated delta rule in plain PyTorch: a token-loop reference, a chunked form, and a one-token step.

Per head, with memory S in R^{Dk x Dv} (kept in fp32):

    S_t = exp(g_t) * S_{t-1}                        decay first
    u_t = beta_t * (v_t - S_t^T k_t)                the delta: what the memory does not yet predict
    S_t = S_t + k_t u_t^T
    o_t = S_t^T (scale * q_t)

Shapes (layout [B, T, H, D] everywhere):
    q [B, T, Hq, Dk], k [B, T, Hk, Dk], v [B, T, Hv, Dv], g and beta [B, T, H], state [B, H, Dk, Dv] (fp32),
    output [B, T, H, Dv] in v's dtype, where H = max(Hq, Hk, Hv) and each of Hq, Hk, Hv divides H. A tensor with
    fewer heads is shared by consecutive groups of heads: grouped value heads (Hq = Hk < Hv, transformers' Qwen3.5)
    and grouped key/value heads (Hk = Hv < Hq, InfiniteVL's `num_linear_key_value_heads`) are both covered.

The chunked form is the WY / UT formulation used by flash-linear-attention: inside a chunk the recurrence becomes a
unit-lower-triangular solve plus matmuls, and only the chunk-to-chunk state update is sequential. It is written for
CPU throughput (one solve for both right-hand sides, chunk-major layout so that each step reads contiguous memory)
and is differentiable through autograd. This module does not select backends; see `backend.py`.
"""

from __future__ import annotations

import torch

State = torch.Tensor


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64 (useful for exact reference checks); never lower than fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension, as flash-linear-attention normalises q and k."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _expand_heads(q, k, v, g, beta):
    """Check shapes and repeat q, k or v over head groups so that all have H heads; returns (..., H)."""
    heads = (q.shape[2], k.shape[2], v.shape[2], g.shape[2], beta.shape[2])
    H = max(heads)
    if any(H % h for h in heads) or g.shape[2] != H or beta.shape[2] != H:
        raise ValueError(
            f"head counts q/k/v/g/beta = {heads}: g and beta need H = {H} heads and the rest must divide it"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2] == g.shape[:2] == beta.shape[:2]):
        raise ValueError(
            f"batch/time shapes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"g {tuple(g.shape)}, beta {tuple(beta.shape)}"
        )
    q, k, v = (x.repeat_interleave(H // x.shape[2], dim=2) if x.shape[2] != H else x for x in (q, k, v))
    return q, k, v, g, beta, H


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    """fp32 copies with heads expanded to H, q and k normalised, q scaled; returns (q, k, v, g, beta, H)."""
    q, k, v, g, beta, H = _expand_heads(q, k, v, g, beta)
    acc = accumulation_dtype(q, k, v)
    q, k, v = (x.to(acc) for x in (q, k, v))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return q * scale, k, v, g.to(acc), beta.to(acc), H


def _initial(state, B, H, Dk, Dv, device, dtype=torch.float32):
    if state is None:
        return torch.zeros(B, H, Dk, Dv, dtype=dtype, device=device)
    if state.shape != (B, H, Dk, Dv):
        raise ValueError(f"initial state has shape {tuple(state.shape)}, expected {(B, H, Dk, Dv)}")
    return state.to(dtype)


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: State | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, State]:
    """Reference: the recurrence one token at a time. Returns (o [B, T, H, Dv], final state [B, H, Dk, Dv])."""
    out_dtype = v.dtype
    q, k, v, g, beta, H = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    B, T, _, Dk = q.shape
    S = _initial(initial_state, B, H, Dk, v.shape[-1], q.device, q.dtype)
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        pred = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        u = beta[:, t, :, None] * (v[:, t] - pred)
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1])
    return o.to(out_dtype), S


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: State,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, State]:
    """One token (T = 1) for decoding. With `inplace=True` the given fp32 state is updated in place (no allocation
    of a new state), which is what the engine uses; the returned state is then the same tensor."""
    if q.shape[1] != 1:
        raise ValueError(f"gated_delta_rule_step takes one token, got T = {q.shape[1]}")
    out_dtype = v.dtype
    q, k, v, g, beta, H = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    q, k, v, g, beta = q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]  # [B, H, D], [B, H]
    B, _, Dk = q.shape
    if state.dtype != q.dtype or state.shape != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"state must be {q.dtype} {(B, H, Dk, v.shape[-1])}, got {state.dtype} {tuple(state.shape)}")
    S = state if inplace else state.clone()
    S.mul_(g.exp()[..., None, None])
    pred = torch.matmul(k.unsqueeze(-2), S).squeeze(-2)  # [B, H, Dv]
    u = (v - pred).mul_(beta[..., None])
    S.add_(k.unsqueeze(-1) * u.unsqueeze(-2))  # rank-1 update
    o = torch.matmul(q.unsqueeze(-2), S)  # [B, H, 1, Dv]
    return o.transpose(1, 2).to(out_dtype), S


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: State | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, State]:
    """The same recurrence chunk by chunk (differentiable). Returns (o [B, T, H, Dv], final state).

    Per chunk of C tokens with log-decays gamma (cumulative from the chunk start) and start state S0:
        A = strict_lower(diag(beta) K K^T * D)  with D_ij = exp(gamma_i - gamma_j)
        T = (I + A)^-1 diag(beta);   U = T V;   W = T diag(exp(gamma)) K
        V' = U - W S0                                   (the deltas actually written)
        O  = diag(exp(gamma)) Q S0 + (Q K^T * D) V'     (causal, diagonal included)
        S1 = exp(gamma_C) S0 + K^T diag(exp(gamma_C - gamma)) V'
    Only S0 -> S1 is sequential; everything else is batched over chunks and heads.
    """
    out_dtype = v.dtype
    B, T, _, Dk = q.shape
    q, k, v, g, beta, H = _expand_heads(q, k, v, g, beta)
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    acc = accumulation_dtype(q, k, v)
    S = _initial(initial_state, B, H, Dk, Dv, q.device, acc)
    # Without autograd the same arithmetic runs in place and into reused buffers: on CPU, fresh large tensors cost
    # more in first-touch page faults than the arithmetic done on them.
    inplace = not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta, S)))
    BH = B * H
    n_full, rest = divmod(T, chunk_size)
    pieces = [(0, n_full, chunk_size)] if n_full else []
    if rest:  # a shorter last chunk instead of padding
        pieces.append((n_full * chunk_size, 1, rest))

    S = S.reshape(BH, Dk, Dv)
    if inplace:
        S = S.clone()
        out = torch.empty(B, T, H, Dv, dtype=acc, device=q.device)
    outs = []
    for start, n_chunks, C in pieces:
        span = slice(start, start + n_chunks * C)
        c = _ChunkTerms(
            q[:, span], k[:, span], v[:, span], g[:, span], beta[:, span], n_chunks, scale, use_qk_l2norm, inplace, acc
        )
        if inplace:
            readers = torch.empty(BH, 2 * C, Dk, dtype=acc, device=q.device)  # [W_n; Q_n]: S read once
            read = torch.empty(BH, 2 * C, Dv, dtype=acc, device=q.device)
            for n in range(n_chunks):
                torch.bmm(c.t_beta_decay[n], c.k[n], out=readers[:, :C])
                torch.mul(c.q[n], c.q_factor[n], out=readers[:, C:])
                torch.bmm(readers, S, out=read)
                v_new = torch.bmm(c.t_beta[n], c.v[n]).sub_(read[:, :C])
                attn = torch.bmm(readers[:, C:], c.k[n].transpose(-1, -2)).mul_(c.decay[n])
                o_n = read[:, C:].mul_(c.q_decay[n]).baddbmm_(attn, v_new)
                t0 = start + n * C
                out[:, t0 : t0 + C].copy_(o_n.view(B, H, C, Dv).transpose(1, 2))  # straight into [B, T, H, Dv]
                S.mul_(c.chunk_decay[n]).baddbmm_(c.k[n].transpose(-1, -2), v_new.mul_(c.to_end[n]))
        else:
            for n in range(n_chunks):
                qn = c.q[n] * c.q_factor[n]
                kT = c.k[n].transpose(-1, -2)
                v_new = c.t_beta[n] @ c.v[n] - (c.t_beta_decay[n] @ c.k[n]) @ S
                attn = (qn @ kT) * c.decay[n]
                o_n = torch.baddbmm((qn @ S) * c.q_decay[n], attn, v_new)
                outs.append(o_n.view(B, H, C, Dv).transpose(1, 2))
                S = torch.baddbmm(S * c.chunk_decay[n], kT, v_new * c.to_end[n])
    if not inplace:
        out = torch.cat(outs, dim=1) if outs else v.new_zeros(B, 0, H, Dv, dtype=acc)
    return out.to(out_dtype), S.reshape(B, H, Dk, Dv)


class _ChunkTerms:
    """Everything about a run of equal-length chunks that does not depend on the carried state.

    Tensors are [n, B*H, C, ...]. For batch 1, q and v stay strided views of the caller's tensors (no copy); k is
    copied once because it is normalised in place and read many times. `q_factor` holds the per-row normalisation
    and scale that is applied to q on the fly. Nothing is ever written into the caller's tensors.
    """

    def __init__(self, q, k, v, g, beta, n, scale, use_qk_l2norm, inplace, acc):
        B, _, H, Dk = q.shape
        C = q.shape[1] // n

        def chunks(x: torch.Tensor, copy: bool) -> torch.Tensor:
            rest = x.shape[3:]
            x = x.reshape(B, n, C, H, *rest).permute(1, 0, 3, 2, *range(4, x.dim() + 1))  # [n, B, H, C, ...]
            if B == 1 and not copy:
                return x.to(acc).reshape(n, H, C, *rest)  # a view: B = 1 merges without a copy
            # always a new tensor: `.contiguous()` would return the caller's own memory whenever the permutation is
            # trivial (one head and batch 1, or chunks of length 1), and k is normalised in place below
            out = torch.empty(n, B * H, C, *rest, dtype=acc, device=x.device)
            out.view(n, B, H, C, *rest).copy_(x)
            return out

        self.q = chunks(q, copy=False)
        self.v = chunks(v, copy=False)
        kc = chunks(k, copy=True)
        if use_qk_l2norm:
            self.q_factor = torch.rsqrt((self.q * self.q).sum(-1, keepdim=True) + 1e-6) * scale
            k_factor = torch.rsqrt((kc * kc).sum(-1, keepdim=True) + 1e-6)
            kc = kc.mul_(k_factor) if inplace else kc * k_factor
        else:
            self.q_factor = torch.full((1, 1, 1, 1), scale, dtype=acc, device=q.device)
        self.k = kc
        gc, bc = chunks(g, copy=True), chunks(beta, copy=True)  # [n, BH, C]

        gamma = gc.cumsum(-1)  # log decay from the chunk start
        eg = gamma.exp()
        upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
        self.decay = (gamma.unsqueeze(-1) - gamma.unsqueeze(-2)).masked_fill_(upper, float("-inf")).exp_()
        system = kc @ kc.transpose(-1, -2)
        if inplace:
            system.mul_(self.decay).mul_(bc.unsqueeze(-1)).tril_(-1).diagonal(dim1=-2, dim2=-1).fill_(1.0)
        else:
            system = (system * self.decay * bc.unsqueeze(-1)).tril(-1) + torch.eye(C, dtype=acc, device=q.device)
        eye = torch.eye(C, dtype=system.dtype, device=q.device).expand_as(system)
        t_beta = torch.linalg.solve_triangular(system, eye, upper=False, unitriangular=True)
        self.t_beta = t_beta.mul_(bc.unsqueeze(-2)) if inplace else t_beta * bc.unsqueeze(-2)  # (I+A)^-1 diag(beta)
        self.t_beta_decay = self.t_beta * eg.unsqueeze(-2)  # (I+A)^-1 diag(beta exp(gamma))
        self.q_decay = eg.unsqueeze(-1)  # rows of Q S0 decay from the chunk start
        self.to_end = (gamma[..., -1:] - gamma).exp().unsqueeze(-1)  # decay from each position to the chunk end
        self.chunk_decay = gamma[..., -1].exp()[..., None, None]
