"""The ops of one decode step (one token per row, with a state), each a switch between the fused C++ kernel
(ops/fused.py) and its plain PyTorch reference, which takes the same arguments and is what tests hold the kernel to.

The model decides once whether its decode steps take the kernels (`InfiniteVLTextModel.set_decode_path`) and passes
that choice down as `kernels`; prefill and training never do. A new layer type adds its step here, beside these."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import fused
from ..ops.attention import attention_decode
from ..ops.gated_delta import gated_delta_rule_step
from ..ops.norm import gated_rms_norm
from ..ops.norm import rms_norm as rms_norm_reference
from ..ops.short_conv import causal_conv1d_step
from ..state import AttentionLayerState, LinearLayerState
from .rope import apply_rope


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, kernels: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual), or (norm(x) * weight, x) without a residual; x [..., d]."""
    if kernels:
        return fused.rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    return rms_norm_reference(x, weight, eps), x


def silu_mul(gate: torch.Tensor, up: torch.Tensor, kernels: bool = False) -> torch.Tensor:
    """silu(gate) * up, the MLP's activation."""
    if kernels:
        return torch.ops.infinitevl.silu_mul(gate, up)
    return F.silu(gate) * up


def gdn_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    project_ab: bool,
    gate: torch.Tensor,
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    state: LinearLayerState,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    scale: float,
    kernels: bool = False,
) -> torch.Tensor:
    """Gated DeltaNet after its projections: q [B, H*Dk], k [B, KVh*Dk], v [B, KVh*Dv], gate [B, H*Dv]; a, b the
    gate projections [B, H], or with `project_ab` their weights [H, d] applied here to x [B, d]. The conv tails and
    the memory [B, H, Dk, Dv] of `state` are updated in place. Returns the gated-normed output [B, H*Dv]."""
    wq, wk, wv = conv_weights
    if kernels:
        return torch.ops.infinitevl.gdn_decode(
            q, k, v, a, b, x, project_ab, gate, wq, wk, wv, state.conv_q, state.conv_k, state.conv_v, state.memory,
            A_log, dt_bias, norm_weight, eps, scale,
        )  # fmt: skip
    B, H, Dk, Dv = state.memory.shape
    if project_ab:
        a, b = F.linear(x, a), F.linear(x, b)
    tails = (state.conv_q, state.conv_k, state.conv_v)
    qc, kc, vc = (causal_conv1d_step(p, w, t, inplace=True)[0] for p, w, t in zip((q, k, v), conv_weights, tails))
    beta = torch.sigmoid(b.float()).view(B, 1, H)
    g = (-A_log.float().exp() * F.softplus(a.float() + dt_bias.float())).view(B, 1, H)
    o, _ = gated_delta_rule_step(
        qc.view(B, 1, H, Dk),
        kc.view(B, 1, -1, Dk),
        vc.view(B, 1, -1, Dv),
        g,
        beta,
        state.memory,
        scale=scale,
        use_qk_l2norm=True,
        inplace=True,
    )
    return gated_rms_norm(o.to(q.dtype), gate.view(B, 1, H, Dv), norm_weight, eps).reshape(B, H * Dv)


def swa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    state: AttentionLayerState,
    past: torch.Tensor,
    scale: float,
    kernels: bool = False,
) -> torch.Tensor:
    """Attention of one token per row over its layer's ring buffer and itself: q [B, H*D], k, v [B, KV*D], cos/sin
    [B, 1, D] (RoPE at the token), past [B] (tokens seen, the token's stream position). The token's rotated key and
    value are written into the ring. Returns [B, H*D]. The kernel serves sliding windows; a full-attention layer's
    bounded cache keeps the plain path and its checks."""
    B = q.shape[0]
    _, KV, _, D = state.keys.shape
    if kernels and state.window is not None:
        return torch.ops.infinitevl.swa_decode(
            q, k, v, cos.reshape(B, D), sin.reshape(B, D), state.keys, state.values, state.positions, past, scale
        )
    H = q.shape[1] // D
    qr = apply_rope(q.view(B, 1, H, D), cos, sin)
    kr = apply_rope(k.view(B, 1, KV, D), cos, sin)
    v = v.view(B, 1, KV, D)
    ring_k, ring_v, ring_pos = state.filled(past)
    o = attention_decode(qr, ring_k, ring_v, ring_pos >= 0, kr, v, scale)
    state.write(kr, v, past.view(B, 1))
    return o.reshape(B, H * D)
