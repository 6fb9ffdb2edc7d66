"""The server's settings: every limit in one dataclass, filled by `infinitevl serve`'s options or by tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DURABILITY = ("journal", "full", "none")


@dataclass
class ServerConfig:
    model_name: str = "infinitevl"  # the id clients pass as `model` and GET /v1/models lists
    api_key: str | None = None  # None: no authentication
    state_dir: Path | None = None  # sessions and snapshots are kept here and come back after a restart
    media_root: Path | None = None  # None: no local paths in requests (data URLs only)
    allow_remote_media: bool = False  # fetch http(s) URLs in requests
    remote_allow_private: bool = False  # let remote URLs reach loopback / private addresses (tests, trusted LANs)
    remote_max_bytes: int = 20 * 2**20
    remote_timeout: float = 10.0  # seconds for a whole download
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 4096 * 4096  # width x height of a decoded image or video frame before resizing
    max_video_seconds: float = 600.0
    max_video_frames: int = 256  # frames sampled from one video (the sampling rate drops to fit)
    video_fps: float = 2.0  # frames per second sampled from videos
    max_request_tokens: int = 32768  # prompt + completion tokens of one chat request; question + answer of an ask
    default_max_tokens: int = 512  # completion budget when a request gives no max_tokens
    max_queue: int = 64  # requests waiting for the model; beyond it: 429
    max_batch: int = 8  # generations decoded together in one batched step
    max_sessions: int = 16
    session_idle_timeout: float | None = 3600.0  # seconds; idle sessions leave memory (saved, or deleted)
    max_snapshots: int = 8  # per session; the oldest is dropped beyond it
    frame_size: int = 448  # default side of session frames (448 -> 256 tokens per frame)
    janitor_interval: float = 30.0  # seconds between idle-session sweeps
    # With a state directory, what an acknowledged session change costs: "journal" appends what changed (the whole
    # recurrent memory, the attention slots written) to the session's log and fsyncs it before answering, folding
    # the log into the state file when it outgrows it; "full" rewrites and fsyncs the whole state file; "none"
    # writes only on create, snapshot, idle unloading and shutdown (a crash loses the changes since).
    durability: str = "journal"
    # Replicas of one deployment (ray_deploy.py) share state_dir: each session is owned by one replica at a time
    # (a lock that dies with its holder) instead of the whole directory by one server.
    state_shared: bool = False
    prefill_chunk: int = 256  # tokens prefilled between two batched decode steps (long prompts and appends)
    shutdown_grace: float = 10.0  # seconds open answers get to finish when the server stops; then they end
    allowed_origins: tuple[str, ...] = ()  # CORS: browser origins allowed to call the API ("*": any); none: off
    # Host names answered without an API key besides loopback ones ("*": any); with a key every Host is answered
    allowed_hosts: tuple[str, ...] = ()
    stream_stall_timeout: float = 30.0  # seconds a streamed answer whose client stopped reading stays paused
    send_buffer_bytes: int = 64 * 1024  # kernel send buffer per connection (bounds what a non-reader is sent)
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers (then closed)
    body_timeout: float = 60.0  # seconds a request's body may take to arrive (then 408)
    max_connections: int = 1024  # open connections; beyond them new requests get 503
    max_prompts: int = 64  # prompts in one completions request (each is a generation in the queue)
    max_messages: int = 1024  # messages in one chat request
    max_content_parts: int = 1024  # text, image and video parts in one chat request, all messages together
    # oneDNN's cache of compiled kernels, one per input shape: bounded so that prompts of many lengths do not grow
    # the process without bound (torch's own default is 1024 entries)
    onednn_cache_capacity: int = 256
    max_logprobs: int = 20  # top_logprobs / logprobs per token

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_queue", "max_batch", "max_sessions", "max_snapshots", "max_body_bytes", "max_request_tokens",
                     "max_connections", "max_prompts", "max_messages", "max_content_parts"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.default_max_tokens < 1:
            problems.append(f"default_max_tokens must be >= 1 (got {self.default_max_tokens})")
        if self.frame_size % 28 or not 56 <= self.frame_size <= 1344:
            problems.append(f"frame_size must be a multiple of 28 in [56, 1344] (got {self.frame_size})")
        if self.video_fps <= 0:
            problems.append(f"video_fps must be > 0 (got {self.video_fps})")
        if self.durability not in DURABILITY:
            problems.append(f"durability must be one of {', '.join(DURABILITY)} (got {self.durability!r})")
        if self.prefill_chunk < 16:
            problems.append(f"prefill_chunk must be >= 16 tokens (got {self.prefill_chunk})")
        for name in ("stream_stall_timeout", "header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0 seconds (got {getattr(self, name)})")
        if self.onednn_cache_capacity < 0:
            problems.append(f"onednn_cache_capacity must be >= 0 (got {self.onednn_cache_capacity})")
        if self.shutdown_grace < 0:
            problems.append(f"shutdown_grace must be >= 0 seconds (got {self.shutdown_grace})")
        if problems:
            raise ValueError("; ".join(problems))
        self.allowed_origins = tuple(self.allowed_origins)
        self.allowed_hosts = tuple(self.allowed_hosts)
        self.state_dir = Path(self.state_dir) if self.state_dir is not None else None
        self.media_root = Path(self.media_root).resolve(strict=True) if self.media_root is not None else None
        if self.session_idle_timeout is not None and self.session_idle_timeout <= 0:
            self.session_idle_timeout = None
