"""Ops: this package's kernels against references, timed in the same process, interleaved.

    gdn_chunked   `gated_delta_rule_chunked` vs transformers' `torch_chunk_gated_delta_rule` (B=1, H=16, Dk=128,
                  Dv=256, T=4096, fp32, q/k L2-normalised in both, initial state given, final state returned)
    gdn_step      `gated_delta_rule_step` (in place) vs transformers' `torch_recurrent_gated_delta_rule`, one token
    swa_prefill   blockwise `sliding_window_attention` vs one dense SDPA call (causal when T <= W, an explicit band
                  mask otherwise), 16 query / 2 key-value heads of 128
    swa_decode    `attention_decode` over a full ring of W - 1 keys vs SDPA over the concatenated cache

Each pair gets a warm-up call each, then repetitions alternate between the two (transformers' timings vary run to
run with the first-touch page faults of its large temporaries; the median of interleaved repetitions is robust to
that and to a shared machine). The outputs are compared too, so a fast wrong kernel cannot pass.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from ..ops.attention import attention_decode, sliding_window_attention
from ..ops.gated_delta import gated_delta_rule_chunked, gated_delta_rule_step
from .timing import measure_interleaved


def _gdn_inputs(B, T, H, Dk, Dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=gen)
    k = torch.randn(B, T, H, Dk, generator=gen)
    v = torch.randn(B, T, H, Dv, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3.0)  # log decays in (-inf, 0), mostly slow
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    state = torch.randn(B, H, Dk, Dv, generator=gen) * 0.05
    return q, k, v, g, beta, state


def _compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    diff = (ours.float() - theirs.float()).abs()
    return {"max_abs_diff": float(diff.max()), "max_abs_ref": float(theirs.abs().max())}


def _pair(name: str, shape: dict, ours, reference, ref_name: str, repeats: int, check) -> dict[str, Any]:
    timings = measure_interleaved({"ours": ours, "reference": reference}, repeats, warmup=1)
    o, r = timings["ours"]["median_s"], timings["reference"]["median_s"]
    return {
        "op": name,
        "shape": shape,
        "reference": ref_name,
        "ours": timings["ours"],
        "theirs": timings["reference"],
        "speedup": r / o,
        "check": check,
    }


@torch.no_grad()
def bench_gdn_chunked(B, T, H, Dk, Dv, repeats) -> dict[str, Any]:
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    q, k, v, g, beta, s0 = _gdn_inputs(B, T, H, Dk, Dv)
    ours = lambda: gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True)  # noqa: E731
    theirs = lambda: torch_chunk_gated_delta_rule(  # noqa: E731
        q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    (o1, s1), (o2, s2) = ours(), theirs()
    check = {"output": _compare(o1, o2), "state": _compare(s1, s2)}
    shape = {"B": B, "T": T, "H": H, "Dk": Dk, "Dv": Dv}
    return _pair("gdn_chunked", shape, ours, theirs, "transformers torch_chunk_gated_delta_rule", repeats, check)


@torch.no_grad()
def bench_gdn_step(B, H, Dk, Dv, repeats) -> dict[str, Any]:
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    q, k, v, g, beta, s0 = _gdn_inputs(B, 1, H, Dk, Dv, seed=1)
    mine, theirs_state = s0.clone(), s0.clone()
    # both update a state every call (ours in place, theirs returns a new one): the work of a real decode step
    ours = lambda: gated_delta_rule_step(q, k, v, g, beta, mine, use_qk_l2norm=True, inplace=True)  # noqa: E731
    theirs = lambda: torch_recurrent_gated_delta_rule(  # noqa: E731
        q, k, v, g, beta, initial_state=theirs_state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    o1, _ = gated_delta_rule_step(q, k, v, g, beta, s0.clone(), use_qk_l2norm=True)
    o2, _ = theirs()
    check = {"output": _compare(o1, o2)}
    shape = {"B": B, "T": 1, "H": H, "Dk": Dk, "Dv": Dv}
    return _pair("gdn_step", shape, ours, theirs, "transformers torch_recurrent_gated_delta_rule", repeats, check)


def _band_mask(T: int, window: int) -> torch.Tensor:
    i = torch.arange(T).unsqueeze(-1)
    j = torch.arange(T).unsqueeze(0)
    return (j <= i) & (j > i - window)


@torch.no_grad()
def bench_swa_prefill(T, window, H, KV, D, repeats) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, T, H, D, generator=gen)
    k = torch.randn(1, T, KV, D, generator=gen)
    v = torch.randn(1, T, KV, D, generator=gen)
    pos = torch.arange(T).unsqueeze(0)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = None if window >= T else _band_mask(T, window)
    ours = lambda: sliding_window_attention(q, k, v, pos, pos, window)  # noqa: E731
    reference = lambda: F.scaled_dot_product_attention(  # noqa: E731
        qh, kh, vh, attn_mask=mask, is_causal=mask is None, enable_gqa=True
    ).transpose(1, 2)
    check = {"output": _compare(ours(), reference())}
    ref = "dense SDPA, causal" if mask is None else "dense SDPA with a [T, T] band mask"
    shape = {"T": T, "window": window, "H": H, "KV": KV, "D": D}
    return _pair("swa_prefill", shape, ours, reference, ref, repeats, check)


@torch.no_grad()
def bench_swa_decode(window, H, KV, D, repeats) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    cap = window - 1
    q = torch.randn(1, 1, H, D, generator=gen)
    k_cache = torch.randn(1, KV, cap, D, generator=gen)
    v_cache = torch.randn(1, KV, cap, D, generator=gen)
    k_new = torch.randn(1, 1, KV, D, generator=gen)
    v_new = torch.randn(1, 1, KV, D, generator=gen)
    visible = torch.ones(1, cap, dtype=torch.bool)
    ours = lambda: attention_decode(q, k_cache, v_cache, visible, k_new, v_new)  # noqa: E731

    def reference():
        keys = torch.cat([k_cache, k_new.transpose(1, 2)], dim=2)
        values = torch.cat([v_cache, v_new.transpose(1, 2)], dim=2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=True).transpose(1, 2)

    check = {"output": _compare(ours(), reference())}
    shape = {"keys": window, "H": H, "KV": KV, "D": D}
    return _pair("swa_decode", shape, ours, reference, "SDPA over the concatenated cache", repeats, check)


@contextmanager
def _without_fallback_notice():
    """transformers announces once that its gated-delta-rule functions fall back to "much slower" PyTorch code
    without flash-linear-attention. Here that PyTorch code is the reference being measured (fla never runs on a
    CPU), so the notice is only noise in the benchmark's output."""
    log = logging.getLogger("transformers.integrations.hub_kernels")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def run(plan, progress) -> dict[str, Any]:
    with _without_fallback_notice():
        return _run(plan, progress)


def _run(plan, progress) -> dict[str, Any]:
    p = plan.ops
    results = []
    progress(f"ops: gdn_chunked {p['gdn']} x{p['chunk_repeats']}")
    results.append(bench_gdn_chunked(**p["gdn"], repeats=p["chunk_repeats"]))
    progress(f"ops: gdn_chunked speedup {results[-1]['speedup']:.2f}x; gdn_step")
    step_shape = {k: p["gdn"][k] for k in ("B", "H", "Dk", "Dv")}
    results.append(bench_gdn_step(**step_shape, repeats=p["step_repeats"]))
    for T, window in p["swa_prefill"]:
        progress(f"ops: swa_prefill T={T} W={window}")
        results.append(bench_swa_prefill(T, window, **p["swa_heads"], repeats=p["swa_repeats"]))
    progress(f"ops: swa_decode W={p['swa_window']}")
    results.append(bench_swa_decode(p["swa_window"], **p["swa_heads"], repeats=p["step_repeats"]))
    return {"results": results}
