"""Prefill: the time to take in a prompt of N tokens (random ids), and tokens/s, for both models.

InfiniteVL runs the engine's `prefill` (chunks of `DEFAULT_CHUNK` tokens into a fresh state); the baseline runs its
text model directly on the whole prompt with a fresh `DynamicCache` (SDPA, causal), then its lm_head on the last
position, as `prefill` does. Each model is warmed up once on the smallest prompt first (the first call of a process
pays one-time kernel setup). Prompt lengths grow; the baseline stops when the next length is predicted to take
longer than the per-call limit (from a fit t = a N + b N^2 through its measured points) or would not fit in RAM,
and the report says which. The process's resident memory is sampled during every call (peak minus the RSS before
the call = the call's working memory).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import configs as C
from .decode import reserve_bytes
from .timing import RSSSampler, available_ram, fmt_tokens, free_memory, summary


def predict_seconds(points: list[tuple[int, float]], n: int) -> float:
    """Least-squares fit of t = a N + b N^2 (a, b >= 0) through the measured points, evaluated at n."""
    if not points:
        return 0.0
    if len(points) == 1:
        n0, t0 = points[0]
        return t0 * (n / n0) ** 2  # the pessimistic (quadratic) extrapolation
    xs = torch.tensor([[float(m), float(m) ** 2] for m, _ in points], dtype=torch.float64)
    ys = torch.tensor([t for _, t in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(xs, ys.unsqueeze(-1)).solution.squeeze(-1).clamp(min=0)
    return float(coef[0] * n + coef[1] * n * n)


def _timed_runs(fn, repeats: int) -> tuple[dict, int]:
    times, peaks = [], []
    for _ in range(repeats):
        with RSSSampler() as mem:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        peaks.append(mem.peak - mem.start)
        free_memory()
    return summary(times), max(peaks)


def run_config(name: str, p: dict, deadline: float, progress) -> dict[str, Any]:
    from ..engine.generation import DEFAULT_CHUNK, prefill

    config = C.infinitevl_config(name)
    ours_model = C.build_infinitevl(config)
    base_model = C.build_baseline(config)
    vocab = config.text.vocab_size
    gen = torch.Generator().manual_seed(0)
    lengths = sorted(p["lengths"])
    ids_of = {n: torch.randint(0, vocab - 64, (1, n), generator=gen) for n in lengths}

    def ours(n):
        return lambda: prefill(ours_model, ours_model.new_state(), ids_of[n], chunk_size=DEFAULT_CHUNK)

    def theirs(n):
        return lambda: base_model.prefill(base_model.new_cache(), input_ids=ids_of[n])

    ours(lengths[0])()
    theirs(lengths[0])()
    kv_per_token = C.kv_bytes_per_token(config)
    done: list[tuple[int, float]] = []
    base_points, our_points = [], []
    baseline_stopped = None
    for n in lengths:
        if time.perf_counter() > deadline:
            our_points.append({"length": n, "status": "over_time_budget"})
            base_points.append({"length": n, "status": "over_time_budget"})
            break
        repeats = p["repeats"] if n <= p["repeat_below"] else 1
        timing, peak = _timed_runs(ours(n), repeats)
        our_points.append(
            {
                "length": n,
                "status": "measured",
                **timing,
                "tokens_per_s": n / timing["median_s"],
                "peak_rss_increase_bytes": peak,
            }
        )
        progress(
            f"prefill {name} InfiniteVL {fmt_tokens(n)}: {timing['median_s']:.2f} s ({n / timing['median_s']:.0f} tok/s)"
        )
        if baseline_stopped is not None:
            base_points.append({"length": n, "status": baseline_stopped["status"], **baseline_stopped})
            continue
        predicted = predict_seconds(done, n)
        # the cache, the per-layer activations ([N, intermediate] x 3 in the MLP) and SDPA's working set
        need = n * (kv_per_token + 4 * config.text.intermediate_size * 4) + 512 * 2**20
        usable = available_ram() - reserve_bytes()
        if need > usable:
            baseline_stopped = {"status": "out_of_memory", "needed_bytes": need, "usable_bytes": usable}
        elif predicted > p["baseline_call_seconds"]:
            baseline_stopped = {
                "status": "over_time_limit",
                "predicted_s": predicted,
                "limit_s": p["baseline_call_seconds"],
            }
        if baseline_stopped is not None:
            base_points.append({"length": n, **baseline_stopped})
            progress(f"prefill {name} baseline {fmt_tokens(n)}: {baseline_stopped['status']} (not run)")
            continue
        timing, peak = _timed_runs(theirs(n), repeats)
        done.append((n, timing["median_s"]))
        base_points.append(
            {
                "length": n,
                "status": "measured",
                **timing,
                "tokens_per_s": n / timing["median_s"],
                "peak_rss_increase_bytes": peak,
                "kv_bytes": n * kv_per_token,
            }
        )
        progress(
            f"prefill {name} baseline {fmt_tokens(n)}: {timing['median_s']:.2f} s ({n / timing['median_s']:.0f} tok/s)"
        )
    return {
        "config": C.describe_config(name, config),
        "chunk_size": DEFAULT_CHUNK,
        "infinitevl": our_points,
        "baseline": base_points,
        "baseline_stop": baseline_stopped["status"] if baseline_stopped else "grid_done",
    }


def run(plan, progress) -> dict[str, Any]:
    out: dict[str, Any] = {"configs": {}}
    for name in plan.prefill_configs:
        p = plan.prefill[name]
        progress(f"prefill {name}: lengths {[fmt_tokens(n) for n in p['lengths']]}")
        out["configs"][name] = run_config(name, p, time.perf_counter() + p["seconds"], progress)
        free_memory()
    return out
