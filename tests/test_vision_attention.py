"""The vision tower's batched window attention against transformers' own SDPA path (one kernel call per window):
the same tower weights, the same inputs, bit for bit, with windows of equal and of unequal lengths."""

from __future__ import annotations

import copy

import pytest
import torch

from infinitevl.config import VisionConfig
from infinitevl.model.vision import WINDOWED, build_vision_tower, encode, windowed_attention

CONFIG = VisionConfig(
    depth=4, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=32, fullatt_block_indexes=[1, 3]
)


def _towers(dtype: torch.dtype):
    torch.manual_seed(0)
    ours = build_vision_tower(CONFIG)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    theirs = copy.deepcopy(ours)
    theirs.config._attn_implementation = "sdpa"  # transformers' path: one SDPA call per window
    assert all(block.attn.config is theirs.config for block in theirs.blocks)
    assert ours.config._attn_implementation == WINDOWED
    return ours.to(dtype), theirs.to(dtype)


# 16 x 16 patches: 4 windows of 64; 10 x 14 and 6 x 6 patches: windows of several lengths, two images in one call
@pytest.mark.parametrize("grids", [[[1, 16, 16]], [[1, 10, 14], [1, 6, 6]], [[2, 12, 8]]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_windows_equal_one_call_per_window(grids, dtype):
    ours, theirs = _towers(dtype)
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), CONFIG.patch_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = encode(ours, pixels, grid), encode(theirs, pixels, grid)
    assert a.dtype == dtype and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_gradients_match_through_unequal_windows():
    ours, theirs = _towers(torch.float32)
    grid = torch.tensor([[1, 10, 14]])
    pixels = torch.randn(140, CONFIG.patch_dim, generator=torch.Generator().manual_seed(2))
    grads = []
    for tower in (ours, theirs):
        x = pixels.clone().requires_grad_(True)
        (encode(tower, x, grid) ** 2).sum().backward()
        grads.append((x.grad, tower.blocks[0].attn.qkv.weight.grad))
    for g_ours, g_theirs in zip(*grads):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)


def test_windowed_attention_refuses_what_it_does_not_compute():
    q = torch.randn(1, 2, 8, 4)
    spans = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="no mask"):
        windowed_attention(None, q, q, q, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool), cu_seq_lens_q=spans)
    with pytest.raises(ValueError, match="do not cover"):
        windowed_attention(None, q, q, q, cu_seq_lens_q=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="differ"):
        windowed_attention(None, q, q, q, cu_seq_lens_q=spans, cu_seq_lens_k=torch.tensor([0, 4, 8]))
