"""Sliding-window softmax attention without a T x T mask: blockwise prefill and a decode step against a cache.

A query at stream position i sees the keys at positions j with i - W < j <= i (itself and the W - 1 before it);
`window=None` means no lower bound (full causal attention). Positions are stream indices, not RoPE indices: padding
tokens have position -1 and are never attended to.

Shapes: q [B, Tq, H, D], k and v [B, Tk, KV, D] with H a multiple of KV (grouped-query attention), positions
[B, Tq] and [B, Tk] int64, output [B, Tq, H, D]. Keys are in stream order (valid positions non-decreasing), and the
last Tq keys are the queries' own (cached keys, if any, come first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..state import graph_capturing


def _band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, Tq, Tk] bool: key j visible to query i."""
    qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    return mask


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    scale: float | None = None,
    block_size: int = 256,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blockwise over queries: each block of `block_size` queries meets only the keys its window can reach, so
    memory is O(block x (block + W)) instead of O(Tq x Tk). With segment ids (packed samples, [B, Tq] / [B, Tk])
    a query sees only keys of its own segment."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    offset = Tk - Tq  # index of query i's own key is offset + i
    if offset < 0:
        raise ValueError(f"more queries ({Tq}) than keys ({Tk})")
    scale = D**-0.5 if scale is None else scale
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
    starts = list(range(0, Tq, block_size))
    lows = _block_key_starts(q_pos, k_pos, window, starts, block_size, offset)
    out = []
    for qs, lo in zip(starts, lows):
        qe = min(qs + block_size, Tq)
        hi = offset + qe
        mask = _band_mask(q_pos[:, qs:qe], k_pos[:, lo:hi], window)
        if q_seg is not None:
            mask &= q_seg[:, qs:qe].unsqueeze(-1) == k_seg[:, lo:hi].unsqueeze(-2)
        # a query always sees its own key: padding queries (no visible key) then give finite values, never NaN
        own = torch.arange(qs, qe, device=q.device).unsqueeze(-1) + offset - lo
        mask |= own == torch.arange(hi - lo, device=q.device)
        o = F.scaled_dot_product_attention(
            qh[:, :, qs:qe],
            kh[:, :, lo:hi],
            vh[:, :, lo:hi],
            attn_mask=mask.unsqueeze(1),
            scale=scale,
            enable_gqa=k.shape[2] != H,
        )
        out.append(o)
    return torch.cat(out, dim=2).transpose(1, 2)


def _block_key_starts(q_pos, k_pos, window, starts, block_size, offset) -> list[int]:
    """For each query block, the first key index any of its queries can see (one host sync for all blocks)."""
    if window is None:
        return [0] * len(starts)
    Tq = q_pos.shape[1]
    # positions made non-decreasing (padding takes the previous valid position) so that they can be searched
    k_sorted = k_pos.cummax(dim=1).values.contiguous()
    big = torch.iinfo(q_pos.dtype).max
    first_q = []
    for qs in starts:
        block = q_pos[:, qs : min(qs + block_size, Tq)]
        first_q.append(torch.where(block >= 0, block, big).min(dim=1).values)  # earliest real query per row
    first_q = torch.stack(first_q, dim=1)  # [B, n_blocks]
    lo = torch.searchsorted(k_sorted, (first_q - window + 1).clamp(min=-1), right=False)  # [B, n_blocks]
    lo = lo.min(dim=0).values.tolist()
    return [min(int(lo_b), offset + qs) for lo_b, qs in zip(lo, starts)]


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_visible: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One query per row against a cache plus its own new key, without concatenating them.

    q [B, 1, H, D]; k_cache / v_cache [B, KV, N, D] (the cache's layout: contiguous rows per head for the matmul);
    cache_visible [B, N] bool; k_new / v_new [B, 1, KV, D]. Returns [B, 1, H, D]. Softmax in fp32.
    """
    B, _, H, D = q.shape
    KV = k_cache.shape[1]
    G = H // KV
    scale = D**-0.5 if scale is None else scale
    if k_cache.shape[2] == 0:  # nothing cached yet: the token sees only itself
        return v_new.view(B, 1, KV, 1, D).expand(B, 1, KV, G, D).reshape(B, 1, H, D).to(q.dtype)
    N = k_cache.shape[2]
    qg = q.view(B, KV, G, D)  # query heads grouped under their key/value head
    s_cache = torch.matmul(qg, k_cache.transpose(-1, -2))  # [B, KV, G, N]
    s_new = (qg * k_new.view(B, KV, 1, D)).sum(-1, keepdim=True)  # [B, KV, G, 1]
    scores = torch.cat([s_cache, s_new], dim=-1).float().mul_(scale)
    if graph_capturing(scores) or not bool(cache_visible.all()):  # no host sync while a CUDA graph records
        scores[..., :N].masked_fill_(~cache_visible[:, None, None, :], float("-inf"))
    p = scores.softmax(-1)
    o = torch.matmul(p[..., :N].to(v_cache.dtype), v_cache).float().add_(p[..., N:] * v_new.view(B, KV, 1, D).float())
    return o.to(q.dtype).view(B, 1, H, D)
