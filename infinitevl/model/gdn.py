"""The Gated DeltaNet mixer (27 of the 36 decoder layers of InfiniteVL-4B): linear attention with a fixed-size
matrix memory per head, no positional encoding (order comes from the recurrence and the short conv).

    q, k, v = silu(conv(proj(x)))        heads: q has H, k and v have KVh (each shared by H / KVh heads)
    beta = sigmoid(b_proj(x));  g = -exp(A_log) * softplus(a_proj(x) + dt_bias)     (fp32, g <= 0)
    o = gated_delta_rule(l2norm(q) / sqrt(Dk), l2norm(k), v, g, beta)
    out = o_proj(rmsnorm_per_head(o) * o_norm.weight * silu(g_proj(x)))

Parameter names and shapes follow the official checkpoints (SPEC section 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..ops import backend
from ..ops.linear import Linear
from ..ops.norm import gated_rms_norm
from ..ops.short_conv import causal_conv1d
from ..state import LinearLayerState
from . import step
from .layout import TokenLayout


class ShortConv(nn.Module):
    """Holds a depthwise causal conv kernel [C, 1, K] under the checkpoint's name `<x>_conv1d.weight`."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))


class OutputNorm(nn.Module):
    """The per-head gated RMSNorm's weight [Dv], shared by all heads (`o_norm.weight`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.num_heads = config.num_linear_heads
        self.num_kv_heads = config.num_linear_key_value_heads
        self.head_k_dim = config.linear_head_dim
        self.head_v_dim = config.linear_value_head_dim
        H, KVh, Dk, Dv = self.num_heads, self.num_kv_heads, self.head_k_dim, self.head_v_dim
        self.q_proj = Linear(d, H * Dk, bias=False)
        self.k_proj = Linear(d, KVh * Dk, bias=False)
        self.v_proj = Linear(d, KVh * Dv, bias=False)
        self.a_proj = Linear(d, H, bias=False)
        self.b_proj = Linear(d, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.q_conv1d = ShortConv(H * Dk, config.conv_size)
        self.k_conv1d = ShortConv(KVh * Dk, config.conv_size)
        self.v_conv1d = ShortConv(KVh * Dv, config.conv_size)
        self.g_proj = Linear(d, H * Dv, bias=False)
        self.o_norm = OutputNorm(Dv, config.norm_eps)
        self.o_proj = Linear(H * Dv, d, bias=False)

    def gates(self, x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """beta [B, T, H] and log-decay g [B, T, H], fp32; padding gets beta = 0 and g = 0 (no effect on S)."""
        beta = torch.sigmoid(self.b_proj(x).float())
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        if layout.valid is not None:
            beta = beta * layout.valid.unsqueeze(-1)
            g = g * layout.valid.unsqueeze(-1)
        return beta, g

    def forward(
        self, x: torch.Tensor, layout: TokenLayout, state: LinearLayerState | None = None, kernels: bool = False
    ) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]; `state` (if given) is read and updated in place. One token per row with a state
        is a decode step (`decode`, through the fused kernels when `kernels`)."""
        if state is not None and layout.is_single_token:
            return self.decode(x, state, kernels)
        B, T, _ = x.shape
        H, KVh, Dk, Dv = self.num_heads, self.num_kv_heads, self.head_k_dim, self.head_v_dim
        projected = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        beta, g = self.gates(x, layout)
        if layout.segments is not None:
            o = self._per_sample(projected, convs, g, beta, layout)
        else:
            tails = (state.conv_q, state.conv_k, state.conv_v) if state is not None else (None, None, None)
            results = [
                causal_conv1d(p, c.weight, tail, layout.num_left_pad) for p, c, tail in zip(projected, convs, tails)
            ]
            (q, new_q), (k, new_k), (v, new_v) = results
            o, memory = backend.gated_delta_rule(
                q.view(B, T, H, Dk),
                k.view(B, T, KVh, Dk),
                v.view(B, T, KVh, Dv),
                g,
                beta,
                initial_state=state.memory if state is not None else None,
                use_qk_l2norm=True,
            )
            if state is not None:
                for buf, new in (
                    (state.conv_q, new_q),
                    (state.conv_k, new_k),
                    (state.conv_v, new_v),
                    (state.memory, memory),
                ):
                    buf.copy_(new)
        gate = self.g_proj(x).view(B, T, H, Dv)
        o = self.o_norm(o.to(x.dtype), gate)
        return self.o_proj(o.reshape(B, T, H * Dv))

    def decode(self, x: torch.Tensor, state: LinearLayerState, kernels: bool = False) -> torch.Tensor:
        """One token per row: x [B, 1, d] -> [B, 1, d], `state` updated in place (model/step.py). With the kernels,
        the 16-row gate projections run inside them when they are plain layers in the activations' dtype (as
        quantization leaves them)."""
        B, _, d = x.shape
        x = x.view(B, d)
        a_proj, b_proj = self.a_proj, self.b_proj
        inside = (
            kernels
            and type(a_proj) is Linear
            and type(b_proj) is Linear
            and a_proj.bias is None
            and b_proj.bias is None
            and a_proj.weight.dtype == b_proj.weight.dtype == x.dtype
        )
        a, b = (a_proj.weight, b_proj.weight) if inside else (a_proj(x), b_proj(x))
        o = step.gdn_decode(
            self.q_proj(x),
            self.k_proj(x),
            self.v_proj(x),
            a,
            b,
            x,
            inside,
            self.g_proj(x),
            (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight),
            state,
            self.A_log,
            self.dt_bias,
            self.o_norm.weight,
            self.o_norm.eps,
            self.head_k_dim**-0.5,
            kernels,
        )
        return self.o_proj(o).view(B, 1, d)

    def _per_sample(self, projected, convs, g, beta, layout: TokenLayout) -> torch.Tensor:
        """Packed rows: every sample gets its own conv history and memory, both starting from zero."""
        B, T, _ = projected[0].shape
        H, KVh, Dk, Dv = self.num_heads, self.num_kv_heads, self.head_k_dim, self.head_v_dim
        rows: list[list[torch.Tensor]] = [[] for _ in range(B)]
        filled = [0] * B
        for b, s, e in layout.spans():
            if s > filled[b]:  # padding between samples gives zeros
                rows[b].append(projected[2].new_zeros(1, s - filled[b], H, Dv))
            q, k, v = (causal_conv1d(p[b : b + 1, s:e], c.weight)[0] for p, c in zip(projected, convs))
            o, _ = backend.gated_delta_rule(
                q.view(1, e - s, H, Dk),
                k.view(1, e - s, KVh, Dk),
                v.view(1, e - s, KVh, Dv),
                g[b : b + 1, s:e],
                beta[b : b + 1, s:e],
                use_qk_l2norm=True,
            )
            rows[b].append(o.to(projected[2].dtype))
            filled[b] = e
        for b in range(B):
            if filled[b] < T:
                rows[b].append(projected[2].new_zeros(1, T - filled[b], H, Dv))
        return torch.cat([torch.cat(r, dim=1) for r in rows], dim=0)
