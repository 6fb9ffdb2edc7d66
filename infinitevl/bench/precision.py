"""Precision: fp32, bf16, int8 and int4 weights side by side at real size: load time, memory, decode, prefill, vision.

A bf16 checkpoint of the configuration with random weights is written once (a cache folder, reused while the
configuration is the same), and every mode runs in its own fresh process (`python -m infinitevl.bench.precision
TASK`) that loads it as a user would: `from_pretrained(dtype=..., quantize=...)`, int8 and int4 quantizing each
tensor as it is read, so no mode ever holds another's weights. Each worker reports:

  - load seconds, and the peak resident memory (VmHWM) after loading and at the end (weights, vision tower, state,
    prefill activations: everything the process held);
  - decode: ms per token at each context (a filled state, see configs.py), the contexts timed in turn, with the floor
    = bytes one step must read (the decoder's weights at their stored size, the tied embedding / LM head once, and
    the state) / the machine's measured bandwidth;
  - the step's matrix products alone: every linear layer of the decoder and the LM head called in order on one row,
    timed alternately with the whole step at the first context; the rest of the step (norms, convs, the delta rule,
    attention over the window, sampling-free Python) is the overhead outside the matmuls. Where the fused decode
    kernels apply (ops/fused.py: bf16, int8, int4), the same step on the plain PyTorch ops is timed alongside;
  - prefill tokens/s for one prompt of N tokens (chunks of C), after a short warm-up prefill;
  - one 448x448 frame (256 tokens) through the vision tower.

Modes: fp32 (the reference: MKL, the batched-halves decode GEMV of ops/linear.py), bf16 (F.linear: oneDNN bf16),
int8 and int4 (weight-only, bf16 activations and everything else in bf16: torch's packed CPU kernels for up to 255
rows, a dequantized bf16 GEMM beyond). Ratios are against fp32 in the same run. With `make peer` installed, llama.cpp
runs after them (bench/llamacpp.py): a Transformer of Qwen2.5-VL-3B's text widths and a Qwen3.5-style hybrid at our
widths, in Q8_0 / Q4_0 beside our int8 / int4. Quantization quality is measured on trained weights in the `quality`
section: on random weights it means little.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import configs as C
from .timing import fmt_tokens

MODES = {
    "fp32": dict(dtype="float32", quantize=None),
    "bf16": dict(dtype="bfloat16", quantize=None),
    "int8": dict(dtype="bfloat16", quantize="int8"),
    "int4": dict(dtype="bfloat16", quantize="int4"),
    # the same int4 decoder with the tied embedding / LM head kept in bf16: what the int8 table buys (decode only)
    "int4-bf16-head": dict(dtype="bfloat16", quantize="int4", embeddings="none", decode_only=True),
}
KERNELS = {  # the matrix products; what runs between them in a decode step is each record's `decode_kernels`
    "fp32": "fp32 GEMM (MKL); decode: batched-halves GEMV (ops/linear.py)",
    "bf16": "bf16 F.linear (oneDNN); decode: the fused kernels' bf16 dot products where the CPU has AVX512-BF16",
    "int8": "aten._weight_int8pack_mm, bf16 activations (>= 256 rows: dequantized bf16 GEMM)",
    "int4": "aten._weight_int4pack_mm_for_cpu, bf16 activations (>= 256 rows: dequantized bf16 GEMM)",
    "int4-bf16-head": "int4 as above; LM head: bf16 as in the bf16 mode",
}


# -- the checkpoint -----------------------------------------------------------------------------------------------------
def checkpoint(config_name: str, cache: Path, progress) -> Path:
    """A bf16 checkpoint with random weights of `config_name`, written by a subprocess (the build needs the whole
    bf16 model in memory once), reused while its config is unchanged."""
    folder = cache / f"{config_name}-bf16-random"
    config = C.infinitevl_config(config_name)
    marker = folder / "bench-config.json"
    if marker.exists() and marker.read_text() == config.to_json():
        return folder
    progress(f"precision: writing a bf16 random-weight {config_name} checkpoint to {folder}")
    task = {"write": config_name, "folder": str(folder)}
    subprocess.run([sys.executable, "-m", "infinitevl.bench.precision", json.dumps(task)], check=True)
    marker.write_text(config.to_json())
    return folder


def write_checkpoint(config_name: str, folder: str) -> None:
    import torch

    from ..model import InfiniteVLForConditionalGeneration

    with torch.device("meta"):
        model = InfiniteVLForConditionalGeneration(C.infinitevl_config(config_name))
    model.to_empty(device="cpu")
    model.to(torch.bfloat16)
    C.fill_random_(model)
    model.tie_weights()
    model.save_pretrained(folder, max_shard_size="4GB")


# -- the worker ------------------------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _linears(model) -> list:
    """The modules a decode step multiplies by, in order (decoder layers, then the LM head)."""
    import torch

    from ..ops.quant import QuantizedLinear, TiedQuantizedHead

    kinds = (torch.nn.Linear, QuantizedLinear, TiedQuantizedHead)
    found = [m for m in model.model.language_model.layers.modules() if isinstance(m, kinds)]
    return [*found, model.lm_head]


def step_bytes(model, state_nbytes: int) -> int:
    """Bytes one decode step must read: the decoder's weights at their stored size (the embedding table once: it is
    the tied LM head) and the state."""
    from ..ops.quant import quantized_bytes

    head = 0 if model.config.text.tie_word_embeddings else quantized_bytes(model.lm_head)
    return quantized_bytes(model.model.language_model) + head + state_nbytes


def worker(task: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the subprocess: load one mode, then measure it."""
    import torch

    from ..engine.generation import decode_step, prefill
    from ..model import InfiniteVLForConditionalGeneration
    from ..ops import fused
    from ..ops.quant import quantized_bytes
    from .timing import measure, measure_interleaved, summary, time_call

    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    mode = MODES[task["mode"]]
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) restarts here, after the imports
        f.write("5")
    out: dict[str, Any] = {"rss_start_bytes": _status("VmRSS:")}
    start = time.perf_counter()
    with torch.inference_mode():
        model = InfiniteVLForConditionalGeneration.from_pretrained(
            task["checkpoint"],
            dtype=getattr(torch, mode["dtype"]),
            quantize=mode["quantize"],
            group_size=task["group_size"] if mode["quantize"] == "int4" else None,
            embeddings=mode.get("embeddings"),
        )
        out["load_s"] = time.perf_counter() - start
        out["peak_after_load_bytes"] = _status("VmHWM:")
        out["weight_bytes"] = quantized_bytes(model)
        out["quantization"] = model.quantization.to_json() if model.quantization else None
        token = torch.tensor([7])
        states = {n: C.fill_state(model.new_state(), n) for n in task["contexts"]}
        first = states[task["contexts"][0]]
        for _ in range(3 * task["warmup"]):
            decode_step(model, first, token)
        timings = measure_interleaved(
            {n: (lambda s=s: decode_step(model, s, token)) for n, s in states.items()}, task["repeats"]
        )
        out["decode"] = [
            {"context": n, **timings[n], "floor_bytes": step_bytes(model, s.nbytes), "state_bytes": s.nbytes}
            for n, s in states.items()
        ]
        x = torch.randn(1, 1, model.config.text.hidden_size, dtype=model.dtype)
        layers = _linears(model)
        inputs = [x.new_zeros(1, 1, getattr(m, "in_features", x.shape[-1])).normal_() for m in layers]

        def matmuls():
            for m, a in zip(layers, inputs):
                m(a)

        # the overhead: the step at the first context against its matmuls alone, interleaved so that a slow phase of
        # the machine hits both; and the same step on the plain PyTorch ops where the fused kernels apply
        steps = {"step": lambda s=first: decode_step(model, s, token), "matmuls": matmuls}
        out["decode_kernels"] = fused.status(model.dtype)
        if model.language_model.decode_kernels:
            steps["plain"] = lambda s=first: _plain(model, lambda: decode_step(model, s, token))
        split = measure_interleaved(steps, task["repeats"], warmup=task["warmup"])
        out["matmuls"], out["overhead_step"], out["plain_step"] = split["matmuls"], split["step"], split.get("plain")
        del states, first
        if mode.get("decode_only"):
            out["peak_bytes"], out["rss_end_bytes"] = _status("VmHWM:"), _status("VmRSS:")
            return out
        vocab = min(1000, model.config.image_token_id)  # text tokens only
        ids = torch.randint(0, vocab, (1, task["prefill_tokens"]), generator=torch.Generator().manual_seed(0))
        prefill(model, model.new_state(), ids[:, : task["prefill_chunk"] // 8], chunk_size=task["prefill_chunk"])
        times = [
            time_call(lambda: prefill(model, model.new_state(), ids, chunk_size=task["prefill_chunk"]))
            for _ in range(task["prefill_repeats"])
        ]
        out["prefill"] = {"tokens": task["prefill_tokens"], "chunk": task["prefill_chunk"], **summary(times)}
        out["prefill"]["tokens_per_s"] = task["prefill_tokens"] / out["prefill"]["median_s"]
        side = task["frame"] // 14
        pixels = torch.randn(side * side, model.config.vision.patch_dim)  # one frame (the processor doubles it in time)
        grid = torch.tensor([[1, side, side]])
        out["vision"] = {
            "frame": task["frame"],
            "tokens": side * side // 4,
            **measure(lambda: model.get_image_features(pixels, grid), task["vision_repeats"], warmup=1),
        }
    out["peak_bytes"] = _status("VmHWM:")
    out["rss_end_bytes"] = _status("VmRSS:")
    return out


def _plain(model, fn):
    """fn() with the model's fused decode kernels switched off (ops/fused.py)."""
    text = model.language_model
    previous = text._decode_request
    text.set_decode_path("0")
    try:
        return fn()
    finally:
        text.set_decode_path(previous)


def run_worker(task: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "infinitevl.bench.precision", json.dumps(task)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"status": "failed", "error": tail[0]}
    return {"status": "measured", **json.loads(proc.stdout.strip().splitlines()[-1])}


def run(plan, progress, bandwidth: float, cache: Path) -> dict[str, Any]:
    import torch

    p = plan.precision
    folder = checkpoint(p["config"], cache, progress)
    config = C.infinitevl_config(p["config"])
    out: dict[str, Any] = {
        "config": C.describe_config(p["config"], config, vision=True),
        "bandwidth": bandwidth,
        "checkpoint_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "kernels": KERNELS,
        "modes": {},
    }
    for name in p["modes"]:
        task = {
            "mode": name,
            "checkpoint": str(folder),
            "threads": torch.get_num_threads(),
            **{k: p[k] for k in ("contexts", "repeats", "warmup", "group_size", "vision_repeats", "frame")},
            **{k: p[k] for k in ("prefill_tokens", "prefill_chunk", "prefill_repeats")},
        }
        progress(f"precision {p['config']} {name}: load, decode at {[fmt_tokens(n) for n in p['contexts']]}, ...")
        result = run_worker(task, p["worker_timeout"])
        for point in result.get("decode", []):
            point["floor_s"] = point["floor_bytes"] / bandwidth
            point["achieved_over_floor"] = point["median_s"] / point["floor_s"]
        out["modes"][name] = result
        if result["status"] != "measured":
            progress(f"precision {name}: {result['error']}")
            continue
        d = result["decode"][0]
        progress(
            f"precision {name}: load {result['load_s']:.0f} s, peak {result['peak_bytes'] / 2**30:.2f} GiB, decode "
            f"{d['median_s'] * 1e3:.1f} ms at {fmt_tokens(d['context'])} ({d['achieved_over_floor']:.2f}x floor), "
            f"matmuls {result['matmuls']['median_s'] * 1e3:.1f} ms"
            + (
                f", prefill {result['prefill']['tokens_per_s']:.0f} tok/s, vision {result['vision']['median_s']:.2f} s"
                if "prefill" in result
                else ""
            )
        )
    if p.get("llamacpp"):
        from . import llamacpp

        out["llamacpp"] = llamacpp.run(p["llamacpp"], cache, progress)
    return out


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    if "write" in job:
        write_checkpoint(job["write"], job["folder"])
    else:
        print(json.dumps(worker(job)))
