"""Short conv, gated RMSNorm and sliding-window attention against plain references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

from infinitevl.ops.attention import attention_decode, sliding_window_attention
from infinitevl.ops.norm import gated_rms_norm
from infinitevl.ops.short_conv import causal_conv1d, causal_conv1d_step


def test_conv_step_equals_full_and_tail_carries_over():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 6, generator=gen)
    w = torch.randn(6, 4, generator=gen)
    y_full, tail_full = causal_conv1d(x, w)
    # definition: zero history, tap 3 on the current token, silu after
    ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w.unsqueeze(1), groups=6)).transpose(1, 2)
    torch.testing.assert_close(y_full, ref)
    y1, tail = causal_conv1d(x[:, :5], w)
    steps = [y1]
    for t in range(5, 11):
        y, tail = causal_conv1d_step(x[:, t], w, tail)
        steps.append(y.unsqueeze(1))
    torch.testing.assert_close(torch.cat(steps, 1), y_full)
    torch.testing.assert_close(tail, tail_full)
    # in place: the tail buffer itself is shifted
    buf = tail_full.clone()
    y, returned = causal_conv1d_step(x[:, 0], w, buf, inplace=True)
    assert returned.data_ptr() == buf.data_ptr()


def test_conv_left_padding_is_skipped():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 7, 3, generator=gen)
    w = torch.randn(3, 4, generator=gen)
    tail = torch.randn(1, 3, 3, generator=gen)
    y_ref, t_ref = causal_conv1d(x, w, tail)
    padded = torch.cat([torch.randn(1, 4, 3, generator=gen), x], dim=1)  # garbage in the padding
    y, t = causal_conv1d(padded, w, tail, num_left_pad=torch.tensor([4]))
    torch.testing.assert_close(y[:, 4:], y_ref)
    torch.testing.assert_close(t, t_ref)


def test_gated_rms_norm_matches_transformers():
    gen = torch.Generator().manual_seed(2)
    x, gate = torch.randn(2, 5, 3, 16, generator=gen), torch.randn(2, 5, 3, 16, generator=gen)
    ref = Qwen3NextRMSNormGated(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.1 * torch.randn(16, generator=gen))
    torch.testing.assert_close(gated_rms_norm(x, gate, ref.weight, 1e-5), ref(x, gate))


def dense_reference(q, k, v, q_pos, k_pos, window):
    """Softmax attention with an explicit [Tq, Tk] band mask (repeat heads for GQA)."""
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    p = s.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("window", [1, 5, 24, None])
@pytest.mark.parametrize("block", [4, 16, 256])
def test_blockwise_swa_equals_dense(window, block):
    gen = torch.Generator().manual_seed(3)
    B, T, H, KV, D = 2, 50, 4, 2, 8
    q, k, v = (torch.randn(B, T, h, D, generator=gen) for h in (H, KV, KV))
    pos = torch.arange(T).expand(B, T)
    out = sliding_window_attention(q, k, v, pos, pos, window, block_size=block)
    torch.testing.assert_close(out, dense_reference(q, k, v, pos, pos, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [3, 8, 64])
def test_swa_chunk_after_cached_keys(block):
    # a chunk of 9 queries after a cache of 7 slots, 3 of them still empty (-1), plus a left-padded row
    gen = torch.Generator().manual_seed(4)
    B, H, KV, D, W = 2, 4, 1, 8, 6
    cache_pos = torch.tensor([[-1, -1, -1, 0, 1, 2, 3], [-1, -1, -1, -1, -1, -1, 0]])
    q_pos = torch.tensor([[4, 5, 6, 7, 8, 9, 10, 11, 12], [-1, -1, 1, 2, 3, 4, 5, 6, 7]])
    k_pos = torch.cat([cache_pos, q_pos], 1)
    q = torch.randn(B, 9, H, D, generator=gen)
    k, v = torch.randn(B, 16, KV, D, generator=gen), torch.randn(B, 16, KV, D, generator=gen)
    out = sliding_window_attention(q, k, v, q_pos, k_pos, W, block_size=block)
    ref = dense_reference(q, k, v, q_pos, k_pos, W)
    real = q_pos >= 0
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()  # padding queries give finite values


def test_decode_against_cache_equals_dense():
    gen = torch.Generator().manual_seed(5)
    B, H, KV, D, N = 2, 4, 2, 8, 10
    q = torch.randn(B, 1, H, D, generator=gen)
    k_cache, v_cache = torch.randn(B, KV, N, D, generator=gen), torch.randn(B, KV, N, D, generator=gen)
    visible = torch.rand(B, N, generator=gen) > 0.3
    k_new, v_new = torch.randn(B, 1, KV, D, generator=gen), torch.randn(B, 1, KV, D, generator=gen)
    out = attention_decode(q, k_cache, v_cache, visible, k_new, v_new)
    keys = torch.cat([k_cache.transpose(1, 2), k_new], 1)
    values = torch.cat([v_cache.transpose(1, 2), v_new], 1)
    k_pos = torch.cat([torch.where(visible, 0, -1), torch.zeros(B, 1, dtype=torch.long)], 1)
    ref = dense_reference(q, keys, values, torch.zeros(B, 1, dtype=torch.long), k_pos, None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fast_matrix_vector_product_matches_linear():
    from infinitevl.ops import linear as lin

    gen = torch.Generator().manual_seed(6)
    w = torch.randn(2 * lin.MIN_ELEMENTS // 512, 512, generator=gen)
    b = torch.randn(w.shape[0], generator=gen)
    with torch.no_grad():
        for shape in ((1, 512), (3, 512), (2, 1, 512)):  # decode rows, a small batch, [B, T, d]
            x = torch.randn(*shape, generator=gen)
            assert lin.fast_path_applies(x, w) == lin._enabled
            got, ref = lin.linear(x, w, b), F.linear(x, w, b)
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    x = torch.randn(1, 512, requires_grad=True)  # with autograd: plain F.linear, gradients as usual
    assert not lin.fast_path_applies(x, w)
    lin.linear(x, w, b).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0, keepdim=True), atol=1e-4, rtol=1e-5)
