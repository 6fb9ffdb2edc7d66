"""Real-size streaming: live frames through the 4b configuration with the full Qwen2.5-VL vision tower, per part and
against the floor of each part, for each decoder precision, frame size and pairing, with the targets of the issue
judged from the same run.

The model is the precision section's random-weight bf16 checkpoint, loaded as a user would
(`from_pretrained(dtype=..., quantize=...)`, the load timed) in each of the plan's modes for this CPU (`plan_modes`):
where it has bf16 instructions, the decoder in bf16, int8 or int4 and the tower in bf16; elsewhere fp32 and a
weight-only decoder beside an fp32 tower. A mode ending in "+int8p" also computes the tower and the prefill with int8
x int8 products (`--int8-products`). The first mode's single frames are today's path, which the targets compare with. The source is the bundled video (`infinitevl/assets/media/mllm_demo/mllm_demo_data/1.mp4`)
sampled at `fps` and looped. For each mode and each entry of `streams` (frame size: 448 gives 256 tokens per
temporal step, 224 gives 64; pairing: one frame per temporal step, or `pair_frames`: two, as a video file's frames;
`frames_per_step`: the frames gathered into one prefill, by default one temporal step's), a fresh `StreamSession`
takes `warmup_steps` untimed steps, then `frames` live frames, each appended step split into:

    decode      PyAV decoding up to the next sampled frame (per frame)
    preprocess  resize + patchify (`Processor.encode_frame`, or `live_frame` + `encode_frame_pair` when paired)
    tower       the vision tower (the tower module's forward, which the engine's prefill calls)
    prefill     the rest of the append: the decoder taking in the step's tokens

The floor beside the tower and the prefill is the same step's matrix products timed alone in the same run: every
linear layer (and the tower's patch-embedding convolution) the last warm-up step called, recorded by hooks and
replayed in order on inputs of the shapes it saw, with the same modules (so the same kernels: oneDNN bf16, the
int8 / int4 packed kernels). Attention inside the tower is not counted in the floor. Streams whose steps call the
same modules on the same shapes (a pair's step has as many tokens as a single frame's) share one floor
measurement. End-to-end frames/s is frames / the summed time of decode, preprocess, tower and prefill.

Then, in the same run:
  - one long stream (`long`: a mode, size and pairing, hundreds of frames): the state's bytes after every step
    (constant by design) and the time per frame over its first and last quarter;
  - the product probe (bench/products.py): the products of one tower step and one prefill step of the first mode's
    `probe.size` single-frame stream, as fp32, bf16 (where the CPU has bf16 instructions) and the int8 x int8
    products of `--int8-products` (dynamic per-row activation scales, per-channel
    weight scales, quantize / dequantize included), summed per step; and the tower's features on one real frame of
    that size in fp32, bf16 and int8 x int8 linear layers: cosine similarity per token against fp32;
  - decode (`decode.modes`): one decode step after a filled context against its own products (the step's linear
    layers recorded by hooks, plus any the fused kernels compute inside, called alone with one row), timed in
    turn: the overhead outside the products as a share of the step.

The CPU, its flags that matter for these kernels, torch's CPU capability and whether oneDNN runs bf16 natively are
recorded with the results.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from . import configs as C
from .machine import cpu_flags, cpu_model
from .precision import KERNELS, MODES, checkpoint
from .products import bf16_instructions, probe, product_modules, record, replay, signature, tower_agreement
from .streaming import DEFAULT_VIDEO, _Recorder, looped_frames
from .timing import free_memory, measure_interleaved

# the precision section's modes, plus weight-only decoders whose other weights (and the tower) stay in fp32, for CPUs
# without bf16 instructions; a mode name ending in "+int8p" also computes the tower and prefill with int8 x int8
# products (`use_int8_products`)
STREAM_MODES = {
    **MODES,
    "int8-fp32": dict(dtype="float32", quantize="int8"),
    "int4-fp32": dict(dtype="float32", quantize="int4"),
}
STREAM_KERNELS = {
    **KERNELS,
    "int8-fp32": KERNELS["int8"].replace("bf16 activations", "bf16 activations (fp32 elsewhere)"),
    "int4-fp32": KERNELS["int4"].replace("bf16 activations", "bf16 activations (fp32 elsewhere)"),
}
INT8P = "+int8p"
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
PARTS = ("decode_s", "preprocess_s", "tower_s", "prefill_s")


def cpu_kernels() -> dict[str, Any]:
    """The CPU and what its matrix-product kernels can use."""
    flags = set(cpu_flags())
    return {
        "cpu": cpu_model(),
        "flags": [f for f in KERNEL_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "threads": torch.get_num_threads(),
    }


def stream(
    model,
    processor,
    video: Path,
    size: int,
    paired: bool,
    frames: int,
    p: dict,
    products: bool = True,
    frames_per_step: int | None = None,
):
    """One live stream of `frames` frames after `warmup_steps` steps: (per-step parts, frames/s and the state size
    over the stream; the products the last warm-up step called, {"tower": calls, "prefill": calls}, or None)."""
    from ..engine.session import StreamSession

    warm = p["warmup_steps"]
    if products and warm < 1:
        raise ValueError(f"stream4b: warmup_steps is {warm}; the floors are recorded on a warm-up step (give >= 1)")
    session = StreamSession(
        model, processor, frame_size=(size, size), pair_frames=paired, frames_per_step=frames_per_step
    )
    per_step = session.frames_per_step
    if frames % per_step:
        raise ValueError(f"stream4b: {frames} frames is not a whole number of steps of {per_step} frames")
    names = ("live_frame", "encode_frame_pair") if paired else ("encode_frame",)
    pre = [_Recorder(processor, n) for n in names]
    tower = _Recorder(model.model.visual, "forward")  # the prefill runs the tower module itself
    tower_modules, decoder_modules = product_modules(model)
    rec: dict[str, list] = {k: [] for k in (*PARTS, "frames", "tokens", "state_bytes")}
    calls, hooks, steps = None, [], 0
    decode_s = pre_s = pending = 0.0
    try:
        total = warm * per_step + frames
        for frame, t, dec in looped_frames(video, p["fps"], total):
            if products and calls is None and steps == warm - 1:
                (tower_calls, h1), (prefill_calls, h2) = record(tower_modules), record(decoder_modules)
                calls, hooks = {"tower": tower_calls, "prefill": prefill_calls}, h1 + h2
            start = time.perf_counter()
            before = session.stats.frames
            session.append_frame(frame, t)
            append_s = time.perf_counter() - start
            decode_s += dec  # a paired first frame's decode and preprocessing belong to its pair's step
            tower_s = tower.take()
            pre_s += sum(r.take() for r in pre)
            pending += append_s - tower_s
            n = session.stats.frames - before
            if not n:
                continue
            for h in hooks:
                h.remove()
            hooks = []
            if steps >= warm:
                for key, value in zip(PARTS, (decode_s, pre_s, tower_s, pending - pre_s)):
                    rec[key].append(value)
                rec["frames"].append(n)
                rec["tokens"].append(session.stats.tokens)
                rec["state_bytes"].append(session.stats.state_bytes)
            steps += 1
            decode_s = pre_s = pending = 0.0
    finally:
        for r in [*pre, tower]:
            r.remove()
        for h in hooks:
            h.remove()
    n_frames = sum(rec["frames"])
    seconds = sum(sum(rec[k]) for k in PARTS)
    result = {
        "size": size,
        "paired": paired,
        "frames_per_step": per_step,
        "frames": n_frames,
        "tokens_per_frame": (size // 28) ** 2 / (2 if paired else 1),
        "fps": n_frames / seconds if seconds else None,
        "per_frame_s": {k: sum(rec[k]) / n_frames for k in PARTS},
        "step_median_s": {k: statistics.median(rec[k]) for k in PARTS[1:]},
        "state_bytes": sorted(set(rec["state_bytes"])),
        "steps": rec,
    }
    return result, calls


def long_stream(model, processor, video: Path, p: dict) -> dict[str, Any]:
    """The long stream: its state bytes over every step and the time per frame over its first and last quarter."""
    q = p["long"]
    result, _ = stream(model, processor, video, q["size"], q["paired"], q["frames"], p, products=False)
    steps = result["steps"]
    totals = [sum(steps[k][i] for k in PARTS) for i in range(len(steps["frames"]))]
    quarter = max(1, len(totals) // 4)

    def per_frame(part: slice) -> float:
        return sum(totals[part]) / sum(steps["frames"][part])

    first, last = per_frame(slice(0, quarter)), per_frame(slice(len(totals) - quarter, len(totals)))
    return {"mode": q["mode"], **result, "first_quarter_s": first, "last_quarter_s": last, "change": last / first - 1}


def decode_overhead(model, context: int, repeats: int) -> dict[str, Any]:
    """One decode step after `context` tokens against its matrix products alone, timed in turn."""
    from ..engine.generation import decode_step
    from ..ops import fused

    state = C.fill_state(model.new_state(), context)
    token = torch.tensor([7])
    for _ in range(3):  # the first step decides the decode path (and may build the fused kernels)
        decode_step(model, state, token)
    _, decoder = product_modules(model)
    calls, hooks = record(decoder)
    try:
        decode_step(model, state, token)
    finally:
        for h in hooks:
            h.remove()
    called = {id(m) for m, _, _ in calls}
    inside = [m for m in decoder if id(m) not in called]  # computed inside the fused kernels: still products
    everything = calls + [(m, torch.Size([1, 1, m.in_features]), model.dtype) for m in inside]
    inputs = [torch.randn(shape).to(dtype) for _, shape, dtype in everything]

    def products():
        for (m, _, _), x in zip(everything, inputs):
            m(x)

    split = measure_interleaved({"step": lambda: decode_step(model, state, token), "products": products}, repeats)
    step, mm = split["step"]["median_s"], split["products"]["median_s"]
    return {
        "context": context,
        "step": split["step"],
        "products": split["products"],
        "calls": len(calls),
        "inside_kernels": len(inside),
        "overhead": (step - mm) / step,
        "decode_kernels": fused.status(model.dtype),
    }


def plan_modes(p: dict) -> list[str]:
    """The plan's modes on this CPU: `modes` where it has bf16 instructions, else `modes_without_bf16` (bf16 is
    emulated there, several times slower than fp32); the first is today's path."""
    modes = p["modes"] if bf16_instructions() else p.get("modes_without_bf16", p["modes"])
    unknown = [m for m in modes if m.removesuffix(INT8P) not in STREAM_MODES]
    if unknown:
        raise ValueError(
            f"stream4b: unknown modes {unknown}; known: {', '.join(STREAM_MODES)} (each may end in {INT8P})"
        )
    return list(modes)


def kernels(mode: str) -> str:
    text = STREAM_KERNELS[mode.removesuffix(INT8P)]
    if mode.endswith(INT8P):
        from ..ops.int8_products import weight_levels

        bits = 8 if weight_levels() == 127 else 7
        text = text.split(" (>= 256 rows")[0]  # the int8 products take those rows
        text += (
            f"; tower and prefill (32 rows and more): int8 x int8 (oneDNN quantized linear, activations per row at "
            f"run time, {bits}-bit weights per channel)"
        )
    return text


def _load(folder: Path, mode: str, p: dict):
    from ..model import InfiniteVLForConditionalGeneration

    m = STREAM_MODES[mode.removesuffix(INT8P)]
    model = InfiniteVLForConditionalGeneration.from_pretrained(
        folder,
        dtype=getattr(torch, m["dtype"]),
        quantize=m["quantize"],
        group_size=p["group_size"] if m["quantize"] == "int4" else None,
    ).eval()
    if mode.endswith(INT8P):
        model.use_int8_products()
    return model


def run(plan, progress, cache: Path) -> dict[str, Any]:
    from ..processing.processor import Processor

    p = plan.stream4b
    modes = plan_modes(p)
    long_mode = p["long"]["mode"] if p["long"]["mode"] in modes else modes[-1]
    # decode: the quantized decoders (a "+int8p" mode decodes as its base mode does: measured once)
    bases = [m.removesuffix(INT8P) for m in modes]
    decode_modes = [m for m, b in zip(modes, bases) if STREAM_MODES[b]["quantize"] and (m == b or b not in modes)]
    name = p["config"]
    folder = checkpoint(name, cache, progress)
    config = C.infinitevl_config(name)
    video = Path(p.get("video") or DEFAULT_VIDEO)
    largest = max([s["size"] for s in p["streams"]] + [p["long"]["size"], p["probe"]["size"]])
    processor = Processor(C.byte_tokenizer(config), config, min_pixels=56 * 56, max_pixels=largest * largest)
    out: dict[str, Any] = {
        "config": C.describe_config(name, config, vision=True),
        "video": str(video),
        "cpu": cpu_kernels(),
        "today": modes[0],
        "kernels": {m: kernels(m) for m in modes},
        "load_s": {},
        "runs": [],
        "probe": None,
        "tower_agreement": None,
        "long": None,
        "decode": {},
    }
    floors: dict[tuple, dict] = {}
    for i, mode in enumerate(modes):
        progress(f"stream4b {name} {mode}: loading")
        start = time.perf_counter()
        model = _load(folder, mode, p)
        out["load_s"][mode] = time.perf_counter() - start
        with torch.inference_mode():
            for s in p["streams"]:
                size, paired = s["size"], s["paired"]
                steps = f", {s['frames_per_step']} per step" if s.get("frames_per_step") else ""
                progress(f"stream4b {mode}: {s['frames']} frames of {size}x{size}{', paired' if paired else ''}{steps}")
                per_step = s.get("frames_per_step")
                result, calls = stream(model, processor, video, size, paired, s["frames"], p, frames_per_step=per_step)
                for part in ("tower", "prefill"):
                    key = (mode, part, signature(calls[part]))
                    if key not in floors:
                        floors[key] = replay(calls[part], p["floor_repeats"])
                result["floors"] = {part: floors[(mode, part, signature(calls[part]))] for part in ("tower", "prefill")}
                out["runs"].append({"mode": mode, **result})
                if i == 0 and size == p["probe"]["size"] and not paired:
                    progress(f"stream4b {mode}: the products of a {size} step as fp32, bf16 and int8 x int8")
                    out["probe"] = {
                        "mode": mode,
                        "size": size,
                        "int8_kernel": "the int8 products of `--int8-products` (oneDNN quantized linear)",
                        **{part: probe(calls[part], p["probe"]["repeats"]) for part in ("tower", "prefill")},
                    }
            if i == 0:
                frame, _, _ = next(looped_frames(video, p["fps"], 1))
                side = p["probe"]["size"]
                vision = processor.encode_frame(frame, 0.0, (side, side))
                progress(f"stream4b: the tower's features on one {side} frame in fp32, {model.dtype}, int8 x int8")
                out["tower_agreement"] = {
                    "size": side,
                    **tower_agreement(model.model.visual, vision.pixel_values, vision.grid_thw),
                }
            if mode == long_mode:
                progress(f"stream4b {mode}: the long stream, {p['long']['frames']} frames")
                out["long"] = {**long_stream(model, processor, video, p), "mode": mode}
            if mode in decode_modes:
                progress(f"stream4b {mode}: a decode step against its products")
                out["decode"][mode] = decode_overhead(model, p["decode"]["context"], p["decode"]["repeats"])
        del model, calls  # the recorded calls hold the model's layers: the next mode's load needs their memory
        free_memory()
    return out
