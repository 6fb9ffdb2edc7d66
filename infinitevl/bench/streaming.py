"""Streaming: frames per second over a long live stream of 448x448 frames (256 tokens each), both models.

The source is a real video (`infinitevl/assets/media/mllm_demo/mllm_demo_data/1.mp4`, shipped with the package) sampled at 2 frames/s and looped
(timestamps keep increasing) until the stream is long enough. Per frame:

    decode      PyAV decoding up to the next sampled frame (`iter_video`)
    preprocess  the processor's resize + patchify (`Processor.encode_frame`)
    vision      the vision tower (the tower module's forward, which the engine's prefill calls directly)
    decoder     the rest: the decoder taking in the frame's tokens (and InfiniteVL's last-position logits)

InfiniteVL runs the real `StreamSession.append_frame`; the preprocess and vision times are read by wrapping the
session's processor and model methods on the instances (the code path is unchanged), and the decoder time is the
remainder. The baseline gets the same frames through the same processor and the same vision tower (the same
module: identical cost), and its text model takes the 256 vision embeddings per frame via `inputs_embeds` with
multimodal positions into its growing `DynamicCache`, plus its lm_head on the last position. It runs until its
decoder FPS has fallen to `baseline_stop_ratio` of its first frames', or out of frames, time or memory (said which).

Both are warmed up on a short throwaway stream first. FPS over a window of frames = 1 / the median frame time
(frames / summed time is kept too).

A controlled check follows the streams: InfiniteVL's decoder taking in one frame's worth of tokens into states
filled (see `configs.fill_state`) to the history at the window-full frames and at the late frame, the two timed in
turn for `controlled_repeats` rounds. It separates what the state's size could cost (nothing, if the design holds)
from drift over a long-running process on a shared machine.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..defaults import PHOTOS
from . import configs as C
from .decode import reserve_bytes
from .timing import available_ram, free_memory, measure_interleaved, rss

DEFAULT_VIDEO = PHOTOS / "1.mp4"
DEFAULT_SYSTEM = "You are a helpful assistant."


def looped_frames(path: Path, fps: float, total: int) -> Iterator[tuple[Any, float, float]]:
    """(frame, timestamp, seconds spent decoding it), the video played again and again up to `total` frames."""
    from ..processing.media import iter_video

    offset, count = 0.0, 0
    while count < total:
        it = iter_video(path, fps)
        last = 0.0
        while count < total:
            start = time.perf_counter()
            try:
                frame, t = next(it)
            except StopIteration:
                break
            yield frame, offset + t, time.perf_counter() - start
            last, count = t, count + 1
        offset += last + 1.0 / fps


class _Recorder:
    """Wraps a bound method on its instance and records the duration of each call."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.seconds = owner, name, 0.0
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def remove(self) -> None:
        delattr(self.owner, self.name)  # the class's method is visible again


def _new_record() -> dict[str, list]:
    keys = ("decode_s", "preprocess_s", "vision_s", "decoder_s", "total_s", "tokens", "rss_bytes", "state_bytes")
    return {k: [] for k in keys}


def stream_infinitevl(model, processor, frames, size, deadline: float, progress) -> dict[str, Any]:
    from ..engine.session import StreamSession

    session = StreamSession(model, processor, frame_size=size)
    pre = _Recorder(processor, "encode_frame")
    vis = _Recorder(model.model.visual, "forward")  # the engine's prefill calls the tower, not get_video_features
    rec, stop = _new_record(), "frames_done"
    try:
        for i, (frame, timestamp, decode_s) in enumerate(frames):
            start = time.perf_counter()
            session.append_frame(frame, timestamp)
            append_s = time.perf_counter() - start
            p, v = pre.take(), vis.take()
            _append(rec, decode_s, p, v, append_s - p - v, session.stats.tokens, session.stats.state_bytes)
            if (i + 1) % 100 == 0:
                progress(f"streaming InfiniteVL frame {i + 1}: {_fps(rec['total_s'][-100:]):.2f} FPS end to end")
            if time.perf_counter() > deadline:
                stop = "over_time_budget"
                break
    finally:
        pre.remove()
        vis.remove()
    return {"frames": rec, "stop": stop}


def frame_positions(start: int, first_time: float, timestamp: float, lh: int, lw: int, tps: int, opening: bool):
    """[3, 1, T] multimodal positions of one frame block (with its <|vision_start|> when `opening`)."""
    block_start = start + 1 if opening else start
    t_index = block_start + int((timestamp - first_time) * tps)
    rows = torch.arange(lh).view(-1, 1).expand(lh, lw).reshape(-1) + block_start
    cols = torch.arange(lw).view(1, -1).expand(lh, lw).reshape(-1) + block_start
    pos = torch.stack([torch.full_like(rows, t_index), rows, cols])
    if opening:
        pos = torch.cat([torch.full((3, 1), start), pos], dim=1)
    return pos.unsqueeze(1)


def stream_baseline(baseline, model, processor, frames, size, p, deadline: float, progress) -> dict[str, Any]:
    config = model.config
    cache = baseline.new_cache()
    prompt = processor.turns.opening(processor, DEFAULT_SYSTEM)
    baseline.prefill(cache, input_ids=torch.tensor([prompt]))
    position, block_start, first_time = len(prompt), None, 0.0
    layers = config.text.num_hidden_layers
    per_token = C.kv_bytes_per_token(config)
    rec, stop = _new_record(), "frames_done"
    first_fps = None
    for i, (frame, timestamp, decode_s) in enumerate(frames):
        start = time.perf_counter()
        vision = processor.encode_frame(frame, timestamp, size)
        t1 = time.perf_counter()
        feats = model.get_video_features(vision.pixel_values, vision.grid_thw)
        t2 = time.perf_counter()
        opening = block_start is None
        if opening:
            block_start, first_time = position + 1, timestamp
            start_embed = baseline.model.embed_tokens(torch.tensor([[config.vision_start_token_id]]))
            embeds = torch.cat([start_embed, feats[None].to(start_embed.dtype)], dim=1)
        else:
            embeds = feats[None]
        _, gh, gw = (int(x) for x in vision.grid_thw[0])
        m = config.vision.spatial_merge_size
        pos = frame_positions(
            position if opening else block_start,
            first_time,
            timestamp,
            gh // m,
            gw // m,
            config.vision.tokens_per_second,
            opening,
        )
        baseline.prefill(cache, inputs_embeds=embeds, position_ids=pos)
        position = max(position, int(pos.max()) + 1)
        t3 = time.perf_counter()
        tokens = cache.get_seq_length()
        _append(rec, decode_s, t1 - start, t2 - t1, t3 - t2, tokens, tokens * per_token)
        window = p["fps_window"]
        if i + 1 == 1 + window:
            first_fps = _fps_median(rec["decoder_s"][1:])
        if (i + 1) % 50 == 0:
            progress(f"streaming baseline frame {i + 1}: {_fps(rec['total_s'][-50:]):.2f} FPS end to end")
        if (
            first_fps
            and i + 1 >= 2 * window
            and _fps_median(rec["decoder_s"][-window:]) < p["baseline_stop_ratio"] * first_fps
        ):
            stop = "fps_declined"
            break
        if time.perf_counter() > deadline:
            stop = "over_time_budget"
            break
        growth = (tokens * per_token) // layers + 2 * embeds.shape[1] * per_token + 512 * 2**20
        if growth > available_ram() - reserve_bytes():
            stop = "out_of_memory"
            break
    del cache
    free_memory()
    return {"frames": rec, "stop": stop}


def _append(rec, decode_s, pre_s, vis_s, dec_s, tokens, state_bytes) -> None:
    for key, value in (
        ("decode_s", decode_s),
        ("preprocess_s", pre_s),
        ("vision_s", vis_s),
        ("decoder_s", dec_s),
        ("total_s", decode_s + pre_s + vis_s + dec_s),
        ("tokens", tokens),
        ("rss_bytes", rss()),
        ("state_bytes", state_bytes),
    ):
        rec[key].append(round(value, 6) if isinstance(value, float) else value)


def _fps(seconds: list[float]) -> float:
    return len(seconds) / sum(seconds) if seconds and sum(seconds) > 0 else 0.0


def _fps_median(seconds: list[float]) -> float:
    """1 / the median frame time: robust to a few frames slowed by other processes on a shared machine."""
    return 1.0 / statistics.median(seconds) if seconds and statistics.median(seconds) > 0 else 0.0


def windows(rec: dict[str, list], p: dict, config) -> dict[str, Any]:
    """FPS (end to end and decoder only) over named windows of frames: `first` (after the warm frame 0),
    `window_full` (once the sliding window holds only frame tokens), `late` (from frame `late_frame`) and `last`.
    `fps_*` is 1 / the median frame time (what the targets use), `fps_*_mean` frames / their summed time."""
    n, w = len(rec["total_s"]), p["fps_window"]
    tokens_per_frame = rec["tokens"][1] - rec["tokens"][0] if n > 1 else 0
    fill = math.ceil((config.text.window or 0) / tokens_per_frame) + 1 if tokens_per_frame else 0
    starts = {"first": 1, "window_full": fill, "late": p["late_frame"], "last": max(0, n - w)}
    out = {}
    for name, s in starts.items():
        if s + w > n:
            continue
        out[name] = {
            "frames": [s, s + w],
            "fps_end_to_end": _fps_median(rec["total_s"][s : s + w]),
            "fps_decoder": _fps_median(rec["decoder_s"][s : s + w]),
            "fps_end_to_end_mean": _fps(rec["total_s"][s : s + w]),
            "fps_decoder_mean": _fps(rec["decoder_s"][s : s + w]),
            "tokens": rec["tokens"][s + w - 1],
        }
    return out


@torch.no_grad()
def controlled_decoder(model, contexts: list[int], tokens_per_frame: int, repeats: int) -> dict[str, Any]:
    """Seconds for the decoder to take in one frame's tokens after each of `contexts` tokens, timed in turn; each
    state keeps taking frames (the stream continues), one untimed round first."""
    from ..engine.generation import prefill

    states = [C.fill_state(model.new_state(), n) for n in contexts]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.text.vocab_size, (1, tokens_per_frame), generator=gen)
    timings = measure_interleaved({i: (lambda s=s: prefill(model, s, ids)) for i, s in enumerate(states)}, repeats)
    return {
        "tokens_per_frame": tokens_per_frame,
        "points": [{"context": n, **timings[i]} for i, n in enumerate(contexts)],
    }


def run(plan, progress) -> dict[str, Any]:
    from ..processing.processor import Processor

    p = plan.streaming
    name = p["config"]
    config = C.infinitevl_config(name)
    size = (p["frame_size"], p["frame_size"])
    model = C.build_infinitevl(config, vision=True)
    baseline = C.build_baseline(config)
    processor = Processor(C.byte_tokenizer(config), config, min_pixels=56 * 56, max_pixels=size[0] * size[1])
    video = Path(p.get("video") or DEFAULT_VIDEO)
    progress(f"streaming {name}: warm-up, then {p['frames']} frames of {size[0]}x{size[1]} from {video.name}")
    warm = p["warmup_frames"]
    stream_infinitevl(model, processor, looped_frames(video, p["fps"], warm), size, float("inf"), progress)
    stream_baseline(baseline, model, processor, looped_frames(video, p["fps"], warm), size, p, float("inf"), progress)
    free_memory()
    results: dict[str, Any] = {}
    for who in ("infinitevl", "baseline"):
        deadline = time.perf_counter() + p[f"{who}_seconds"]
        frames = looped_frames(video, p["fps"], p["frames"])
        if who == "infinitevl":
            run_ = stream_infinitevl(model, processor, frames, size, deadline, progress)
        else:
            run_ = stream_baseline(baseline, model, processor, frames, size, p, deadline, progress)
        rec = run_["frames"]
        results[who] = {**run_, "windows": windows(rec, p, config), "n_frames": len(rec["total_s"])}
        progress(f"streaming {who}: {len(rec['total_s'])} frames ({run_['stop']})")
        free_memory()
    w = results["infinitevl"]["windows"]
    if "window_full" in w and "late" in w:
        rec = results["infinitevl"]["frames"]
        contexts = [w["window_full"]["tokens"], w["late"]["tokens"]]
        per_frame = rec["tokens"][1] - rec["tokens"][0]
        progress(f"streaming controlled: decoder per frame after {contexts[0]} vs {contexts[1]} tokens")
        results["controlled"] = controlled_decoder(model, contexts, per_frame, p["controlled_repeats"])
    return {
        "config": C.describe_config(name, config, vision=True),
        "video": str(video),
        "sample_fps": p["fps"],
        "frame_size": list(size),
        "fps_window": p["fps_window"],
        "late_frame": p["late_frame"],
        "baseline_stop_ratio": p["baseline_stop_ratio"],
        **results,
    }
