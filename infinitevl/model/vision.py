"""The vision tower and patch merger: transformers' Qwen2.5-VL implementation, reused as is.

Only the construction from our config and the call convention live here (transformers >= 5 returns the merged
tokens as `pooler_output`). Parameter names equal the checkpoints' `visual.*` names.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from ..config import VisionConfig


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
    return Qwen2_5_VisionTransformerPretrainedModel(hf)


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
