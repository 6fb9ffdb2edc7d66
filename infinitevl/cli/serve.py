"""`infinitevl serve`: an OpenAI-compatible HTTP server with persistent streaming-video sessions.

One model in one process: requests queue fairly, concurrent answers are decoded in one batch, and long prefills
(long prompts, video appends) run in chunks between decode steps. Sessions live in --state-dir (when given): every
acknowledged change is on disk before the reply (--durability) and they come back after a restart or a crash.
Local media paths are refused unless --media-root is given (and then confined to it); remote URLs are fetched only
with --allow-remote-media. The API key may also come from the INFINITEVL_API_KEY environment variable. The OpenAPI schema is served at /openapi.json (browse it at /docs);
/metrics serves Prometheus metrics, /health and /version the server's state."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from .common import CliError, add_model_args, load_engine

HELP = "run the OpenAI-compatible server (chat completions and streaming-video sessions)"


def add_parser(sub) -> None:
    from ..serving.config import ServerConfig

    d = ServerConfig()
    p = sub.add_parser("serve", help=HELP, description=__doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0: a free one)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("INFINITEVL_API_KEY"),
        help="require 'Bearer KEY' (default: $INFINITEVL_API_KEY, else none)",
    )
    g.add_argument("--served-model-name", default=None, help="the model id clients use (default: infinitevl)")
    g.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log lines (each with its request id) from this level up",
    )
    g.add_argument(
        "--allowed-origins",
        default="",
        help="CORS: comma-separated browser origins allowed to call the API ('*': any; default: none)",
    )
    g.add_argument(
        "--allowed-hosts",
        default="",
        help="without --api-key the server answers only loopback Host names (against DNS rebinding): "
        "comma-separated names to answer too ('*': any), to expose it deliberately",
    )
    g.add_argument(
        "--stream-stall-timeout",
        type=float,
        default=d.stream_stall_timeout,
        help="seconds a streamed answer whose client stopped reading stays paused before it is dropped",
    )
    g.add_argument(
        "--shutdown-grace",
        type=float,
        default=d.shutdown_grace,
        help="seconds running answers get to finish on SIGTERM / Ctrl-C before they are ended with an error event",
    )
    g = p.add_argument_group("sessions")
    g.add_argument("--state-dir", default=None, help="keep sessions and snapshots here (restored on restart)")
    g.add_argument(
        "--max-sessions", type=int, default=d.max_sessions, help="sessions kept (in memory or on disk); then 403"
    )
    g.add_argument(
        "--session-idle-timeout",
        type=float,
        default=d.session_idle_timeout,
        help="seconds; an idle session is saved and unloaded (deleted without --state-dir); 0: never",
    )
    g.add_argument("--max-snapshots", type=int, default=d.max_snapshots, help="per session (the oldest goes)")
    g.add_argument(
        "--durability",
        choices=["journal", "full", "none"],
        default=d.durability,
        help="with --state-dir: journal = fsync a record of what each change wrote before replying (the log is "
        "folded into the state file when it outgrows it); full = rewrite and fsync the whole state file each time; "
        "none = write only on create, snapshot, idle unloading and shutdown (a crash loses the rest)",
    )
    g.add_argument(
        "--frame-size", type=int, default=d.frame_size, help="frame side of a session that names none (448: 256 tokens)"
    )
    g = p.add_argument_group("scale-out on Ray Serve (docs/scaling.md)")
    g.add_argument("--ray", action="store_true", help="serve N replicas through Ray's HTTP proxy (needs --state-dir)")
    g.add_argument("--replicas", type=int, default=2, help="with --ray: replicas (each its own model and batch)")
    g.add_argument("--ray-address", default=None, help="with --ray: an existing cluster ('auto'); default: a local one")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --ray: CPUs Ray reserves per replica")
    g.add_argument(
        "--autoscale",
        default=None,
        metavar="MIN:MAX:TARGET",
        help="with --ray: Ray Serve autoscaling between MIN and MAX replicas, aiming at TARGET ongoing requests each",
    )
    g = p.add_argument_group("load")
    g.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before answering 429")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help="generations decoded together (one state each)")
    g.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens, help="prompt + completion")
    g.add_argument(
        "--default-max-tokens",
        type=int,
        default=d.default_max_tokens,
        help="completion budget when a request gives none",
    )
    g.add_argument(
        "--prefill-chunk",
        type=int,
        default=d.prefill_chunk,
        help="tokens prefilled between two batched decode steps (smaller: steadier streams, slower prefill)",
    )
    g = p.add_argument_group("media and limits")
    g.add_argument("--media-root", default=None, help="allow file paths in requests, confined to this folder")
    g.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image and video URLs")
    g.add_argument("--remote-allow-private", action="store_true", help="let remote URLs reach private addresses")
    g.add_argument("--remote-max-bytes", type=int, default=d.remote_max_bytes, help="per remote download")
    g.add_argument("--remote-timeout", type=float, default=d.remote_timeout, help="seconds per download")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="per request body (then 413)")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="before resizing")
    g.add_argument("--max-video-seconds", type=float, default=d.max_video_seconds, help="per video in a request")
    g.add_argument(
        "--max-video-frames",
        type=int,
        default=d.max_video_frames,
        help="frames sampled per video (the rate drops to fit)",
    )
    g.add_argument("--video-fps", type=float, default=d.video_fps, help="frames sampled per second of video")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..serving import ServerConfig, create_app, serve

    if args.media_root is not None and not Path(args.media_root).is_dir():
        raise CliError(f"--media-root {args.media_root}: no such folder")
    name = args.served_model_name or "infinitevl"
    try:
        config = ServerConfig(
            model_name=name,
            api_key=args.api_key or None,
            state_dir=args.state_dir,
            media_root=args.media_root,
            allow_remote_media=args.allow_remote_media,
            remote_allow_private=args.remote_allow_private,
            remote_max_bytes=args.remote_max_bytes,
            remote_timeout=args.remote_timeout,
            max_body_bytes=args.max_body_bytes,
            max_image_pixels=args.max_image_pixels,
            max_video_seconds=args.max_video_seconds,
            max_video_frames=args.max_video_frames,
            video_fps=args.video_fps,
            max_request_tokens=args.max_request_tokens,
            default_max_tokens=args.default_max_tokens,
            max_queue=args.max_queue,
            max_batch=args.max_batch,
            max_sessions=args.max_sessions,
            session_idle_timeout=args.session_idle_timeout,
            max_snapshots=args.max_snapshots,
            frame_size=args.frame_size,
            durability=args.durability,
            prefill_chunk=args.prefill_chunk,
            shutdown_grace=args.shutdown_grace,
            allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
            allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
            stream_stall_timeout=args.stream_stall_timeout,
        )
    except ValueError as err:
        raise CliError(str(err)) from err
    if args.ray:
        return _run_ray(args, config)
    from ..serving.app import bound_onednn_cache

    bound_onednn_cache(config.onednn_cache_capacity)  # before the model first runs
    engine = load_engine(args)
    print(
        f"serving {name!r} on {args.host}:{args.port or '(a free port)'} "
        f"({'API key required' if config.api_key else 'no API key'}"
        f"; sessions {'in ' + str(config.state_dir) if config.state_dir else 'in memory only'}"
        f"; local media {'under ' + str(config.media_root) if config.media_root else 'disabled'})"
        f"\nprecision: {engine.describe_precision()}"
        + ("\nevery answer carries the model's note above (model_note, X-Model-Note)" if engine.note else "")
        + (
            "\nwithout --api-key only loopback Host names are answered: --allowed-hosts NAME,... to serve others "
            "(docs/serving-limits.md)"
            if not config.api_key and not config.allowed_hosts and args.host not in ("127.0.0.1", "localhost", "::1")
            else ""
        ),
        file=sys.stderr,
        flush=True,
    )
    # uvicorn shuts down cleanly on SIGINT / SIGTERM, then re-raises the signal to the handler found before it:
    # make SIGTERM end like Ctrl-C, with exit status 0 after the clean shutdown
    signal.signal(signal.SIGTERM, _interrupt)
    from ..serving.store import StoreBusy

    try:
        app = create_app(engine, config)
    except StoreBusy as err:
        raise CliError(str(err)) from err
    with contextlib.suppress(KeyboardInterrupt):
        serve(app, args.host, args.port, args.log_level)
    print("server stopped", file=sys.stderr)
    return 0


def _run_ray(args, config) -> int:
    if config.state_dir is None:
        raise CliError("--ray needs --state-dir: the replicas share sessions through it (on several machines, a "
                       "folder of a shared filesystem mounted at the same path on each)")  # fmt: skip
    scaling = {}
    if args.autoscale:
        try:
            low, high, target = args.autoscale.split(":")
            scaling = {"min_replicas": int(low), "max_replicas": int(high), "target_ongoing_requests": float(target)}
        except ValueError:
            raise CliError(f"--autoscale {args.autoscale}: give MIN:MAX:TARGET, e.g. 1:4:8") from None
    elif args.replicas < 1:
        raise CliError(f"--replicas must be >= 1 (got {args.replicas})")
    engine = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "chunk_size": args.chunk_size,
        "quantize": None if args.quantize == "none" else args.quantize,
        "group_size": args.group_size,
        "int8_products": args.int8_products,
    }
    try:
        from ..serving.ray_deploy import serve_on_ray
    except ImportError as err:
        raise CliError(f"--ray needs ray[serve] (pip install -r requirements/ci.txt): {err}") from err
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        serve_on_ray(
            engine, config, args.host, args.port, args.replicas, args.ray_address, args.cpus_per_replica, scaling
        )
    print("server stopped", file=sys.stderr)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
