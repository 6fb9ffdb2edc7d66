"""Request and response bodies of the streaming-session routes (`/v1/sessions...`), our extension of the API.

Timestamps are finite seconds in [0, MAX_TIMESTAMP]: a stream's temporal positions grow with its timestamps, so an
absurd one (1e300) would leave the session refusing every realistic frame after it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from ..engine.session import DEFAULT_SYSTEM
from .schemas import Body, ImageURL, SamplingFields, Unsupported, VideoURL

MAX_TIMESTAMP = 1e7  # seconds (about 115 days of stream time)


def check_frame_size(size: int | None) -> None:
    if size is not None and (size % 28 or not 56 <= size <= 1344):
        raise ValueError(f"frame_size must be a multiple of 28 in [56, 1344] (got {size})")


class SessionCreate(Body):
    system_prompt: str | None = Field(DEFAULT_SYSTEM, description="null or empty: no system turn")
    frame_size: int | None = Field(None, description="side of live frames in pixels, a multiple of 28")
    pair_frames: bool = Field(
        False,
        description="encode live frames two per temporal step, as a video file's frames (half the tokens and "
        "vision work per frame); the first frame of a pair waits (pending_frames) until the second comes",
    )
    frames_per_step: int | None = Field(
        None,
        ge=1,
        le=32,
        description="live frames gathered into one prefill (default: one temporal step, 2 with pair_frames; even "
        "with pair_frames): the tower runs once and the decoder's weights are read once per step, so small frames "
        "cost less each, at the cost of latency (held frames wait in pending_frames)",
    )
    realtime: bool = Field(
        False,
        description="keep up with a live source: a frame upload that arrives while an earlier one still waits for "
        "this session replaces it (the replaced request gets frames_appended 0; counted in frames_dropped)",
    )

    @model_validator(mode="after")
    def _check_size(self):
        check_frame_size(self.frame_size)
        if self.pair_frames and self.frames_per_step is not None and self.frames_per_step % 2:
            raise ValueError(f"frames_per_step must be even with pair_frames (got {self.frames_per_step})")
        return self


class Frame(Body):
    image_url: ImageURL
    timestamp: float = Field(ge=0, le=MAX_TIMESTAMP, description="seconds; non-decreasing within the stream")


class FramesRequest(Body):
    """Either `frames` (images with timestamps) or a video chunk (`video_url`), appended as live frames."""

    frames: list[Frame] | None = Field(None, min_length=1)
    video_url: VideoURL | None = None
    fps: float | None = Field(None, gt=0, le=120, description="video chunks: frames sampled per second")
    timestamp_offset: float | None = Field(
        None,
        ge=0,
        le=MAX_TIMESTAMP,
        description="video chunks: time of the chunk's first frame (default: after the last frame)",
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.frames is None) == (self.video_url is None):
            raise ValueError("give either frames or video_url")
        return self


class TextAppend(Body):
    text: str = Field(min_length=1)


class AskRequest(SamplingFields):
    question: str = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the most likely tokens")

    def unsupported(self) -> Unsupported | None:
        if (problem := super().unsupported()) is not None:
            return problem
        if self.top_logprobs and not self.logprobs:
            return Unsupported("top_logprobs", "top_logprobs needs logprobs: true")
        return None


class RestoreRequest(Body):
    snapshot_id: str


class SnapshotInfo(BaseModel):
    id: str
    object: Literal["session.snapshot"] = "session.snapshot"
    session_id: str
    created: float
    tokens: int
    frames: int


class SessionInfo(BaseModel):
    id: str
    object: Literal["session"] = "session"
    created: float
    last_used: float
    status: Literal["ok", "damaged"] = Field(description="damaged: its saved state failed its checksum")
    damage: str | None = Field(None, description="what is damaged (restore a snapshot or delete the session)")
    loaded: bool = Field(description="in memory (false: on disk until its next use)")
    system_prompt: str | None
    frame_size: int
    pair_frames: bool = False
    frames_per_step: int = Field(1, description="live frames per prefill")
    realtime: bool = False
    tokens: int
    frames: int
    pending_frames: int = Field(
        0, description="frames held for their step (pair_frames, frames_per_step), not yet in the state"
    )
    frames_dropped: int = Field(0, description="realtime: frames replaced by newer ones before their turn")
    images: int = Field(description="frames given as images")
    videos: int = Field(description="video chunks appended")
    questions: int
    state_bytes: int
    fps: float = Field(description="frames per second over the last appended frames")
    tokens_per_second: float
    ingest_seconds: float
    snapshots: list[SnapshotInfo]


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionInfo]


class AppendResult(BaseModel):
    session_id: str
    frames_appended: int
    tokens_appended: int
    frames_dropped: int = Field(0, description="realtime: this request's frames, replaced by a newer upload")
    session: SessionInfo


class Deleted(BaseModel):
    id: str
    object: Literal["session"] = "session"
    deleted: bool = True
