"""The paper's v2 variants (docs/variants.md): Offline's block-sparse prefill against dense full attention, and
Online's decode latency and state size against context.

Offline: one softmax layer at the 4B model's attention widths (16 query heads, 2 key/value heads, head dim 128,
hidden 2048), random weights and a random hidden-state input of N tokens, fp32, with text positions. The same
weights run as `block_sparse_attention` (the paper's sizes: chunks of 32, top-64, the initial chunk, the last 2048
tokens, dense below 8192) and as Base's `full_attention` layer (the project's blockwise causal path); beside them,
torch's fused causal SDPA kernel on the same q/k/v alone (no projections): the fastest dense attention this
machine has, a floor for Base. The Offline cache's bytes for N tokens (keys, values, chunk means) are reported:
they grow linearly with N. With random inputs the chunk choices are spread out, which costs this implementation
nothing extra: its work is set by N, the top-k and the chunk size.

Base's blockwise layer is the slowest of the three and quadratic: above `dense_up_to` tokens (128K in the full plan)
it is not timed, and Offline is compared with the fused SDPA floor alone. Offline rows already measured in the
previous record (`variants.json` in the output folder) with the same widths and pattern are kept as they were,
marked with that run's date, so a later run can add a length without re-timing the others; the report says which
run each row comes from.

Online: the tiny model with its softmax layers as `sink_sliding_attention` (256 sinks + a 2048-token window), a
state filled by prefill to each context, then the median of one-token decode steps (random ids). The state's bytes
are the same at every context; the step time should be too.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from .timing import fmt_tokens, summary


def _layer_pair(widths: dict, pattern: dict):
    from ..config import FULL, SPARSE, tiny_config
    from ..model.swa import SlidingWindowAttention
    from ..model.variant_attention import BlockSparseAttention

    cfg = tiny_config(
        hidden_size=widths["hidden"],
        num_attention_heads=widths["heads"],
        num_key_value_heads=widths["kv_heads"],
        head_dim=widths["head_dim"],
        mrope_section=[16, 24, 24] if widths["head_dim"] == 128 else [2, 3, 3],
        num_hidden_layers=2,
        layer_types=[FULL, SPARSE],
        sliding_window=None,
        use_sliding_window=False,
        **pattern,
    ).text
    torch.manual_seed(0)
    dense, sparse = SlidingWindowAttention(cfg, 0), BlockSparseAttention(cfg, 1)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    sparse.load_state_dict(dense.state_dict())
    return cfg, dense.eval(), sparse.eval()


def _offline_point(cfg, dense, sparse, n: int, time_base: bool = True) -> dict[str, Any]:
    from ..model.layout import TokenLayout
    from ..model.rope import rope_cos_sin

    g = torch.Generator().manual_seed(n)
    x = torch.randn(1, n, cfg.hidden_size, generator=g)
    pos = torch.arange(n).view(1, 1, n).expand(3, 1, n)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, x.dtype)
    layout = TokenLayout.build(None, 1, n, x.device)
    row: dict[str, Any] = {"tokens": n, "status": "measured"}
    start = time.perf_counter()
    sparse(x, cos, sin, layout)
    row["offline_s"] = time.perf_counter() - start
    if time_base:
        start = time.perf_counter()
        dense(x, cos, sin, layout)
        row["base_s"] = time.perf_counter() - start
    q, k, v = (t.transpose(1, 2) for t in sparse._qkv(x, cos, sin))
    start = time.perf_counter()
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    row["sdpa_s"] = time.perf_counter() - start
    per_key = k[0, :, 0].numel() * k.element_size()  # one token's keys over the key/value heads
    row["offline_cache_bytes"] = n * (2 * per_key + 8) + (n // cfg.sparse_chunk_size) * per_key
    return row


def offline_prefill(settings: dict, progress, previous: dict | None = None) -> list[dict[str, Any]]:
    """Rows per token count; `previous` is the last `variants` record, whose measured rows are kept when it ran
    the same widths and pattern."""
    kept: dict[int, dict] = {}
    if previous is not None:
        before = previous["settings"]["offline"]
        if before["widths"] == settings["widths"] and before.get("pattern", {}) == settings.get("pattern", {}):
            when = f"{previous['machine']['date']}, {previous['machine']['cpu']}"
            for row in previous["result"]["offline_prefill"]:
                if row["status"] == "measured":
                    kept[row["tokens"]] = {**row, "measured_at": row.get("measured_at", when)}
    cfg, dense, sparse = _layer_pair(settings["widths"], settings.get("pattern", {}))
    rows, deadline = [], time.perf_counter() + settings["budget_s"]
    for n in settings["tokens"]:
        if n in kept:
            rows.append(kept[n])
            progress(f"variants: {fmt_tokens(n)} tokens: kept from the run of {kept[n]['measured_at']}")
            continue
        if time.perf_counter() > deadline:
            rows.append({"tokens": n, "status": "skipped_time_budget"})
            continue
        time_base = n <= settings.get("dense_up_to", n)
        rows.append(_offline_point(cfg, dense, sparse, n, time_base))
        r = rows[-1]
        base = f"Base {r['base_s']:.1f} s" if time_base else "Base not timed"
        progress(f"variants: {fmt_tokens(n)} tokens: Offline {r['offline_s']:.1f} s, {base}, SDPA {r['sdpa_s']:.1f} s")
    return rows


def online_decode(settings: dict, progress) -> list[dict[str, Any]]:
    from ..config import LINEAR, SINK, tiny_config
    from ..engine.prefill import prefill
    from ..model import InfiniteVLForConditionalGeneration

    n_layers = 8
    config = tiny_config(
        num_hidden_layers=n_layers,
        layer_types=[SINK if i % 4 == 0 else LINEAR for i in range(n_layers)],
        num_sink_tokens=settings["num_sinks"],
        sliding_window=settings["window"],
    )
    model = InfiniteVLForConditionalGeneration.from_config(config, seed=0)
    state = model.new_state()
    g = torch.Generator().manual_seed(0)
    rows, seen = [], 0
    for context in settings["contexts"]:
        while seen < context:
            n = min(settings["prefill_chunk"], context - seen)
            prefill(model, state, torch.randint(0, 300, (1, n), generator=g), chunk_size=settings["prefill_chunk"])
            seen += n
        probe = state.clone()
        times = []
        for _ in range(settings["steps"]):
            ids = torch.randint(0, 300, (1, 1), generator=g)
            start = time.perf_counter()
            model(input_ids=ids, state=probe)
            times.append(time.perf_counter() - start)
        rows.append({"context": context, "state_bytes": state.nbytes, **summary(times)})
        progress(f"variants: online decode at {fmt_tokens(context)}: {rows[-1]['median_s'] * 1e3:.2f} ms")
    return rows


def run(plan, progress, previous: dict | None = None) -> dict[str, Any]:
    settings = plan.variants
    return {
        "offline_prefill": offline_prefill(settings["offline"], progress, previous),
        "online_decode": online_decode(settings["online"], progress),
    }
