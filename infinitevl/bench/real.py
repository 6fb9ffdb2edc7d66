"""Real contexts: a context built by processing tokens, against the filled one the decode and memory sections use.

The decode and memory sections make a context of N tokens by filling the state (or the baseline's cache) with
random values: fast at any N, equivalent for the cost of a decode step, but for InfiniteVL the constant state size
is then true by construction. This section checks the shortcut at one long context per configuration. For each
model, in a fresh subprocess (so that its peak memory is its own): N random token ids go through a real prefill
(InfiniteVL: the engine's `prefill` in chunks of DEFAULT_CHUNK tokens; the baseline: one call into a fresh
`DynamicCache`, as in the prefill section), the RSS is read, a filled context of the same length is built beside
it, and decode steps on the two are timed in turn (one step each per round, `repeats` rounds, after `warmup`
untimed rounds; each step lengthens both contexts by one token). The report compares the two timings, their
state / KV bytes, and the real context's memory with the memory section's filled point at the same length.

Longer real streams are in the tests: `tests/test_constant_memory.py` processes 200K real tokens through a tiny
model and checks that the state bytes, the process memory and the time per chunk stay flat.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from . import configs as C
from .decode import reserve_bytes
from .memory import finish_worker, predicted_need
from .timing import available_ram, fmt_tokens


def worker(task: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the subprocess."""
    import torch
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl  # noqa: F401  (imported before the first reading)

    from ..engine.generation import DEFAULT_CHUNK, decode_step, prefill
    from .timing import measure_interleaved, peak_rss, rss

    config = C.infinitevl_config(task["config"])
    n = task["context"]
    ids = torch.randint(0, config.text.vocab_size - 64, (1, n), generator=torch.Generator().manual_seed(0))
    token = torch.tensor([7])
    out: dict[str, Any] = {"rss_start_bytes": rss()}
    if task["model"] == "infinitevl":
        model = C.build_infinitevl(config)
        out["rss_model_bytes"] = rss()
        real = model.new_state()
        start = time.perf_counter()
        prefill(model, real, ids, chunk_size=DEFAULT_CHUNK)
        out["prefill_s"] = time.perf_counter() - start
        out["chunk_size"] = DEFAULT_CHUNK
        out["tokens"] = real.tokens_seen
        fill, size = (lambda: C.fill_state(model.new_state(), n)), (lambda s: s.nbytes)
        step = lambda s: decode_step(model, s, token)  # noqa: E731
    else:
        model = C.build_baseline(config)
        out["rss_model_bytes"] = rss()
        real = model.new_cache()
        start = time.perf_counter()
        model.prefill(real, input_ids=ids)
        out["prefill_s"] = time.perf_counter() - start
        out["tokens"] = real.get_seq_length()
        fill, size = (lambda: C.filled_cache(model, n)), C.cache_bytes
        step = lambda c: model.decode_step(c, token)  # noqa: E731
    del ids
    out["rss_real_bytes"] = rss()
    out["peak_rss_real_bytes"] = max(peak_rss(), out["rss_real_bytes"])  # the prefill's working memory included
    filled = fill()
    timings = measure_interleaved(
        {"real": lambda: step(real), "filled": lambda: step(filled)}, task["repeats"], warmup=task["warmup"]
    )
    out.update(
        real=timings["real"],
        filled=timings["filled"],
        real_over_filled=timings["real"]["median_s"] / timings["filled"]["median_s"],
        real_state_bytes=size(real),
        filled_state_bytes=size(filled),
        weight_bytes=C.weight_bytes(model),
    )
    return out


def start_worker(task: dict[str, Any]):
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-m", "infinitevl.bench.real", json.dumps(task)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def need_bytes(config, model: str, n: int) -> int:
    """A worker's peak: what the memory section predicts for a filled context, plus the real one beside it and, for
    the baseline, its prefill's activations (the MLP's [N, intermediate] tensors)."""
    need = predicted_need(config, model, n)
    if model == "infinitevl":
        return need + C.state_bytes(config)
    return need + n * (C.kv_bytes_per_token(config) + 4 * config.text.intermediate_size * 4)


def run(plan, progress) -> dict[str, Any]:
    out: dict[str, Any] = {"configs": {}}
    for name in plan.real_configs:
        p = plan.real[name]
        tasks = [
            {"config": name, "model": m, "context": p["context"], "repeats": p["repeats"], "warmup": p["warmup"]}
            for m in ("infinitevl", "baseline")
        ]
        progress(f"real {name}: prefill {fmt_tokens(p['context'])} real tokens into each model, then decode")
        config = C.infinitevl_config(name)
        results: dict[str, dict] = {}
        running = []  # with `parallel` (the quick plan) both workers run at once; otherwise one at a time
        for task in tasks:
            need, usable = need_bytes(config, task["model"], task["context"]), available_ram() - reserve_bytes()
            if need > usable:
                results[task["model"]] = {
                    **task,
                    "status": "out_of_memory",
                    "needed_bytes": need,
                    "usable_bytes": usable,
                }
                progress(f"real {name} {task['model']}: out of memory (needs {need / 2**30:.1f} GiB), not run")
                continue
            running.append((task, start_worker(task), time.perf_counter()))
            if not p.get("parallel"):
                _collect(running, results, p, name, progress)
        _collect(running, results, p, name, progress)
        out["configs"][name] = {"config": C.describe_config(name, config), **results}
    return out


def _collect(running: list, results: dict, p: dict, name: str, progress) -> None:
    while running:
        task, proc, start = running.pop(0)
        result = finish_worker(proc, task, p["worker_timeout"], start)
        results[task["model"]] = result
        if result["status"] == "measured":
            progress(
                f"real {name} {task['model']} {fmt_tokens(task['context'])}: prefill {result['prefill_s']:.1f} s; "
                f"decode {result['real']['median_s'] * 1e3:.1f} ms real vs {result['filled']['median_s'] * 1e3:.1f} "
                f"ms filled"
            )
        else:
            progress(f"real {name} {task['model']}: {result.get('error', result['status'])}")


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
