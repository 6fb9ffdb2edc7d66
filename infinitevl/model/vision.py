"""The vision tower and patch merger: transformers' Qwen2.5-VL implementation, reused as is.

Only the construction from our config, the call convention (transformers >= 5 returns the merged tokens as
`pooler_output`) and the attention kernel live here. Parameter names equal the checkpoints' `visual.*` names.

The attention: the tower's layers attend within windows (28 of 32 layers; 16 windows of 64 patches in a 448x448
frame) or within whole frames, given as `cu_seqlens`. transformers' SDPA path calls the kernel once per window, and
a 64-patch call costs more in dispatch than in arithmetic; `windowed_attention` runs all windows of one length as
one batched SDPA call. Each (window, head) is computed as before, so the result is bit for bit the same
(tests/test_vision_attention.py). transformers passes `cu_seqlens` to one call only for implementations whose name
contains "flash", hence the registered name (set after construction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from ..config import VisionConfig

WINDOWED = "infinitevl_windows_flash_sdpa"


def windowed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """q, k, v [1, H, N, D], each span of `cu_seq_lens_q` attending to itself -> ([1, N, H, D], None)."""
    if attention_mask is not None or is_causal or cu_seq_lens_q is None:
        raise ValueError("windowed_attention: the vision tower's spans (cu_seqlens) only, no mask, not causal")
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("windowed_attention: query and key spans differ")
    bounds = cu_seq_lens_q.tolist()
    _, H, N, D = query.shape
    if bounds[0] != 0 or bounds[-1] != N:
        raise ValueError(f"windowed_attention: spans {bounds[0]}..{bounds[-1]} do not cover the {N} tokens")
    starts: dict[int, list[int]] = {}  # window length -> starts, in order
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            starts.setdefault(b - a, []).append(a)
    parts, order = [], []
    for n, firsts in starts.items():
        W = len(firsts)
        if W * n == N:  # one length covering everything, in order: a view
            q, k, v = (x[0].unflatten(1, (W, n)).transpose(0, 1) for x in (query, key, value))
        else:
            idx = (torch.tensor(firsts, device=query.device)[:, None] + torch.arange(n, device=query.device)).flatten()
            order.append(idx)
            q, k, v = (x[0].index_select(1, idx).unflatten(1, (W, n)).transpose(0, 1) for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)  # [W, H, n, D]
        parts.append(o.transpose(1, 2).reshape(W * n, H, D))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if order:  # back from grouped-by-length order to token order
        out = out.index_select(0, torch.argsort(torch.cat(order)))
    return out.unsqueeze(0), None


AttentionInterface.register(WINDOWED, windowed_attention)


def build_vision_tower(config: VisionConfig) -> nn.Module:
    hf = Qwen2_5_VLVisionConfig(
        depth=config.depth,
        hidden_size=config.hidden_size,
        hidden_act=config.hidden_act,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_heads,
        in_channels=config.in_channels,
        patch_size=config.patch_size,
        spatial_merge_size=config.spatial_merge_size,
        temporal_patch_size=config.temporal_patch_size,
        tokens_per_second=config.tokens_per_second,
        window_size=config.window_size,
        out_hidden_size=config.out_hidden_size,
        fullatt_block_indexes=list(config.fullatt_block_indexes),
        initializer_range=config.initializer_range,
    )
    hf._attn_implementation = "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel(hf)
    # after construction: transformers' constructor would look for a flash-attention package under this name
    tower.config._attn_implementation = WINDOWED
    if any(block.attn.config is not tower.config for block in tower.blocks):
        raise RuntimeError("the vision tower's attention layers do not share its config: the kernel was not set")
    return tower


def reset_rotary(tower: nn.Module) -> None:
    """Recompute the tower's non-persistent RoPE frequencies (needed after building on the meta device)."""
    rot = tower.rotary_pos_emb
    inv_freq, _ = rot.compute_axial_rope_parameters(rot.config)
    device = next(tower.parameters()).device
    rot.inv_freq = inv_freq.to(device)
    rot.original_inv_freq = inv_freq.clone().to(device)


def encode(tower: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """pixels [n_patches, 3*2*14*14], grid_thw [n, 3] -> merged tokens [n_patches / 4, out_hidden]."""
    param = next(tower.parameters())
    out = tower(pixels.to(device=param.device, dtype=param.dtype), grid_thw=grid_thw.to(param.device))
    return out.pooler_output if hasattr(out, "pooler_output") else out
