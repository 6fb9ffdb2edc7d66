"""The causal depthwise short convolution of the Gated DeltaNet layer, with its tail state.

    y[t] = silu(sum_j w[:, j] * x[t - K + 1 + j])        (tap K-1 multiplies the current token)

Shapes: x [B, T, C], weight [C, K] (the checkpoint's [C, 1, K] squeezed), tail [B, C, K - 1] = the last K - 1
pre-convolution inputs, oldest first (zeros at the start of a stream). The activation is applied after the conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    tail: torch.Tensor | None = None,
    num_left_pad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-sequence form. Returns (silu(conv(x)) [B, T, C], new tail [B, C, K - 1]).

    `num_left_pad` [B] (optional): row b starts with that many padding tokens, which the convolution skips, so the
    first real token sees `tail` as its history exactly as an unpadded row would.
    """
    B, T, C = x.shape
    K = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(B, C, K - 1)
    if tail.shape != (B, C, K - 1):
        raise ValueError(f"conv tail has shape {tuple(tail.shape)}, expected {(B, C, K - 1)}")
    ext = torch.cat([tail.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, K - 1 + T]
    if num_left_pad is not None and bool((num_left_pad > 0).any()):
        ext = _skip_left_padding(ext, num_left_pad.tolist(), K - 1)
    y = F.conv1d(ext, weight.reshape(C, 1, K).to(x.dtype), groups=C)  # [B, C, T]
    return F.silu(y).transpose(1, 2), ext[..., ext.shape[-1] - (K - 1) :].contiguous()


def _skip_left_padding(ext: torch.Tensor, pads: list[int], width: int) -> torch.Tensor:
    """Move each row's tail to sit just before its first real token, zeros in front (per-row, rows are few)."""
    ext = ext.clone()
    for b, p in enumerate(pads):
        if p:
            tail = ext[b, :, :width].clone()
            ext[b, :, : p + width] = 0
            ext[b, :, p : p + width] = tail
    return ext


def causal_conv1d_step(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: x [B, C] -> (y [B, C], new tail). With `inplace=True` the tail buffer is shifted in place."""
    B, C = x.shape
    K = weight.shape[-1]
    window = torch.cat([tail.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [B, C, K]
    y = F.silu((window * weight.reshape(C, K).to(x.dtype)).sum(-1))
    if inplace:
        tail.copy_(window[..., 1:])
        return y, tail
    return y, window[..., 1:].contiguous()
