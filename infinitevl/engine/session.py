"""Streaming sessions: a conversation that never ends, fed text, images, videos and live frames in constant memory.

The stream is one open user turn of a ChatML conversation. Live frames form video segments: each frame is one
temporal step of 256 tokens (at 448x448) whose temporal RoPE index comes from its timestamp, t = s0 +
floor((timestamp - first timestamp) * tokens_per_second) in every `rope_index_mode` (`model.rope.live_frame_offset`,
the rule training samples made of timed frames follow too); a segment is closed by `<|vision_end|>` when other input
follows. `ask` answers from a copy of the state (a branch), so the stream
itself is never disturbed.

With `pair_frames`, live frames are encoded two per temporal step, as a video file's frames are (half the tokens and
tower work per frame): the first frame of a pair is held (decoded, not yet in the state: `stats.pending_frames`)
until the second arrives; the pair is placed at its first frame's timestamp by the rule above, so a run of paired
live frames is the video file's block, token for token and position for position. `frames_per_step` gathers more
frames (several temporal steps, each placed by its own first frame's timestamp) into one prefill: the same tokens
and positions, the tower run once over all of them and the decoder's weights read once per step instead of once
per temporal step (the prefill of a few dozen tokens is bound by reading the weights), at the cost of latency: a
frame waits until its step is full. Held frames are answered around: a question is answered from the frames
already in the state. Other input (text, an image, a video, a chat turn) first commits the held frames (an odd last
one of a pair alone, filling both slots, as a video file's odd last frame). Snapshots keep held frames
(`metadata`). Media is decoded completely before the state is touched: a frame or file that fails to decode raises
`MediaError` and leaves the session exactly as it was. Text, questions and the system prompt are
tokenized as plain text: only the session's own turn markup becomes control tokens.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.rope import live_frame_offset
from ..processing.media import MediaError
from ..processing.processor import Processor, VisionInput
from ..state import InfiniteVLState
from .answers import fixed_answer
from .generation import DEFAULT_CHUNK, SamplingParams, TokenGenerator, prefill, prefill_steps
from .speed import Speed, timed
from .text import stream_text

DEFAULT_SYSTEM = "You are a helpful assistant."
COUNTERS = ("frames", "images", "videos", "questions", "ingest_seconds")  # kept in snapshots


@dataclass
class SessionStats:
    tokens: int = 0  # tokens in the stream (state.num_tokens)
    frames: int = 0  # live frames appended
    images: int = 0
    videos: int = 0
    questions: int = 0
    state_bytes: int = 0
    ingest_seconds: float = 0.0  # wall time spent appending
    recent_fps: float = 0.0  # frames per second over the last appended frames
    pending_frames: int = 0  # pair_frames / frames_per_step: frames held for their step, not yet in the state
    _frame_times: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.ingest_seconds if self.ingest_seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "frames": self.frames,
            "images": self.images,
            "videos": self.videos,
            "questions": self.questions,
            "state_bytes": self.state_bytes,
            "ingest_seconds": round(self.ingest_seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "recent_fps": round(self.recent_fps, 3),
            "pending_frames": self.pending_frames,
        }


@dataclass
class _Segment:
    """An open run of live frames: its RoPE block start, first timestamp and last temporal index."""

    start: int
    first_time: float
    last_time: float
    last_t: int


MAX_FRAMES_PER_STEP = 32


def frames_per_step_for(frames_per_step: int | None, pair_frames: bool) -> int:
    """The live frames one prefill step takes: `frames_per_step`, or by default one temporal step's (2 paired, else
    1). Paired, it is a whole number of pairs."""
    per_patch = 2 if pair_frames else 1
    if frames_per_step is None:
        return per_patch
    if isinstance(frames_per_step, bool) or not isinstance(frames_per_step, int):
        raise ValueError(f"frames_per_step must be a whole number (got {frames_per_step!r})")
    if not 1 <= frames_per_step <= MAX_FRAMES_PER_STEP or frames_per_step % per_patch:
        kind = "an even number (frames go in pairs)" if pair_frames else "a whole number"
        raise ValueError(
            f"frames_per_step must be {kind} in [{per_patch}, {MAX_FRAMES_PER_STEP}] (got {frames_per_step})"
        )
    return frames_per_step


@dataclass(frozen=True)
class _Held:
    """A live frame (decoded and resized) waiting for the rest of its step (pair_frames, frames_per_step)."""

    image: object  # PIL image at the session's frame size
    timestamp: float

    def as_dict(self) -> dict:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")  # lossless: the held frame comes back bit for bit
        return {"timestamp": self.timestamp, "png": base64.b64encode(buf.getvalue()).decode()}

    @classmethod
    def from_dict(cls, d: dict) -> _Held:
        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(d["png"])))
        image.load()
        return cls(image, float(d["timestamp"]))


def held_frames(meta: dict[str, str]) -> tuple[_Held, ...]:
    """The held frames a saved session's metadata keeps (`held_frame`: one, as files written before
    frames_per_step have it)."""
    if meta.get("held_frames"):
        return tuple(_Held.from_dict(d) for d in json.loads(meta["held_frames"]))
    if meta.get("held_frame"):
        return (_Held.from_dict(json.loads(meta["held_frame"])),)
    return ()


class StreamSession:
    def __init__(
        self,
        model,
        processor: Processor,
        system_prompt: str | None = DEFAULT_SYSTEM,
        chunk_size: int = DEFAULT_CHUNK,
        frame_size: tuple[int, int] | None = (448, 448),
        state: InfiniteVLState | None = None,
        max_context: int | None = None,
        pair_frames: bool = False,
        frames_per_step: int | None = None,
    ):
        self.model = model
        self.processor = processor
        self.chunk_size = chunk_size
        self.frame_size = frame_size
        self.frames_per_step = frames_per_step_for(frames_per_step, pair_frames)
        self._pair_frames = pair_frames
        self.stats = SessionStats()
        self.segment: _Segment | None = None
        self.held: tuple[_Held, ...] = ()  # frames waiting for the rest of their step (replaced, never mutated)
        # max_context: only models with full-attention layers need it (their cache is sized up front)
        self.state = state if state is not None else model.new_state(max_context=max_context)
        if state is None:  # turns are written as the checkpoint's chat template writes them (Processor.turns)
            self._feed_ids(processor.turns.opening(processor, system_prompt))
        self._refresh()

    @property
    def pair_frames(self) -> bool:
        return self._pair_frames

    @pair_frames.setter
    def pair_frames(self, value: bool) -> None:
        """Pairing turned on later (a resumed paired stream) makes a one-frame step a pair."""
        value = bool(value)
        if value and self.frames_per_step == 1:
            self.frames_per_step = 2
        self.frames_per_step = frames_per_step_for(self.frames_per_step, value)
        self._pair_frames = value

    # -- appending ---------------------------------------------------------------------------------------------------
    def append_text(self, text: str) -> int:
        """Append plain text to the stream (closes an open frame segment first). Returns tokens appended."""
        steps = self.append_text_steps(text)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def append_text_steps(self, text: str, chunk_size: int | None = None) -> Generator[None, None, int]:
        """`append_text` one prefill chunk per `next()`, for a caller that runs other work between chunks (the
        server decodes other streams); the generator returns the number of tokens appended."""
        before = int(self.state.num_tokens[0])
        if self.held:
            self.flush_frames()
            yield
        ids = self._close_segment_ids() + self.processor.tokenize_text(text)
        steps = prefill_steps(self.model, self.state, torch.tensor([ids]), chunk_size=chunk_size or self.chunk_size)
        while True:
            t0 = time.perf_counter()
            try:
                next(steps)
            except StopIteration:
                break
            finally:
                self.stats.ingest_seconds += time.perf_counter() - t0
            yield
        self.segment = None
        self._refresh()
        return int(self.state.num_tokens[0]) - before

    def append_image(self, image) -> int:
        vision = self.processor.encode_image(image)  # decoded before anything changes
        n = self._append_block(vision)
        self.stats.images += 1
        return n

    def append_video(self, video, fps: float = 2.0, max_frames: int = 768) -> int:
        """A whole video file (or a list of frames) as one block, Qwen2.5-VL style (frame pairs)."""
        if isinstance(video, (list, tuple)):
            vision = self.processor.encode_frames(video, fps)
        else:
            vision = self.processor.encode_video(video, fps=fps, max_frames=max_frames)
        n = self._append_block(vision)
        self.stats.videos += 1
        return n

    def append_frame(self, frame, timestamp: float) -> int:
        """One live frame at `timestamp` seconds (non-decreasing within the stream). Frames are held until their
        step is full (`frames_per_step`: two with `pair_frames`); the call that fills it appends them all and
        returns the tokens appended, the others return 0."""
        if not math.isfinite(timestamp):
            raise MediaError(f"frame timestamp {timestamp} is not a finite number of seconds")
        if self.frames_per_step == 1 and not self.held:
            self._check_time(timestamp)
            vision = self.processor.encode_frame(frame, timestamp, self.frame_size)
            return self._append_live(vision, [timestamp], timestamp, 1)
        image = self.processor.live_frame(frame, self.frame_size)  # decoded before anything changes
        self._check_time(timestamp)
        if self.held and image.size != self.held[0].image.size:
            raise MediaError(f"frame size {image.size} differs from the held frame's {self.held[0].image.size}")
        held = (*self.held, _Held(image, float(timestamp)))
        if len(held) < self.frames_per_step:
            self.held = held
            self.stats.pending_frames = len(held)
            return 0
        return self._append_held(held)

    def flush_frames(self) -> int:
        """Append the held frames now (an odd last frame of a pair alone: it fills both slots of its step);
        returns tokens appended."""
        return self._append_held(self.held) if self.held else 0

    def _append_held(self, held: tuple[_Held, ...]) -> int:
        """Held frames as one prefill: a temporal step per pair (per frame unpaired), each placed by its first
        frame's timestamp, the tower run once over all the steps."""
        per = 2 if self.pair_frames else 1
        groups = [held[i : i + per] for i in range(0, len(held), per)]
        times = [g[0].timestamp for g in groups]
        steps = [self.processor.encode_frame_pair([h.image for h in g], t) for g, t in zip(groups, times)]
        _, gh, gw = (int(x) for x in steps[0].grid_thw[0])
        vision = VisionInput(
            "video",
            torch.cat([v.pixel_values for v in steps]),
            torch.tensor([[len(steps), gh, gw]]),
            second_per_grid=None,
            timestamps=times,
            live=True,
        )
        return self._append_live(vision, times, held[-1].timestamp, len(held))

    def _check_time(self, timestamp: float) -> None:
        last = self.held[-1].timestamp if self.held else None
        if last is None and self.segment is not None:
            last = self.segment.last_time
        if last is not None and timestamp < last:
            raise MediaError(f"frame timestamp {timestamp:.3f} s is earlier than the previous one ({last:.3f} s)")

    def _append_live(self, vision: VisionInput, times: list[float], last_time: float, frames: int) -> int:
        """Temporal steps of `frames` live frames in one prefill, step i placed at `times[i]` (its first frame's
        timestamp), the last frame at `last_time`, continuing the open segment (or opening one)."""
        seg = self.segment
        c = self.model.config
        opening = seg is None
        ids = ([c.vision_start_token_id] if opening else []) + [c.video_token_id] * vision.num_tokens
        start = int(self.state.next_position[0])
        block_start = start + 1 if opening else seg.start
        first_time = times[0] if opening else seg.first_time
        _, gh, gw = (int(x) for x in vision.grid_thw[0])
        m = c.vision.spatial_merge_size
        lh, lw = gh // m, gw // m
        rows = torch.arange(lh).view(-1, 1).expand(lh, lw).reshape(-1) + block_start
        cols = torch.arange(lw).view(1, -1).expand(lh, lw).reshape(-1) + block_start
        parts = [torch.full((3, 1), start)] if opening else []
        last_t = None if opening else seg.last_t
        for timestamp in times:
            t_index = block_start + live_frame_offset(timestamp, first_time, c.vision.tokens_per_second)
            if last_t is not None:
                t_index = max(t_index, last_t)
            parts.append(torch.stack([torch.full_like(rows, t_index), rows, cols]))
            last_t = t_index
        frame_pos = torch.cat(parts, dim=1)
        next_position = max(start, int(frame_pos.max()) + 1)

        def run():
            self._prefill(
                ids, video=vision, position_ids=frame_pos.unsqueeze(1), next_position=torch.tensor([next_position])
            )

        n = self._timed(run)
        self.segment = _Segment(block_start, first_time, last_time, last_t)
        self.held, self.stats.pending_frames = (), 0
        self.stats.frames += frames
        now = time.perf_counter()
        self.stats._frame_times = (self.stats._frame_times + [now] * frames)[-30:]
        times_ = self.stats._frame_times
        if len(times_) > 1 and times_[-1] > times_[0]:
            self.stats.recent_fps = (len(times_) - 1) / (times_[-1] - times_[0])
        return n

    def append_frames(self, frames: Iterable[tuple[object, float]]) -> int:
        return sum(self.append_frame(f, t) for f, t in frames)

    # -- questions ---------------------------------------------------------------------------------------------------
    def ask_stream(self, question: str, sampling: SamplingParams | None = None) -> Iterator[str]:
        """Answer from a branch of the state, as text pieces; the stream is left bit-identical."""
        sampling = sampling or SamplingParams(max_new_tokens=64)
        fixed = fixed_answer(self.model, self.processor, question, sampling.max_new_tokens)
        if fixed is not None:  # a task model's reply to a question outside its tasks: nothing to compute
            self.stats.questions += 1
            yield from stream_text(fixed, self.processor)
            return
        branch = self.state.clone()
        ids = self._close_segment_ids() + self.question_ids(question)
        logits = prefill(self.model, branch, torch.tensor([ids]), chunk_size=self.chunk_size)
        params = sampling.with_stops(self.model.config.eos_token_ids)
        self.stats.questions += 1
        tokens = TokenGenerator(self.model, branch, logits, params, decode_text=self.processor.decode)
        yield from stream_text(tokens, self.processor)

    def ask(self, question: str, sampling: SamplingParams | None = None) -> str:
        return "".join(self.ask_stream(question, sampling))

    def chat(self, message: str, sampling: SamplingParams | None = None, images=()) -> str:
        """A multi-turn exchange committed to the stream: the question and the answer become part of it."""
        return "".join(self.chat_stream(message, sampling, images))

    def chat_stream(
        self, message: str, sampling: SamplingParams | None = None, images=(), speed: Speed | None = None
    ) -> Iterator[str]:
        """`chat` as text pieces. Closing the iterator before its end (Ctrl-C in `infinitevl chat`) stops the answer
        there: the part generated so far stays in the conversation and the turn ends, as if the answer had been
        that long. `speed`, when given, is filled in as the answer is made."""
        speed = speed if speed is not None else Speed()
        t0 = time.perf_counter()
        for image in images:
            self.append_image(image)
        self.flush_frames()
        ids = self._close_segment_ids() + self.question_ids(message)
        before = self.stats.tokens
        logits = self._prefill(ids)
        self.segment = None
        speed.prompt_tokens = int(self.state.num_tokens[0]) - before
        speed.prefill_seconds = time.perf_counter() - t0
        sampling = sampling or SamplingParams(max_new_tokens=128)
        gen = fixed_answer(self.model, self.processor, message, sampling.max_new_tokens)
        if gen is None:
            params = sampling.with_stops(self.model.config.eos_token_ids)
            gen = TokenGenerator(self.model, self.state, logits, params, decode_text=self.processor.decode)
        try:
            yield from stream_text(timed(gen, speed), self.processor)
        finally:  # commit the answer: its unfed tokens, the end of the turn, and the next user turn
            self._feed_ids(gen.unfed + self.processor.turns.answer_end)
            self.stats.questions += 1
            self._refresh()

    def question_ids(self, text: str) -> list[int]:
        """A user message (plain text) that ends the open user turn and opens the assistant's."""
        return self.processor.tokenize_text(text) + self.processor.turns.question_end

    # -- snapshots ---------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """The state with the open frame segment and the counters (and `extra` metadata) in one file."""
        return self.state.save(path, extra={**self.metadata(), **(extra or {})})

    def metadata(self) -> dict[str, str]:
        """What a saved session keeps besides its state: the open frame segment, the counters, the pairing and
        frames-per-step settings and the held frames (lossless PNGs)."""
        seg = self.segment
        return (
            {
                "segment": "" if seg is None else f"{seg.start},{seg.first_time},{seg.last_time},{seg.last_t}",
                "counters": json.dumps({k: getattr(self.stats, k) for k in COUNTERS}),
            }
            | ({"pair_frames": "1"} if self.pair_frames else {})
            | ({"frames_per_step": str(self.frames_per_step)} if self.frames_per_step != (1 + self.pair_frames) else {})
            | ({"held_frames": json.dumps([h.as_dict() for h in self.held])} if self.held else {})
        )

    def apply_metadata(self, meta: dict[str, str]) -> None:
        """Set the segment and counters from `metadata()` output (e.g. read back from a file)."""
        self.segment = None
        if meta.get("segment"):
            s, ft, lt, t = meta["segment"].split(",")
            self.segment = _Segment(int(s), float(ft), float(lt), int(t))
        for k, v in json.loads(meta.get("counters", "{}")).items():
            if k in COUNTERS:
                setattr(self.stats, k, v)
        if meta.get("pair_frames"):  # a paired stream stays paired (an unpaired file keeps the session's setting)
            self.pair_frames = True
        if meta.get("frames_per_step"):  # and its step keeps its frames
            self.frames_per_step = frames_per_step_for(int(meta["frames_per_step"]), self.pair_frames)
        self.held = held_frames(meta)
        self.stats.pending_frames = len(self.held)
        self._refresh()

    @classmethod
    def restore(cls, path: str | Path, model, processor: Processor, **kwargs) -> StreamSession:
        state = InfiniteVLState.load(path, model.config, device=model.device)
        state = _to_dtype(state, model.dtype)
        session = cls(model, processor, state=state, **kwargs)
        session.apply_metadata(InfiniteVLState.read_metadata(path))
        return session

    # -- internals -----------------------------------------------------------------------------------------------------
    def _close_segment_ids(self) -> list[int]:
        return [self.model.config.vision_end_token_id] if self.segment is not None else []

    def _append_block(self, vision: VisionInput) -> int:
        self.flush_frames()  # a held live frame comes before the block
        c = self.model.config
        pad = c.image_token_id if vision.kind == "image" else c.video_token_id
        ids = (
            self._close_segment_ids() + [c.vision_start_token_id] + [pad] * vision.num_tokens + [c.vision_end_token_id]
        )
        return self._timed(
            lambda: self._prefill(
                ids, image=vision if vision.kind == "image" else None, video=vision if vision.kind == "video" else None
            ),
            closes_segment=True,
        )

    def _timed(self, fn, closes_segment: bool = False) -> int:
        before = int(self.state.num_tokens[0])
        t0 = time.perf_counter()
        fn()
        self.stats.ingest_seconds += time.perf_counter() - t0
        if closes_segment:
            self.segment = None
        self._refresh()
        return int(self.state.num_tokens[0]) - before

    def _prefill(
        self,
        ids: list[int],
        image: VisionInput | None = None,
        video: VisionInput | None = None,
        position_ids=None,
        next_position=None,
    ) -> torch.Tensor:
        kwargs = {}
        if image is not None:
            kwargs.update(pixel_values=image.pixel_values, image_grid_thw=image.grid_thw)
        if video is not None:
            kwargs.update(
                pixel_values_videos=video.pixel_values,
                video_grid_thw=video.grid_thw,
                second_per_grid_ts=[video.second_per_grid or 1.0],
            )
        return prefill(
            self.model,
            self.state,
            torch.tensor([ids]),
            chunk_size=self.chunk_size,
            position_ids=position_ids,
            next_position=next_position,
            **kwargs,
        )

    def _feed_ids(self, ids: list[int]) -> None:
        if ids:
            self._prefill(ids)

    def _refresh(self) -> None:
        self.stats.tokens = int(self.state.num_tokens[0])
        self.stats.state_bytes = self.state.nbytes


def _to_dtype(state: InfiniteVLState, dtype: torch.dtype) -> InfiniteVLState:
    """Snapshots keep their dtype; a model in another dtype gets the non-memory tensors converted."""
    for layer in state.layers:
        for name, t in layer.tensors().items():
            if t.is_floating_point() and name != "memory" and t.dtype != dtype:
                setattr(layer, name, t.to(dtype))
    return state
