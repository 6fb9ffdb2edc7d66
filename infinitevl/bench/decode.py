"""Decode: the latency of one token (embedding, every layer, the final norm and the lm_head) against context length.

For each configuration the baseline is built first and measured at growing contexts until the next one would not
fit in RAM (predicted from its weights plus KV bytes plus one layer's transient copy -- `DynamicCache` concatenates
-- against the RAM available, never by exhausting it) or the section's time runs out; for the 4B the longest
context that fits (from the same prediction) is measured too. Then the baseline is freed and InfiniteVL built and measured at the same contexts, the
baseline's longest one included, and beyond (its cost does not depend on the context). Only one 4B model is in
memory at a time.

Contexts are not processed but filled with random values (see `configs.py`): the rings and memories of
InfiniteVL's state, N random keys and values in the baseline's cache. A decode step does the same work on them as
after a real prefill, which the `real` section checks at 64K tokens (the table "Real tokens against filled
contexts"); but InfiniteVL's constant state size here is true by construction. Each model is warmed up once
(3 x `warmup` untimed steps). Baseline points get one untimed step, then repeated `decode_step` calls (the context
grows by one token per call) until `repeats` or `point_seconds`. InfiniteVL's contexts each get a filled state and
are timed in turn, one step each per round, `repeats` rounds; all repetitions are kept.

The floor of a step is the bytes it must read -- every decoder weight once (the tied embedding / lm_head matrix
once), plus the state (InfiniteVL) or the KV cache (baseline) -- divided by the machine's measured bandwidth.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import configs as C
from .timing import GiB, available_ram, fmt_tokens, free_memory, measure, measure_interleaved


def reserve_bytes() -> int:
    """RAM left untouched for everything else on the machine."""
    import psutil

    return max(3 * GiB, int(0.1 * psutil.virtual_memory().total))


def baseline_fits(config, n_tokens: int, extra: int = 0) -> tuple[bool, int, int]:
    """Whether a cache of `n_tokens` (+ the transient concatenated copy of one layer) fits in the RAM available now
    with the reserve kept; returns (fits, bytes needed, bytes usable)."""
    per_token = C.kv_bytes_per_token(config)
    layers = config.text.num_hidden_layers
    need = n_tokens * per_token * (layers + 1) // layers + extra + 256 * 2**20
    usable = available_ram() - reserve_bytes()
    return need <= usable, need, usable


def longest_fitting(config, granularity: int = 1024, extra: int = 0) -> int:
    per_token = C.kv_bytes_per_token(config)
    layers = config.text.num_hidden_layers
    usable = available_ram() - reserve_bytes() - extra - 256 * 2**20
    n = int(usable / (per_token * (layers + 1) / layers))
    return max(0, n // granularity * granularity)


def _warm_up(step, p: dict) -> None:
    """A model's first steps in a process pay one-time costs (kernel selection, first-touch pages): not timed."""
    for _ in range(3 * p["warmup"]):
        step()


def _warm_baseline(model, n_tokens: int, token, p: dict) -> None:
    cache = C.filled_cache(model, n_tokens)
    _warm_up(lambda: model.decode_step(cache, token), p)


def _point(context: int, timing: dict, floor_bytes: int, bandwidth: float, **extra) -> dict[str, Any]:
    floor_s = floor_bytes / bandwidth
    return {
        "context": context,
        "status": "measured",
        **timing,
        "floor_bytes": floor_bytes,
        "floor_s": floor_s,
        "achieved_over_floor": timing["median_s"] / floor_s,
        **extra,
    }


def measure_baseline(name, config, contexts, p, bandwidth, deadline, progress) -> tuple[list[dict], int | None]:
    model = C.build_baseline(config)
    weights = C.weight_bytes(model)
    token = torch.tensor([7])
    points: list[dict] = []
    grid = sorted(set(contexts))
    longest = longest_fitting(config)
    if p.get("probe_longest") and longest > 0:
        fitting = [n for n in grid if n <= longest]
        if not fitting or longest > fitting[-1]:
            grid = sorted(set(fitting + [longest]))
    _warm_baseline(model, grid[0], token, p)
    for n in grid:
        fits, need, usable = baseline_fits(config, n)
        if not fits:
            points.append({"context": n, "status": "out_of_memory", "needed_bytes": need, "usable_bytes": usable})
            progress(f"decode {name} baseline {fmt_tokens(n)}: out of memory ({need / GiB:.1f} GiB)")
            break
        if time.perf_counter() > deadline:
            points.append({"context": n, "status": "over_time_budget"})
            progress(f"decode {name} baseline {fmt_tokens(n)}: over the section's time budget")
            break
        cache = C.filled_cache(model, n)
        kv = C.cache_bytes(cache)
        timing = measure(
            lambda cache=cache: model.decode_step(cache, token),
            p["repeats"],
            warmup=1,  # the model is warm (see _warm_up): one step settles the new context
            deadline=time.perf_counter() + p["point_seconds"],
            min_repeats=2,
        )
        points.append(_point(n, timing, weights + kv, bandwidth, kv_bytes=kv, weight_bytes=weights))
        progress(f"decode {name} baseline {fmt_tokens(n)}: {timing['median_s'] * 1e3:.1f} ms (KV {kv / GiB:.2f} GiB)")
        del cache
        free_memory()
    fitted = [x["context"] for x in points if x["status"] == "measured"]
    return points, (max(fitted) if fitted else None)


def measure_infinitevl(name, config, contexts, p, bandwidth, progress) -> list[dict]:
    """Every context gets its own filled state, and the contexts are timed in turn (round robin), so that a slow
    phase of the machine hits all of them alike: flatness is judged on steps taken side by side."""
    model = C.build_infinitevl(config, vision=False)
    weights = C.weight_bytes(model)
    from ..engine.generation import decode_step

    token = torch.tensor([7])
    contexts = sorted(set(contexts))
    states = {n: C.fill_state(model.new_state(), n) for n in contexts}
    _warm_up(lambda: decode_step(model, states[contexts[0]], token), p)
    timings = measure_interleaved(
        {n: (lambda st=st: decode_step(model, st, token)) for n, st in states.items()}, p["repeats"], warmup=1
    )
    points = []
    for n in contexts:
        timing, state = timings[n], states[n]
        points.append(
            _point(n, timing, weights + state.nbytes, bandwidth, state_bytes=state.nbytes, weight_bytes=weights)
        )
        progress(
            f"decode {name} InfiniteVL {fmt_tokens(n)}: {timing['median_s'] * 1e3:.1f} ms (state {state.nbytes} B)"
        )
    return points


def run(plan, progress, bandwidth: float) -> dict[str, Any]:
    out: dict[str, Any] = {"bandwidth": bandwidth, "configs": {}}
    for name in plan.decode_configs:
        p = plan.decode[name]
        config = C.infinitevl_config(name)
        deadline = time.perf_counter() + p["seconds"]
        progress(f"decode {name}: baseline at {[fmt_tokens(n) for n in p['baseline_contexts']]}")
        base, longest = measure_baseline(name, config, p["baseline_contexts"], p, bandwidth, deadline, progress)
        free_memory(settle_s=5.0)  # the baseline is gone before InfiniteVL is built: one 4B model in memory at a time
        contexts = list(p["contexts"]) + ([longest] if longest else [])
        progress(f"decode {name}: InfiniteVL at {[fmt_tokens(n) for n in sorted(set(contexts))]}")
        ours = measure_infinitevl(name, config, contexts, p, bandwidth, progress)
        free_memory()
        out["configs"][name] = {
            "config": C.describe_config(name, config),
            "baseline": base,
            "infinitevl": ours,
            "baseline_longest_context": longest,
            "baseline_stop": next((x["status"] for x in base if x["status"] != "measured"), "grid_done"),
        }
    return out
