"""Request and response bodies: the OpenAI chat shapes, and our streaming-session extension.

These models are what FastAPI validates and publishes in `/openapi.json`. Parameters that OpenAI defines but this
server cannot honour (n > 1, logprobs, tools, penalties) are accepted at their neutral values and refused otherwise,
so a client never silently gets something it did not ask for. `top_k` and `repetition_penalty` are accepted as
vLLM does. Unknown fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from ..engine.session import DEFAULT_SYSTEM

# -- requests: chat ------------------------------------------------------------------------------------------------


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,..., a file under the media root, or http(s) when enabled")
    detail: str | None = None


class VideoURL(BaseModel):
    url: str = Field(description="data:video/...;base64,..., a file under the media root, or http(s) when enabled")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(BaseModel):
    """A video, in the form vLLM accepts."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Sampling parameters shared by chat completions and session questions."""

    max_tokens: int | None = Field(None, ge=1, description="completion budget (default: the server's)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 (the default) is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension (as vLLM): 0 disables")
    repetition_penalty: float | None = Field(None, gt=0, description="extension (as vLLM): 1 disables")
    stop: str | list[str] | None = Field(None, description="up to 8 stop strings")
    seed: int | None = None
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop takes up to 8 non-empty strings")
        return self


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _check_unsupported(self):
        if self.n != 1:
            raise ValueError("n must be 1 (one choice per request)")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use repetition_penalty)")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        return self


# -- responses: chat ---------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "infinitevl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    untrained: bool
    queued: int
    active: int
    max_batch: int
    sessions: int
    sessions_loaded: int
    decode_steps: int  # batched decode steps run so far
    decoded_tokens: int  # tokens produced by those steps
    completed: int
    cancelled: int
    rejected: int  # requests refused because the queue was full
    precision: dict  # dtype (and how it was chosen), quantization, kernel, weight bytes


# -- sessions ----------------------------------------------------------------------------------------------------


class SessionCreate(BaseModel):
    system_prompt: str | None = Field(DEFAULT_SYSTEM, description="null or empty: no system turn")
    frame_size: int | None = Field(None, description="side of live frames in pixels, a multiple of 28")

    @model_validator(mode="after")
    def _check_size(self):
        if self.frame_size is not None and (self.frame_size % 28 or not 56 <= self.frame_size <= 1344):
            raise ValueError(f"frame_size must be a multiple of 28 in [56, 1344] (got {self.frame_size})")
        return self


class Frame(BaseModel):
    image_url: ImageURL
    timestamp: float = Field(ge=0, description="seconds; non-decreasing within the stream")


class FramesRequest(BaseModel):
    """Either `frames` (images with timestamps) or a video chunk (`video_url`), appended as live frames."""

    frames: list[Frame] | None = Field(None, min_length=1)
    video_url: VideoURL | None = None
    fps: float | None = Field(None, gt=0, description="video chunks: frames sampled per second")
    timestamp_offset: float | None = Field(
        None, ge=0, description="video chunks: time of the chunk's first frame (default: after the last frame)"
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.frames is None) == (self.video_url is None):
            raise ValueError("give either frames or video_url")
        return self


class TextAppend(BaseModel):
    text: str = Field(min_length=1)


class AskRequest(SamplingFields):
    question: str = Field(min_length=1)


class RestoreRequest(BaseModel):
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
    loaded: bool = Field(description="in memory (false: on disk until its next use)")
    system_prompt: str | None
    frame_size: int
    tokens: int
    frames: int
    images: int
    videos: int
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
    session: SessionInfo


class Deleted(BaseModel):
    id: str
    object: Literal["session"] = "session"
    deleted: bool = True
