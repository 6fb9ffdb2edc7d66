"""The attention patterns of the paper's v2 variants (docs/variants.md), without a T x T mask.

Online, `sink_window_attention`: a query at stream position i sees key j (j <= i) when j < num_sinks or
i - j < window: StreamingLLM's attention sinks plus a sliding window.

Offline, `block_sparse_attention` (after InfLLM-V2): keys are cut into chunks of C tokens by stream position
(chunk c holds positions cC .. cC + C - 1), each summarised by the mean of its (rotated) keys. A query at position i
sees
    I_init   the first `init_chunks` chunks,
    I_local  the last `local_tokens` positions (i - j < local_tokens), itself included,
    I_topk   the `top_k` chunks after I_init that start before I_local whose summaries score highest,
and every earlier key when i < dense_threshold. Scores are per query token and key/value group: each query head's
softmax over the candidate chunks of q . mean(k) * scale, summed over the heads that share the key/value head, so a
group selects together (`select_chunks`). Selection is per token, so chunked prefill and decoding select exactly as
one full pass does. `block_sparse_attention_reference` builds the explicit mask and attends densely (the reference
for tests); `block_sparse_attention` computes the same thing as the sink/window part (init + local, blockwise) merged
with the top-k part computed chunk by chunk, so its work grows as T x (local + top_k x C), not T^2.

Shapes: q [B, Tq, H, D], k and v [B, Tk, KV, D] (H a multiple of KV), positions [B, Tq] / [B, Tk] int64 stream
positions (-1 = padding, never attended to). For the sink/window op keys are in stream order; for the block-sparse
ops keys are indexed by position (key index j holds stream position j, or is padding), which is what the Offline
cache stores. Outputs [B, Tq, H, D]; a query that sees no key (padding) gets zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SparsePattern:
    """The Offline pattern's sizes (config fields `sparse_*`)."""

    chunk_size: int = 32
    top_k: int = 64
    init_chunks: int = 1
    local_tokens: int = 2048
    dense_threshold: int = 8192

    @classmethod
    def from_config(cls, text_config) -> SparsePattern:
        t = text_config
        return cls(
            t.sparse_chunk_size, t.sparse_top_k, t.sparse_init_chunks, t.sparse_local_tokens, t.sparse_dense_threshold
        )


# -- the sink + window pattern ---------------------------------------------------------------------------------------
def sink_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, num_sinks: int) -> torch.Tensor:
    """[B, Tq, Tk] bool: key j visible to query i (causal; j < num_sinks or i - j < window)."""
    qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    mask = (kp >= 0) & (kp <= qp) & (qp >= 0)
    if window is not None:
        mask &= (kp > qp - window) | (kp < num_sinks)
    return mask


def _attend(q, k, v, mask, scale, want_lse, own=None):
    """q [B, H, Tq, D], k/v [B, KV, Tk, D], mask [B, Tq, Tk] -> o [B, H, Tq, D] (and lse [B, H, Tq], fp32).

    The log-sum-exp comes out of the fused SDPA kernel through one extra key per query (a probe): its score is the
    query's score against its own key `own` [B, Tq, KV, D] (always visible, so the probe's weight is at most one half)
    and its value is 1 in an extra channel, 0 elsewhere. That channel's output is e^p / (Z + e^p), which gives Z; the
    other channels are the attention output times Z / (Z + e^p)."""
    B, H, Tq, D = q.shape
    KV = k.shape[1]
    if not want_lse:
        # a query with no visible key (padding) attends to everything: finite values that nobody reads
        mask = mask | ~mask.any(-1, keepdim=True)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=KV != H
        ), None
    G = H // KV
    own_score = (q.view(B, KV, G, Tq, D) * own.permute(0, 2, 1, 3).unsqueeze(2)).sum(-1).view(B, H, Tq, 1)
    Tk = k.shape[2]
    q2 = torch.cat([q, own_score], dim=-1)  # [B, H, Tq, D + 1]
    k2 = q.new_zeros(B, KV, Tk + 1, D + 1)
    k2[:, :, :Tk, :D] = k
    k2[:, :, Tk, D] = 1.0  # the probe key: its score is the extra query channel
    v2 = q.new_zeros(B, KV, Tk + 1, D + 1)
    v2[:, :, :Tk, :D] = v
    v2[:, :, Tk, D] = 1.0
    real = mask.any(-1)  # [B, Tq]: queries with a visible key (own key included)
    mask2 = torch.cat([mask, real.unsqueeze(-1)], dim=-1)
    mask2 = mask2 | ~mask2.any(-1, keepdim=True)  # padding queries: finite values, dropped below
    o2 = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask2.unsqueeze(1), scale=scale, enable_gqa=KV != H)
    share = o2[..., D].float()  # e^p / (Z + e^p), at most 1/2
    realh = real.unsqueeze(1)
    if bool((realh & (share < _SMALLEST_SHARE)).any()):
        # the query's own key scores far below its best one (sharp attention elsewhere): the probe's weight has
        # underflowed or would blow up log's gradient, so this block's scores are taken explicitly
        return _attend_explicit(q, k, v, mask, scale, real)
    o = (o2[..., :D].float() / (1 - share).unsqueeze(-1)).to(q.dtype)
    lse = own_score.squeeze(-1).float() * scale + torch.log1p(-share) - torch.log(share)
    return o.masked_fill(~realh.unsqueeze(-1), 0.0), lse.masked_fill(~realh, float("-inf"))


# below this probe weight the probe's log-sum-exp is not trusted (fp32 keeps e^-27 with full relative precision;
# smaller weights mean a query's best key outscores its own by over 27 nats, which the explicit path handles)
_SMALLEST_SHARE = 1e-12


def _attend_explicit(q, k, v, mask, scale, real):
    """`_attend`'s result with its log-sum-exp from the scores themselves (fp32): q [B, H, Tq, D], k/v
    [B, KV, Tk, D], mask [B, Tq, Tk], real [B, Tq] (queries with a visible key)."""
    B, H, Tq, D = q.shape
    KV = k.shape[1]
    qg = q.float().view(B, KV, H // KV, Tq, D)
    s = torch.matmul(qg, k.float().unsqueeze(2).transpose(-1, -2)) * scale  # [B, KV, G, Tq, Tk]
    s = s.masked_fill(~mask[:, None, None], float("-inf"))
    realg = real[:, None, None, :, None]
    s = s.masked_fill(~realg, 0.0)  # padding queries: finite scores, dropped below
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    o = torch.matmul(torch.exp(s - lse), v.float().unsqueeze(2))  # [B, KV, G, Tq, D]
    realh = real.unsqueeze(1)
    o = o.reshape(B, H, Tq, D).to(q.dtype).masked_fill(~realh.unsqueeze(-1), 0.0)
    return o, lse.reshape(B, H, Tq).masked_fill(~realh, float("-inf"))


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    num_sinks: int,
    scale: float | None = None,
    block_size: int = 256,
    return_lse: bool = False,
):
    """Blockwise over queries: each block meets the sink keys and the keys its window reaches, so memory is
    O(block x (sinks + block + W)). Keys in stream order. With `return_lse`, also the log-sum-exp [B, Tq, H] (fp32)
    of each query's scores, for merging with attention over other keys."""
    B, Tq, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k_sorted = k_pos.cummax(dim=1).values.contiguous()  # padding takes the previous valid position
    big = torch.iinfo(q_pos.dtype).max
    n_sink = int(torch.searchsorted(k_sorted, torch.full((B, 1), num_sinks, device=k_pos.device)).max())
    outs, lses = [], []
    for qs in range(0, Tq, block_size):
        qe = min(qs + block_size, Tq)
        block = q_pos[:, qs:qe]
        first = torch.where(block >= 0, block, big).min(dim=1, keepdim=True).values
        lo_pos = first - window + 1 if window is not None else torch.zeros_like(first)
        lo = int(torch.searchsorted(k_sorted, lo_pos.clamp(min=0)).min())
        hi = int(torch.searchsorted(k_sorted, block.max(dim=1, keepdim=True).values, right=True).max())
        lo = max(lo, min(n_sink, hi)) if window is not None else 0
        idx = torch.cat([torch.arange(min(n_sink, lo), device=q.device), torch.arange(lo, hi, device=q.device)])
        mask = sink_window_mask(block, k_pos[:, idx], window, num_sinks)
        own = _own_keys(k, q_pos[:, qs:qe], k_sorted) if return_lse else None
        o, lse = _attend(qh[:, :, qs:qe], kh[:, :, idx], vh[:, :, idx], mask, scale, return_lse, own)
        outs.append(o)
        lses.append(lse)
    o = torch.cat(outs, dim=2).transpose(1, 2)
    return (o, torch.cat(lses, dim=2).transpose(1, 2)) if return_lse else o


def _own_keys(k: torch.Tensor, q_pos: torch.Tensor, k_sorted: torch.Tensor) -> torch.Tensor:
    """Each query's own key [B, Tq, KV, D] (the key at its position; any key for padding queries)."""
    idx = torch.searchsorted(k_sorted, q_pos.clamp(min=0)).clamp(max=k.shape[1] - 1)  # [B, Tq]
    return torch.gather(k, 1, idx[..., None, None].expand(-1, -1, *k.shape[2:]))


# -- the block-sparse pattern ----------------------------------------------------------------------------------------
def chunk_means(keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """keys [B, N, KV, D] indexed by position -> mean of each complete chunk [B, KV, N // C, D]."""
    B, N, KV, D = keys.shape
    n = N // chunk_size
    return keys[:, : n * chunk_size].reshape(B, n, chunk_size, KV, D).mean(2).transpose(1, 2)


def candidate_chunks(q_pos: torch.Tensor, num_chunks: int, pattern: SparsePattern) -> torch.Tensor:
    """[B, Tq, n] bool: chunk c may be selected by the query (after I_init, starting before I_local; a chunk that
    straddles I_local's start contributes its keys outside I_local). With local_tokens >= C all are complete."""
    c = torch.arange(num_chunks, device=q_pos.device)
    before_local = q_pos - pattern.local_tokens  # the last position before I_local
    end = torch.div(before_local, pattern.chunk_size, rounding_mode="floor") + 1  # chunks c < end start before it
    return (c >= pattern.init_chunks) & (c < end.unsqueeze(-1)) & (q_pos >= 0).unsqueeze(-1)


def select_chunks(
    q: torch.Tensor,
    means: torch.Tensor,
    q_pos: torch.Tensor,
    pattern: SparsePattern,
    scale: float | None = None,
    dense: bool = True,
) -> torch.Tensor:
    """Which chunks each query's key/value group attends to beyond I_init and I_local: [B, KV, Tq, n] bool.

    q [B, Tq, H, D], means [B, KV, n, D] (chunk summaries). Queries below the dense threshold take every candidate
    (with `dense=False`, none: the caller attends to them densely itself)."""
    B, Tq, H, D = q.shape
    KV, n = means.shape[1], means.shape[2]
    scale = D**-0.5 if scale is None else scale
    cand = candidate_chunks(q_pos, n, pattern)  # [B, Tq, n]
    if n == 0:
        return cand.unsqueeze(1).expand(B, KV, Tq, n)
    qg = q.float().view(B, Tq, KV, H // KV, D).permute(0, 2, 3, 1, 4)  # [B, KV, G, Tq, D]
    s = torch.matmul(qg, means.float().unsqueeze(2).transpose(-1, -2)) * scale  # [B, KV, G, Tq, n]
    s = s.masked_fill(~cand[:, None, None], float("-inf")).softmax(-1).nan_to_num_(0.0)
    score = s.sum(2)  # [B, KV, Tq, n]: the heads of a group vote together
    top = score.topk(min(pattern.top_k, n), dim=-1).indices
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
    below = ((q_pos >= 0) & (q_pos < pattern.dense_threshold))[:, None, :, None]
    return cand.unsqueeze(1) & ((chosen | below) if dense else (chosen & ~below))


def block_sparse_mask(
    q: torch.Tensor,
    means: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    pattern: SparsePattern,
    scale: float | None = None,
) -> torch.Tensor:
    """The explicit mask [B, KV, Tq, Tk] bool of the Offline pattern (keys indexed by position)."""
    C = pattern.chunk_size
    sel = select_chunks(q, means, q_pos, pattern, scale)  # [B, KV, Tq, n]
    Tk = k_pos.shape[1]
    chunk_of_key = torch.arange(Tk, device=q.device) // C
    picked = torch.zeros(*sel.shape[:3], Tk, dtype=torch.bool, device=q.device)
    inside = chunk_of_key < sel.shape[-1]
    picked[..., inside] = sel[..., chunk_of_key[inside]]
    base = sink_window_mask(q_pos, k_pos, pattern.local_tokens, pattern.init_chunks * C)  # I_init and I_local
    causal = sink_window_mask(q_pos, k_pos, None, 0)
    return (base.unsqueeze(1) | picked) & causal.unsqueeze(1)


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    pattern: SparsePattern,
    means: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention under `block_sparse_mask`: the plain reference (O(Tq x Tk) memory)."""
    B, Tq, H, D = q.shape
    KV = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    means = chunk_means(k, pattern.chunk_size) if means is None else means
    mask = block_sparse_mask(q, means, q_pos, k_pos, pattern, scale)  # [B, KV, Tq, Tk]
    G = H // KV
    qg = q.float().view(B, Tq, KV, G, D).permute(0, 2, 3, 1, 4)  # [B, KV, G, Tq, D]
    s = torch.matmul(qg, k.float().permute(0, 2, 3, 1).unsqueeze(2)) * scale  # [B, KV, G, Tq, Tk]
    s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = s.softmax(-1).nan_to_num(0.0)
    o = torch.matmul(p, v.float().transpose(1, 2).unsqueeze(2))  # [B, KV, G, Tq, D]
    return o.permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D).to(q.dtype)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    pattern: SparsePattern,
    means: torch.Tensor | None = None,
    scale: float | None = None,
    query_tile: int = 2048,
    pairs_per_step: int = 32768,
) -> torch.Tensor:
    """`block_sparse_attention_reference`'s result without its T x T mask: queries below the dense threshold by
    blockwise causal attention; the others over I_init and I_local blockwise (the sink / window op, with its
    log-sum-exp), then, per tile of queries, over their selected chunks batched chunk by chunk (each chunk's keys
    read once for all the queries that picked it), merged by online softmax."""
    B, Tq, H, D = q.shape
    KV = k.shape[2]
    C = pattern.chunk_size
    scale = D**-0.5 if scale is None else scale
    below = (q_pos >= 0) & (q_pos < pattern.dense_threshold)
    # positions grow along each row, so dense queries (after any left padding) come first: the leading run
    leading = ((q_pos < 0) | below).cumsum(1).eq(torch.arange(1, Tq + 1, device=q.device)).sum(1)
    first, end = int(leading.min()), int(leading.max())
    out = q.new_zeros(B, Tq, H, D)
    if bool(below.any()):
        dense = sink_window_attention(q[:, :end], k, v, q_pos[:, :end], k_pos, None, 0, scale)
        out[:, :end] = dense.masked_fill((q_pos[:, :end] < 0)[..., None, None], 0.0)  # padding queries: zeros
    if first == Tq:
        return out
    means = chunk_means(k, C) if means is None else means
    n = means.shape[2]
    qs, ps = q[:, first:], q_pos[:, first:]
    o_local, lse = sink_window_attention(
        qs, k, v, ps, k_pos, pattern.local_tokens, pattern.init_chunks * C, scale, return_lse=True
    )
    kc = k[:, : n * C].reshape(B, n, C, KV, D)
    vc = v[:, : n * C].reshape(B, n, C, KV, D)
    padc = k_pos[:, : n * C].reshape(B, n, C) < 0  # padding keys inside chunks are never attended to
    for ts in range(0, Tq - first, query_tile):
        te = min(ts + query_tile, Tq - first)
        acc = _TopkAccumulator(o_local[:, ts:te], lse[:, ts:te], KV)
        if n > pattern.init_chunks:
            sel = select_chunks(qs[:, ts:te], means, ps[:, ts:te], pattern, scale, dense=False)  # [B, KV, T, n]
            pairs = sel.permute(0, 1, 3, 2).nonzero()  # (b, g, c, t), sorted by chunk group then query
            if len(pairs):
                _attend_chunks(
                    qs[:, ts:te], ps[:, ts:te], pattern.local_tokens, kc, vc, padc, pairs, acc, scale, pairs_per_step
                )
        o = acc.result().to(q.dtype)
        keep = ~below[:, first + ts : first + te, None, None]
        out[:, first + ts : first + te] = torch.where(keep, o, out[:, first + ts : first + te])
    return out


class _TopkAccumulator:
    """Online-softmax accumulators per (row, key/value group, query), heads of the group inside: max M, sum L,
    unnormalised output O; they start from the normalised local output and its log-sum-exp."""

    def __init__(self, o: torch.Tensor, lse: torch.Tensor, KV: int):
        B, T, H, D = o.shape
        self.shape, self.KV = (B, T, H, D), KV
        # [B, T, KV, G, D] -> [B, KV, T, G, D] -> flat query index (b * KV + g) * T + t
        self.O = o.float().view(B, T, KV, H // KV, D).permute(0, 2, 1, 3, 4).reshape(B * KV * T, H // KV, D)
        M = lse.view(B, T, KV, H // KV).permute(0, 2, 1, 3).reshape(B * KV * T, H // KV)
        self.L = torch.isfinite(M).float()
        self.M = torch.where(torch.isfinite(M), M, torch.full_like(M, -1e30))

    def merge(self, M2: torch.Tensor, L2: torch.Tensor, O2: torch.Tensor) -> None:
        M = torch.maximum(self.M, M2)
        a, b = torch.exp(self.M - M), torch.exp(M2 - M)
        self.L = self.L * a + L2 * b
        self.O = self.O * a.unsqueeze(-1) + O2 * b.unsqueeze(-1)
        self.M = M

    def result(self) -> torch.Tensor:
        B, T, H, D = self.shape
        o = self.O / self.L.clamp_min(1e-30).unsqueeze(-1)
        return o.view(B, self.KV, T, H // self.KV, D).permute(0, 2, 1, 3, 4).reshape(B, T, H, D)


def _attend_chunks(q, q_pos, local_tokens, kc, vc, padc, pairs, acc, scale: float, pairs_per_step: int) -> None:
    """Attention of each (query, group) over the chunks it selected, batched by chunk, merged into `acc`.

    q [B, T, H, D], q_pos [B, T]; kc / vc [B, n, C, KV, D], padc [B, n, C] (padding keys); pairs [P, 4] (b, g, c, t) sorted by (b, g, c). Chunks
    are taken in order of how many queries picked them, so that a step pads each chunk's queries little."""
    B, T, H, D = q.shape
    n, C, KV = kc.shape[1], kc.shape[2], kc.shape[3]
    G, dev = H // KV, q.device
    b, g, c, t = pairs.unbind(1)
    _, counts = torch.unique_consecutive((b * KV + g) * n + c, return_counts=True)
    starts = counts.cumsum(0) - counts
    order = counts.argsort(descending=True)
    counts, starts = counts[order], starts[order]
    qg = q.view(B, T, KV, G, D)
    sizes, step_ends, s0 = counts.tolist(), [], 0
    for i in range(1, len(sizes)):  # a step pads every chunk's queries to its first (largest) count
        if (i + 1 - s0) * sizes[s0] > pairs_per_step:
            step_ends.append(i)
            s0 = i
    step_ends.append(len(sizes))
    s0 = 0
    for s1 in step_ends:
        cnt = counts[s0:s1]
        S, width = s1 - s0, int(cnt[0])
        member = torch.arange(S, device=dev).repeat_interleave(cnt)
        rank = torch.arange(int(cnt.sum()), device=dev) - (cnt.cumsum(0) - cnt).repeat_interleave(cnt)
        idx = starts[s0:s1].repeat_interleave(cnt) + rank  # the pairs of this step
        pb, pg, pt = b[idx], g[idx], t[idx]
        head = starts[s0:s1]  # one pair of each chunk group names the chunk
        hb, hg, hc = b[head], g[head], c[head]
        # padding rows are hidden below, and zero: 0 x NaN from uninitialised memory would reach the keys gradient
        qpad = q.new_zeros(S, width, G, D, dtype=torch.float32)
        qpad[member, rank] = qg[pb, pt, pg].float()
        # keys of a chunk that straddles I_local's start and lie inside it were counted with I_local
        last = torch.full((S, width), -1, dtype=torch.long, device=dev)
        last[member, rank] = q_pos[pb, pt] - local_tokens
        key_pos = hc[:, None] * C + torch.arange(C, device=dev)  # [S, C]
        hidden = (key_pos[:, None, None, :] > last[:, :, None, None]) | padc[hb, hc][
            :, None, None, :
        ]  # [S, width, 1, C]
        keys = kc[hb, hc, :, hg].float()  # [S, C, D]
        values = vc[hb, hc, :, hg].float()
        s = torch.matmul(qpad.view(S, width * G, D), keys.transpose(1, 2)).mul_(scale)  # [S, width*G, C]
        s = s.view(S, width, G, C).masked_fill_(hidden, float("-inf"))
        # each query's max over this step's chunks, then exp(s - max) straight into one accumulation
        qi = torch.full((S, width), len(acc.M), dtype=torch.long, device=dev)  # padding -> a spare row
        qi[member, rank] = (pb * KV + pg) * T + pt
        qi = qi.view(-1)
        m = s.amax(-1).view(S * width, G)
        M2 = torch.full((len(acc.M) + 1, G), -1e30, device=dev).scatter_reduce_(0, qi[:, None].expand_as(m), m, "amax")
        shifted = s.view(S * width, G, C)
        # in place when nothing is trained (amax's backward needs `s` as it was)
        shifted = shifted - M2[qi].unsqueeze(-1) if s.requires_grad else shifted.sub_(M2[qi].unsqueeze(-1))
        p = torch.exp(shifted)
        o = torch.matmul(p.view(S, width * G, C), values).view(S * width, G, D)
        L2 = torch.zeros_like(M2).index_add_(0, qi, p.sum(-1))[:-1]
        O2 = torch.zeros(len(M2), G, D, device=dev).index_add_(0, qi, o)[:-1]
        M2 = M2[:-1]
        acc.merge(M2, L2, O2)
        s0 = s1
