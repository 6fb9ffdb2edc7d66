"""The sliding-window softmax attention mixer (9 of 36 layers): unchanged Qwen2.5-VL attention (GQA, q/k/v biases,
multimodal RoPE) restricted to a window of W tokens. With a state, the keys of the previous W - 1 tokens come from
the ring buffer; the result equals one full pass. `full_attention` layers (teacher models) use the same code with
no window."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from ..ops.attention import sliding_window_attention
from ..ops.linear import Linear
from ..state import AttentionLayerState
from . import step
from .layout import TokenLayout
from .rope import apply_rope


class SlidingWindowAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.layer_window(layer_idx)
        d, H, KV, hd = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = Linear(d, H * hd, bias=True)
        self.k_proj = Linear(d, KV * hd, bias=True)
        self.v_proj = Linear(d, KV * hd, bias=True)
        self.o_proj = Linear(H * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: TokenLayout,
        state: AttentionLayerState | None = None,
        past_tokens: torch.Tensor | None = None,
        kernels: bool = False,
    ) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]; cos/sin [B, T, head_dim]; `state` (if given) is read and updated in place. One
        token per row with a state is a decode step (`decode`, through the fused kernel when `kernels`)."""
        if state is not None and layout.is_single_token:
            return self.decode(x, cos, sin, state, past_tokens, kernels)
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, hd), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, KV, hd), cos, sin)
        v = self.v_proj(x).view(B, T, KV, hd)
        if state is None:
            seg = layout.segments
            o = sliding_window_attention(q, k, v, layout.positions, layout.positions, self.window, q_seg=seg, k_seg=seg)
        else:
            ring_k, ring_v, ring_pos = state.ordered(past_tokens)
            keys = torch.cat([ring_k.transpose(1, 2), k.to(ring_k.dtype)], dim=1)
            values = torch.cat([ring_v.transpose(1, 2), v.to(ring_v.dtype)], dim=1)
            o = sliding_window_attention(
                q,
                keys.to(q.dtype),
                values.to(q.dtype),
                layout.positions,
                torch.cat([ring_pos, layout.positions], dim=1),
                self.window,
            )
            state.write(k, v, layout.positions)
        return self.o_proj(o.reshape(B, T, H * hd))

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        state: AttentionLayerState,
        past_tokens: torch.Tensor,
        kernels: bool = False,
    ) -> torch.Tensor:
        """One token per row: x [B, 1, d] -> [B, 1, d]; RoPE, attention over the ring and the token itself, and the
        ring write (model/step.py)."""
        B, _, d = x.shape
        x = x.view(B, d)
        o = step.swa_decode(
            self.q_proj(x),
            self.k_proj(x),
            self.v_proj(x),
            cos,
            sin,
            state,
            past_tokens,
            self.head_dim**-0.5,
            kernels,
        )
        return self.o_proj(o).view(B, 1, d)
