"""The softmax layers of the paper's v2 variants (docs/variants.md): the same weights as full attention (q/k/v with
biases, o without, multimodal RoPE), another attention pattern.

  SinkWindowAttention   `sink_sliding_attention` (InfiniteVL-Online): sinks plus a sliding window; a fixed cache.
  BlockSparseAttention  `block_sparse_attention` (InfiniteVL-Offline): InfLLM-V2-style chunk selection over every
                        earlier key; the cache keeps all keys and the chunks' mean keys.

Positions are exactly those of full attention: RoPE uses each token's own multimodal position and cached keys are
stored rotated, so nothing shifts when a token leaves the window (StreamingLLM re-numbers positions inside the
cache; these layers do not). Packed training rows (segment ids) are attended to one sample at a time, so that each
sample has its own sinks and chunks. Decoding takes the plain path (no fused kernel for these patterns).
"""

from __future__ import annotations

import torch

from ..config import TextConfig
from ..ops.attention import attention_decode
from ..ops.sparse_attention import SparsePattern, block_sparse_attention, sink_window_attention
from ..state import BlockSparseLayerState, SinkWindowLayerState
from .layout import TokenLayout
from .rope import apply_rope
from .swa import SlidingWindowAttention


class _PatternAttention(SlidingWindowAttention):
    """Shared projections; subclasses say how queries meet keys (`_attend`) with and without a cache."""

    def _qkv(self, x, cos, sin):
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, hd), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, KV, hd), cos, sin)
        return q, k, self.v_proj(x).view(B, T, KV, hd)

    def forward(self, x, cos, sin, layout: TokenLayout, state=None, past_tokens=None, kernels: bool = False):
        """x [B, T, d] -> [B, T, d]; cos/sin [B, T, head_dim]; `state` (if given) is read and updated in place."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if state is not None:
            o = self._attend_cached(q, k, v, layout, state, past_tokens)
        elif layout.segments is not None:
            o = torch.zeros_like(q)
            for b, start, end in layout.spans():  # each packed sample alone, positions from 0
                pos = torch.arange(end - start, device=x.device).unsqueeze(0)
                sl = (slice(b, b + 1), slice(start, end))
                o[sl] = self._attend(q[sl], k[sl], v[sl], pos, pos)
        else:
            o = self._attend(q, k, v, layout.positions, layout.positions)
        return self.o_proj(o.reshape(B, T, -1))


class SinkWindowAttention(_PatternAttention):
    """Query i sees key j <= i when j < num_sink_tokens or i - j < sliding_window."""

    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.num_sinks = config.num_sink_tokens

    def _attend(self, q, k, v, q_pos, k_pos):
        return sink_window_attention(q, k, v, q_pos, k_pos, self.window, self.num_sinks)

    def _attend_cached(self, q, k, v, layout, state: SinkWindowLayerState, past_tokens):
        if layout.is_single_token:  # every cached key is a sink or inside the window: order does not matter
            ring_k, ring_v, ring_pos = state.filled(past_tokens)
            o = attention_decode(q, ring_k.to(q.dtype), ring_v.to(q.dtype), ring_pos >= 0, k, v)
        else:
            ring_k, ring_v, ring_pos = state.ordered(past_tokens)
            keys = torch.cat([ring_k.transpose(1, 2).to(q.dtype), k], dim=1)
            values = torch.cat([ring_v.transpose(1, 2).to(q.dtype), v], dim=1)
            o = self._attend(q, keys, values, layout.positions, torch.cat([ring_pos, layout.positions], dim=1))
        state.write(k, v, layout.positions)
        return o


class BlockSparseAttention(_PatternAttention):
    """Query i sees I_init, I_local and its key/value group's top-k chunks (ops/sparse_attention.py)."""

    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.pattern = SparsePattern.from_config(config)

    def _attend(self, q, k, v, q_pos, k_pos):
        if not bool((k_pos == torch.arange(k_pos.shape[1], device=k_pos.device)).all()):
            k, v, k_pos = _by_position(k, v, k_pos)  # padded rows: key index = stream position
        return block_sparse_attention(q, k, v, q_pos, k_pos, self.pattern)

    def _attend_cached(self, q, k, v, layout, state: BlockSparseLayerState, past_tokens):
        state.write(k, v, layout.positions)  # the cache is indexed by position: new keys go in first
        n = int(layout.positions.max()) + 1
        keys = state.keys[:, :, :n].transpose(1, 2).to(q.dtype)
        values = state.values[:, :, :n].transpose(1, 2).to(q.dtype)
        means = state.chunk_means[:, :, : n // self.pattern.chunk_size].to(q.dtype)
        return block_sparse_attention(q, keys, values, layout.positions, state.positions[:, :n], self.pattern, means)


def _by_position(k, v, k_pos):
    """Keys/values [B, T, KV, D] at stream positions k_pos [B, T] (-1 = padding) -> indexed by position."""
    B, T = k_pos.shape
    n = int(k_pos.max()) + 1
    keys, values = k.new_zeros(B, n, *k.shape[2:]), v.new_zeros(B, n, *v.shape[2:])
    pos = torch.full((B, n), -1, dtype=k_pos.dtype, device=k_pos.device)
    rows, cols = (k_pos >= 0).nonzero(as_tuple=True)
    keys[rows, k_pos[rows, cols]] = k[rows, cols]
    values[rows, k_pos[rows, cols]] = v[rows, cols]
    pos[rows, k_pos[rows, cols]] = k_pos[rows, cols]
    return keys, values, pos
