"""Real-size streaming: live frames through the 4b configuration with the full Qwen2.5-VL vision tower, per part and
against the floor of each part, for each decoder precision, frame size and pairing.

The model is the precision section's random-weight bf16 checkpoint, loaded as a user would
(`from_pretrained(dtype=..., quantize=...)`: the decoder in bf16, int8 or int4; the tower in bf16 in every mode).
The source is the bundled video (`infinitevl/assets/media/mllm_demo/mllm_demo_data/1.mp4`) sampled at `fps` and
looped. For each mode, frame size (448: 256 tokens per step, 224: 64) and pairing (one frame per temporal step, or
`pair_frames`: two, as a video file's frames), a `StreamSession` takes `frames` live frames after `warmup_frames`,
and each appended step is split into:

    decode      PyAV decoding up to the next sampled frame (per frame)
    preprocess  resize + patchify (`Processor.encode_frame`, or `live_frame` + `encode_frame_pair` when paired)
    tower       the vision tower (the tower module's forward)
    prefill     the rest of the append: the decoder taking in the step's tokens

The floor beside the tower and the prefill is the same step's matrix products timed alone in the same run: every
linear layer (and the tower's patch-embedding convolution) the step called, replayed in order on inputs of the
shapes it saw, with the same modules (so the same kernels: oneDNN bf16, the int8 / int4 packed kernels). Attention
inside the tower is not counted in the floor. End-to-end frames/s is frames / the summed time of decode,
preprocess, tower and prefill. The CPU, its flags that matter for these kernels, torch's CPU capability and whether
oneDNN runs bf16 natively are recorded with the results. The state size is checked constant over the stream.
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
from .streaming import DEFAULT_VIDEO, _Recorder, looped_frames
from .timing import free_memory, measure

KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


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


def _products(modules: list[torch.nn.Module]) -> tuple[list, list]:
    """Forward hooks that record, in call order, each module and the shape of its input."""
    calls: list[tuple[torch.nn.Module, torch.Size, torch.dtype]] = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: calls.append((m, args[0].shape, args[0].dtype))) for m in modules
    ]
    return calls, hooks


def product_modules(model) -> tuple[list, list]:
    """The tower's and the decoder's modules that are matrix products."""
    from ..ops.quant import QuantizedLinear, TiedQuantizedHead

    kinds = (torch.nn.Linear, torch.nn.Conv3d, QuantizedLinear, TiedQuantizedHead)
    tower = [m for m in model.model.visual.modules() if isinstance(m, kinds)]
    decoder = [m for m in model.model.language_model.modules() if isinstance(m, kinds)] + [model.lm_head]
    return tower, decoder


def replay(calls: list, repeats: int) -> dict[str, Any]:
    """The recorded products alone: each module on a random input of the shape it saw, in order."""
    inputs = [torch.randn(shape).to(dtype) for _, shape, dtype in calls]

    def run():
        for (m, _, _), x in zip(calls, inputs):
            m(x)

    return measure(run, repeats, warmup=1)


def stream(model, processor, video: Path, size: int, paired: bool, p: dict) -> dict[str, Any]:
    """One live stream: per-step parts, the floors of one step, frames/s and the state size over the stream."""
    from ..engine.session import StreamSession

    session = StreamSession(model, processor, frame_size=(size, size), pair_frames=paired)
    names = ("live_frame", "encode_frame_pair") if paired else ("encode_frame",)
    pre = [_Recorder(processor, n) for n in names]
    tower = _Recorder(model.model.visual, "forward")  # the prefill runs the tower module itself
    rec: dict[str, list] = {k: [] for k in ("decode_s", "preprocess_s", "tower_s", "prefill_s", "frames", "tokens")}
    sizes, decode_s, pre_s, pending = set(), 0.0, 0.0, 0.0
    try:
        total = p["warmup_frames"] + p["frames"]
        for i, (frame, t, dec) in enumerate(looped_frames(video, p["fps"], total)):
            start = time.perf_counter()
            before = session.stats.frames
            session.append_frame(frame, t)
            append_s = time.perf_counter() - start
            decode_s += dec  # a paired first frame's decode and preprocessing belong to its pair's step
            tower_s = tower.take()
            pre_s += sum(r.take() for r in pre)
            pending += append_s - tower_s
            frames = session.stats.frames - before
            if not frames:
                continue
            if i >= p["warmup_frames"]:
                for key, value in (("decode_s", decode_s), ("preprocess_s", pre_s), ("tower_s", tower_s)):
                    rec[key].append(value)
                rec["prefill_s"].append(pending - pre_s)
                rec["frames"].append(frames)
                rec["tokens"].append(session.stats.tokens)
                sizes.add(session.stats.state_bytes)
            decode_s = pre_s = pending = 0.0
    finally:
        for r in [*pre, tower]:
            r.remove()
    floors = step_floors(model, processor, size, paired, p["floor_repeats"])
    n_frames = sum(rec["frames"])
    seconds = sum(sum(rec[k]) for k in ("decode_s", "preprocess_s", "tower_s", "prefill_s"))
    per_frame = {k: sum(rec[k]) / n_frames for k in ("decode_s", "preprocess_s", "tower_s", "prefill_s")}
    tokens_per_step = (size // 28) ** 2
    return {
        "size": size,
        "paired": paired,
        "frames": n_frames,
        "tokens_per_frame": tokens_per_step / (2 if paired else 1),
        "fps": n_frames / seconds if seconds else None,
        "per_frame_s": per_frame,
        "step_median_s": {k: statistics.median(rec[k]) for k in ("preprocess_s", "tower_s", "prefill_s")},
        "floors": floors,
        "state_bytes": sorted(sizes),
        "steps": rec,
    }


def step_floors(model, processor, size: int, paired: bool, repeats: int) -> dict[str, Any]:
    """The matrix products of one step (tower and prefill), recorded on a fresh session and timed alone."""
    from PIL import Image

    from ..engine.session import StreamSession

    session = StreamSession(model, processor, frame_size=(size, size), pair_frames=paired)
    frame = Image.new("RGB", (size, size), (90, 120, 150))
    session.append_frame(frame, 0.0)
    session.append_frame(frame, 1.0)  # a second step continues the segment, as every step after the first does
    tower_modules, decoder_modules = product_modules(model)
    tower_calls, hooks = _products(tower_modules)
    prefill_calls, more = _products(decoder_modules)
    try:
        session.append_frame(frame, 2.0)
        if paired:
            session.append_frame(frame, 3.0)
    finally:
        for h in hooks + more:
            h.remove()
    return {"tower": replay(tower_calls, repeats), "prefill": replay(prefill_calls, repeats)}


def run(plan, progress, cache: Path) -> dict[str, Any]:
    from ..model import InfiniteVLForConditionalGeneration
    from ..processing.processor import Processor

    p = plan.stream4b
    name = p["config"]
    folder = checkpoint(name, cache, progress)
    config = C.infinitevl_config(name)
    video = Path(p.get("video") or DEFAULT_VIDEO)
    out: dict[str, Any] = {
        "config": C.describe_config(name, config, vision=True),
        "video": str(video),
        "cpu": cpu_kernels(),
        "kernels": {m: KERNELS[m] for m in p["modes"]},
        "runs": [],
    }
    for mode in p["modes"]:
        m = MODES[mode]
        progress(f"stream4b {name} {mode}: loading")
        model = InfiniteVLForConditionalGeneration.from_pretrained(
            folder,
            dtype=getattr(torch, m["dtype"]),
            quantize=m["quantize"],
            group_size=p["group_size"] if m["quantize"] == "int4" else None,
        ).eval()
        largest = max(p["sizes"])
        processor = Processor(C.byte_tokenizer(config), config, min_pixels=56 * 56, max_pixels=largest * largest)
        for size in p["sizes"]:
            for paired in p["pairing"]:
                progress(f"stream4b {mode}: {p['frames']} frames of {size}x{size}{', paired' if paired else ''}")
                with torch.inference_mode():
                    out["runs"].append({"mode": mode, **stream(model, processor, video, size, paired, p)})
        del model
        free_memory()
    return out
