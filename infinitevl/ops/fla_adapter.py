"""CUDA only: a thin adapter onto flash-linear-attention's Triton kernels (optional extra `infinitevl[cuda]`).

Nothing here runs on a CPU; `backend.py` only calls it for CUDA tensors with the package installed, and the tests
that exercise it are skipped elsewhere. fla shares q/k heads across groups of value heads but not the reverse, so
InfiniteVL's grouped key/value heads (fewer k and v heads than q heads) are expanded before the call.
"""

from __future__ import annotations

import torch


def gated_delta_rule(q, k, v, g, beta, initial_state, scale, use_qk_l2norm):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    H = max(q.shape[2], k.shape[2], v.shape[2])
    if q.shape[2] != H:  # fla wants q and k with the same heads, v with a multiple of them
        q = q.repeat_interleave(H // q.shape[2], dim=2)
    if k.shape[2] != q.shape[2]:
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    if v.shape[2] != H:
        v = v.repeat_interleave(H // v.shape[2], dim=2)
    kernel = fused_recurrent_gated_delta_rule if q.shape[1] <= 64 else chunk_gated_delta_rule
    o, state = kernel(
        q=q,
        k=k,
        v=v,
        g=g.float(),
        beta=beta,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
    )
    return o, state.to(torch.float32)
