"""Memory: peak process memory and state / KV-cache bytes against context length.

Each point runs in a fresh subprocess (`python -m infinitevl.bench.memory TASK`), because a process's peak RSS
only ever grows: the worker builds one model, fills its state or cache to the context, runs a few decode steps and
reports its RSS after each phase and its peak (VmHWM). Filled, not processed: the state or cache gets random values
for N tokens (see `configs.py`), so InfiniteVL's flat memory here is true by construction and no prefill's working
memory is counted. The `real` section builds one context per model by a real prefill (the table "Real tokens
against filled contexts"), and `tests/test_constant_memory.py` processes 200K real tokens through a tiny model with
the state bytes, process memory and time per chunk checked flat. Baseline points that would not fit in the RAM available
(with a reserve kept for the rest of the machine) are predicted and skipped, never attempted. The state / KV bytes
are also computed from the configs for every context of the grid, so the plot shows the whole curve.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from . import configs as C
from .decode import reserve_bytes
from .timing import available_ram, fmt_tokens


def worker(task: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the subprocess."""
    import torch

    # everything a model needs is imported before the first reading: RSS growth is then the model's and the state's
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl  # noqa: F401

    from ..engine import generation  # noqa: F401
    from ..model import vlm  # noqa: F401
    from .timing import peak_rss, rss

    torch.manual_seed(0)
    config = C.infinitevl_config(task["config"])
    n = task["context"]
    token = torch.tensor([7])
    out: dict[str, Any] = {"rss_start_bytes": rss()}
    if task["model"] == "infinitevl":
        from ..engine.generation import decode_step

        model = C.build_infinitevl(config)
        out["rss_model_bytes"] = rss()
        state = C.fill_state(model.new_state(), n)
        out["rss_filled_bytes"] = rss()
        for _ in range(task["steps"]):
            decode_step(model, state, token)
        out["state_bytes"] = state.nbytes
    else:
        model = C.build_baseline(config)
        out["rss_model_bytes"] = rss()
        cache = C.filled_cache(model, n)
        out["rss_filled_bytes"] = rss()
        for _ in range(task["steps"]):
            model.decode_step(cache, token)
        out["state_bytes"] = C.cache_bytes(cache)
    out["weight_bytes"] = C.weight_bytes(model)
    out["rss_end_bytes"] = rss()
    out["peak_rss_bytes"] = max(peak_rss(), out["rss_end_bytes"])  # getrusage's peak can lag the live value
    return out


def start_worker(task: dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "infinitevl.bench.memory", json.dumps(task)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_worker(proc: subprocess.Popen, task: dict[str, Any], timeout: float, start: float) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {**task, "status": "failed", "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        return {**task, "status": "failed", "error": tail[0]}
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**task, "status": "measured", "seconds": time.perf_counter() - start, **result}


def predicted_need(config, model: str, n: int) -> int:
    """Bytes a worker will hold at its peak (weights, cache and the concatenated copy of one layer, 0.5 GiB slack)."""
    slack = 512 * 2**20
    if model == "infinitevl":
        return C.decoder_params(config) * 4 + C.state_bytes(config) + slack
    layers = config.text.num_hidden_layers
    kv = n * C.kv_bytes_per_token(config)
    return C.baseline_params(config) * 4 + kv + kv // layers + slack


def curves(config, contexts: list[int]) -> dict[str, list]:
    """State bytes (constant) and KV-cache bytes (linear) from the configs, for every context."""
    state = C.state_bytes(config)
    per_token = C.kv_bytes_per_token(config)
    return {
        "contexts": contexts,
        "infinitevl_state_bytes": [state] * len(contexts),
        "baseline_kv_bytes": [n * per_token for n in contexts],
    }


def _check(config, model: str, n: int, deadline: float) -> dict[str, Any] | None:
    """Why a point is not run (predicted not to fit, or out of time), or None."""
    need, usable = predicted_need(config, model, n), available_ram() - reserve_bytes()
    if need > usable:
        return {"context": n, "status": "out_of_memory", "needed_bytes": need, "usable_bytes": usable}
    if time.perf_counter() > deadline:
        return {"context": n, "status": "over_time_budget"}
    return None


def run(plan, progress, baseline_longest: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"configs": {}}
    for name in plan.memory_configs:
        p = plan.memory[name]
        config = C.infinitevl_config(name)
        deadline = time.perf_counter() + p["seconds"]
        base_contexts = list(p["baseline_contexts"])
        if baseline_longest and baseline_longest.get(name) and p.get("baseline_longest"):
            base_contexts.append(baseline_longest[name])
        todo = [("infinitevl", n) for n in p["contexts"]] + [("baseline", n) for n in sorted(set(base_contexts))]
        points: dict[str, list] = {"infinitevl": [], "baseline": []}
        running = []  # with `parallel` (the quick plan) every worker starts at once: peaks are per process anyway
        stopped: set[str] = set()
        for model, n in todo:
            if model in stopped:
                continue
            reason = _check(config, model, n, deadline)
            if reason is not None:
                points[model].append(reason)
                stopped.add(model)
                progress(f"memory {name} {model} {fmt_tokens(n)}: {reason['status'].replace('_', ' ')}")
                continue
            task = {"config": name, "model": model, "context": n, "steps": p["steps"]}
            running.append((task, start_worker(task), time.perf_counter()))
            if not p.get("parallel"):
                _collect(running, points, p, name, progress)
        _collect(running, points, p, name, progress)
        for model in points:
            points[model].sort(key=lambda x: x["context"])
        out["configs"][name] = {
            "config": C.describe_config(name, config),
            "points": points,
            "curves": curves(config, p["curve_contexts"]),
        }
    return out


def _collect(running: list, points: dict, p: dict, name: str, progress) -> None:
    while running:
        task, proc, start = running.pop(0)
        result = finish_worker(proc, task, p["worker_timeout"], start)
        points[task["model"]].append(result)
        peak = result.get("peak_rss_bytes")
        progress(
            f"memory {name} {task['model']} {fmt_tokens(task['context'])}: "
            + (f"peak RSS {peak / 2**20:.0f} MiB" if peak else result.get("error", result["status"]))
        )


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
