"""The gated delta rule: chunked form vs token-loop reference vs transformers' independent torch functions."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_next.modeling_qwen3_next import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from infinitevl.ops.gated_delta import (
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    gated_delta_rule_step,
)

LENGTHS = (1, 63, 64, 65, 197)


def inputs(B, T, hq, hk, hv, dk=16, dv=32, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    H = max(hq, hk, hv)
    q = torch.randn(B, T, hq, dk, generator=gen)
    k = torch.randn(B, T, hk, dk, generator=gen)
    v = torch.randn(B, T, hv, dv, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) * 0.7  # log decays in (-0.7, 0]
    beta = torch.rand(B, T, H, generator=gen)
    s0 = torch.randn(B, H, dk, dv, generator=gen) * 0.5
    return [x.to(dtype) for x in (q, k, v, g, beta, s0)]


def assert_unchanged(used, fresh):
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), used, fresh):
        assert torch.equal(a, b), f"{name} was modified by the call"


# Shapes whose chunked views are contiguous, so an in-place normalisation would land on the caller's k: batch 1
# with one head, and a last chunk of one token (T = 65, 129), with and without autograd.
@pytest.mark.parametrize("B,H,T", [(1, 1, 64), (1, 1, 1), (1, 1, 65), (2, 3, 65), (1, 4, 129), (2, 1, 1)])
@pytest.mark.parametrize("grad", [False, True])
def test_chunked_never_writes_into_its_inputs(B, H, T, grad):
    used = inputs(B, T, H, H, H, seed=3)
    with torch.set_grad_enabled(grad):
        gated_delta_rule_chunked(*used[:5], initial_state=used[5], use_qk_l2norm=True)
    assert_unchanged(used, inputs(B, T, H, H, H, seed=3))


def close(a, b, atol, rtol=1e-4):
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs error {err:.3e}"


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B", [1, 2])
def test_chunked_equals_reference_and_transformers(T, with_state, B):
    q, k, v, g, beta, s0 = inputs(B, T, 4, 4, 4)
    init = s0 if with_state else None
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=init, use_qk_l2norm=True)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=init, use_qk_l2norm=True)
    assert_unchanged((q, k, v, g, beta, s0), inputs(B, T, 4, 4, 4))  # the references below get the same inputs
    close(o, o_ref, 2e-5)
    close(s, s_ref, 2e-5)
    o_tc, s_tc = torch_chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    o_tr, s_tr = torch_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    close(o, o_tc, 2e-5)
    close(s, s_tc, 2e-5)
    close(o_ref, o_tr, 2e-5)
    close(s_ref, s_tr, 2e-5)


@pytest.mark.parametrize("T", [63, 130])
def test_grouped_value_heads_match_transformers(T):
    # Qwen3.5-style: 2 query/key heads, each shared by 2 of the 4 value heads
    q, k, v, g, beta, s0 = inputs(1, T, 2, 2, 4)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True)
    o_tc, s_tc = torch_chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    o_tr, s_tr = torch_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    close(o, o_tc, 2e-5)
    close(s, s_tc, 2e-5)
    close(o, o_tr, 2e-5)
    close(s, s_tr, 2e-5)


@pytest.mark.parametrize("B", [1, 2])
def test_grouped_key_value_heads_equal_explicit_repeat(B):
    # InfiniteVL's num_linear_key_value_heads < num_linear_heads: k and v shared by groups of q heads
    q, k, v, g, beta, s0 = inputs(B, 70, 4, 2, 2)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True)
    k4, v4 = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k4, v4, g, beta, initial_state=s0, use_qk_l2norm=True)
    close(o, o_ref, 2e-5)
    close(s, s_ref, 2e-5)


def test_chunk_size_does_not_change_the_result():
    q, k, v, g, beta, s0 = inputs(1, 150, 2, 2, 2)
    results = [
        gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True, chunk_size=c)
        for c in (16, 64, 128)
    ]
    for o, s in results[1:]:
        close(o, results[0][0], 2e-5)
        close(s, results[0][1], 2e-5)


def test_splitting_the_sequence_carries_the_state():
    q, k, v, g, beta, _ = inputs(2, 120, 2, 2, 2)
    o_full, s_full = gated_delta_rule_chunked(q, k, v, g, beta, use_qk_l2norm=True)
    o1, s1 = gated_delta_rule_chunked(q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37], use_qk_l2norm=True)
    o2, s2 = gated_delta_rule_chunked(
        q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], beta[:, 37:], initial_state=s1, use_qk_l2norm=True
    )
    close(torch.cat([o1, o2], 1), o_full, 2e-5)
    close(s2, s_full, 2e-5)


def test_step_equals_reference_and_updates_in_place():
    q, k, v, g, beta, s0 = inputs(2, 5, 4, 2, 2)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True)
    state = s0.clone()
    outs = []
    for t in range(5):
        o, returned = gated_delta_rule_step(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            g[:, t : t + 1],
            beta[:, t : t + 1],
            state,
            use_qk_l2norm=True,
            inplace=True,
        )
        assert returned.data_ptr() == state.data_ptr()
        outs.append(o)
    close(torch.cat(outs, 1), o_ref, 2e-5)
    close(state, s_ref, 2e-5)
    # not in place: the given state is left alone
    before = s0.clone()
    gated_delta_rule_step(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], s0, use_qk_l2norm=True)
    assert torch.equal(before, s0)


@pytest.mark.parametrize("T", [1, 65])
def test_chunked_gradients_match_autograd_through_reference(T):
    q, k, v, g, beta, s0 = inputs(2, T, 2, 2, 2, dk=8, dv=8, seed=3, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, s0)]
    weights = torch.randn(2, T, 2, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8, dtype=torch.float64)

    def grads(fn):
        xs = [x.detach().clone().requires_grad_(True) for x in leaves]
        o, s = fn(*xs[:5], initial_state=xs[5], use_qk_l2norm=True)
        ((o * weights[0]).sum() + (s * weights[1]).sum()).backward()
        return [x.grad for x in xs]

    for got, ref in zip(
        grads(lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=16, **kw)), grads(gated_delta_rule_recurrent)
    ):
        close(got, ref, 1e-9, rtol=1e-9)


def test_bad_shapes_are_named():
    q, k, v, g, beta, _ = inputs(1, 8, 4, 3, 4)
    with pytest.raises(ValueError, match="head counts"):
        gated_delta_rule_chunked(q, k, v, g, beta)
    q, k, v, g, beta, _ = inputs(1, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="initial state has shape"):
        gated_delta_rule_chunked(q, k, v, g, beta, initial_state=torch.zeros(1, 2, 3, 3))
