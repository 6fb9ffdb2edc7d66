"""Request and response bodies of the OpenAI-compatible routes (chat completions, completions, models) and of the
server's own routes (health, version, errors). The streaming-session shapes are in `session_schemas.py`.

These models are what FastAPI validates and publishes in `/openapi.json`. Numbers must be finite (`Infinity` and
`NaN` are refused) and within the ranges the engine honours. Parameters that OpenAI defines but this server cannot
honour (tools, a JSON response format, `suffix`, vLLM's guided decoding, audio) are refused with the parameter
named, so a client never silently gets something it did not ask for; so is any unknown top-level field (only `user`
is accepted and ignored). `top_k`, `min_p`, `repetition_penalty`, `min_tokens` and `ignore_eos` are honoured as vLLM
does. Stop strings are bounded (MAX_STOPS of up to MAX_STOP_CHARS characters).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_CHOICES = 16
IGNORED = frozenset({"user"})  # top-level fields accepted and ignored (OpenAI's end-user id)


class Body(BaseModel):
    """Every request body: finite numbers only, unknown fields ignored."""

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")


class Unsupported(ValueError):
    """A parameter this server does not honour; `param` names it in the error."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# -- requests: chat ------------------------------------------------------------------------------------------------


class ImageURL(Body):
    url: str = Field(description="data:image/...;base64,..., a file under the media root, or http(s) when enabled")
    detail: str | None = None


class VideoURL(Body):
    url: str = Field(description="data:video/...;base64,..., a file under the media root, or http(s) when enabled")


class TextPart(Body):
    type: Literal["text"]
    text: str


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(Body):
    """A video, in the form vLLM accepts."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(Body):
    include_usage: bool = False


class ResponseFormat(Body):
    type: str


class SamplingFields(Body):
    """Sampling parameters shared by chat completions, completions and session questions. Unknown fields are kept
    (`model_extra`) so that `unsupported()` can refuse them by name."""

    model_config = ConfigDict(allow_inf_nan=False, extra="allow")

    max_tokens: int | None = Field(None, ge=1, description="completion budget (default: the server's)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 (the default) is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension (as vLLM): 0 disables")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="extension (as vLLM): 1 disables")
    min_p: float | None = Field(
        None, ge=0, le=1, description="extension (as vLLM): drop tokens below min_p x the top token's probability"
    )
    min_tokens: int = Field(0, ge=0, description="extension (as vLLM): no stop token or string before this many")
    ignore_eos: bool = Field(False, description="extension (as vLLM): the end-of-turn token does not stop the answer")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} stop strings")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices sampled from one prefill (a branch each)")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings of up to {MAX_STOP_CHARS} characters")
        return self

    def unsupported(self) -> Unsupported | None:
        """The first parameter given that this server cannot honour (checked by the routes, to name it)."""
        for name in self.model_extra or {}:
            if name not in IGNORED:
                return Unsupported(name[:64], f"the parameter {name[:64]!r} is not supported by this server")
        budget = self.max_completion_tokens or self.max_tokens
        if budget is not None and self.min_tokens > budget:
            return Unsupported("min_tokens", f"min_tokens {self.min_tokens} is more than max_tokens {budget}")
        return None


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the most likely tokens")
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    def unsupported(self) -> Unsupported | None:
        if (problem := super().unsupported()) is not None:
            return problem
        if self.top_logprobs and not self.logprobs:
            return Unsupported("top_logprobs", "top_logprobs needs logprobs: true")
        if self.response_format is not None and self.response_format.type != "text":
            return Unsupported(
                "response_format", f"response_format {self.response_format.type!r} is not supported (only 'text')"
            )
        for name in ("tools", "functions"):
            if getattr(self, name):
                return Unsupported(name, f"{name} are not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                return Unsupported(name, f"{name} is not supported")
        return None


class CompletionRequest(SamplingFields):
    """The legacy completions API, which evaluation harnesses use to score text: `echo` with `logprobs` returns the
    log-probability of every prompt token, and `max_tokens` may be 0."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of such lists"
    )
    max_tokens: int | None = Field(16, ge=0, description="completion budget (0: score the prompt only)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="the most likely tokens per position, with their own")
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def unsupported(self) -> Unsupported | None:
        if (problem := super().unsupported()) is not None:
            return problem
        if self.suffix:
            return Unsupported("suffix", "suffix is not supported")
        if self.best_of not in (None, self.n):
            return Unsupported("best_of", "best_of is not supported (it must equal n)")
        if isinstance(self.prompt, list) and not self.prompt:
            return Unsupported("prompt", "prompt is an empty list")
        return None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


# -- responses -------------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


NOTE = Field(None, description="what the served model can and cannot do, when it is not a general model")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    model_note: str | None = NOTE


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy shape: per token its text, log-probability (None for the first prompt token), the most likely
    tokens as {text: logprob}, and the character offset of the token in the returned text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    model_note: str | None = NOTE


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "infinitevl"
    max_model_len: int | None = Field(None, description="tokens per request (prompt and completion)")
    model_note: str | None = NOTE


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
    status: Literal["ok", "stopping", "dead"] = Field(
        "ok", description="dead: the model's worker thread has stopped (HTTP 503): restart the server"
    )
    model: str
    model_kind: Literal["general", "task", "untrained"] = Field(
        description="general: a model for any prompt; task: trained for one task only; untrained: random weights"
    )
    note: str | None = Field(None, description="for task and untrained models: what it can do, how to serve another")
    queued: int
    active: int
    max_batch: int
    sessions: int
    sessions_loaded: int
    sessions_damaged: int
    decode_steps: int  # batched decode steps run so far
    decoded_tokens: int  # tokens produced by those steps
    prefill_chunks: int  # prefill chunks run between decode steps
    completed: int
    cancelled: int
    rejected: int  # requests refused because the queue was full
    precision: dict  # dtype (and how it was chosen), quantization, kernel, weight bytes, int8 products


class Version(BaseModel):
    version: str
    model: str
    model_kind: str
    torch: str
    durability: str
