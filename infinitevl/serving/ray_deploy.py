"""The server on Ray Serve: `create_app` in N replicas behind Ray's HTTP proxy, each session's requests routed to one
replica by its id, sessions moving between replicas through the shared state directory.

- Each replica is the whole app of `infinitevl serve` (routes, schemas, scheduler and batching, `/metrics`), served
  through `serve.ingress`; it batches its own streams.
- `SessionRouter` (a Ray request router, run in the proxy) hashes the session id found in the request's path
  (`/v1/sessions/<id>/...`) onto a consistent-hash ring of the live replicas; requests without one (chat, new
  sessions, the page) spread over all. Adding or removing a replica moves only the sessions whose ring owner
  changed.
- Sessions live in `state_dir`, shared by all replicas (`ServerConfig.state_shared`, sessions.py / store.py): a
  replica holds a session's `flock` while the session is in memory, so two writers are impossible; the kernel
  drops the lock when the replica dies, and the replica the ring now names reads the session back with every
  acknowledged change. A replica that is asked for a session another live replica holds asks it to hand it over
  (the holder saves it and lets go: `HandoffWatcher`).
- Not here: what a request does (app.py and the routes). uvicorn's connection limits of `infinitevl serve`
  (header and idle timeouts) are Ray's proxy's own settings here (`RAY_SERVE_HTTP_*`, see docs/scaling.md).

`infinitevl serve --ray` deploys `build(...)` on a local or existing cluster; `serve run` takes the same builder
(`infinitevl.serving.ray_deploy:build`, with its arguments as `key=value` or in a config file).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import socket
import sys
import threading
import time
from pathlib import Path

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

from .config import ServerConfig

log = logging.getLogger("infinitevl.serving")
SESSION_PATH = re.compile(r"^/v1/sessions/(sess_[0-9a-f]{24})(?:/|$)")
ENGINE_KEYS = ("model", "dtype", "device", "chunk_size", "quantize", "group_size", "int8_products")


def session_in_request(args: list) -> str | None:
    """The session id in the path of an HTTP request as the proxy hands it to the router (a pickled
    `StreamingHTTPRequest` holding the ASGI scope), or None."""
    for arg in args:
        if isinstance(arg, bytes):
            try:
                scope = getattr(pickle.loads(arg), "_asgi_scope", None)  # written by Ray's own proxy
            except Exception:
                continue
            if isinstance(scope, dict):
                m = SESSION_PATH.match(scope.get("path", ""))
                return m[1] if m else None
    return None


class SessionRouter(ConsistentHashRouter):
    """Ray Serve's consistent-hash router keyed by the session id in the URL (then by Ray's session header, then
    per request)."""

    def _routing_key(self, pending_request):
        if pending_request is not None:
            sid = session_in_request(pending_request.args)
            if sid is not None:
                return sid
        return super()._routing_key(pending_request)


class HandoffWatcher(threading.Thread):
    """Looks for hand-over requests for the sessions this replica holds (every `interval` s) and has the worker
    thread save and release them."""

    def __init__(self, ctx, interval: float = 0.1):
        super().__init__(name="infinitevl-handoff", daemon=True)
        self.ctx, self.interval, self.stopped = ctx, interval, threading.Event()

    def run(self) -> None:
        folder = self.ctx.sessions.store.root / "sessions"
        while not self.stopped.wait(self.interval):
            if not any(folder.glob("*.handoff")):
                continue
            try:
                released = self.ctx.scheduler.submit_task(self.ctx.sessions.release_requested, internal=True).result()
            except Exception:
                log.exception("handing sessions over failed")
                continue
            if released:
                log.info("handed over to another replica: %s", ", ".join(released))


class MetricsMirror(threading.Thread):
    """Every `interval` s, this replica's Prometheus series (what its `/metrics` serves) as Ray metrics tagged with
    the replica, so that Ray's per-node metrics endpoint (scraped by Prometheus through Ray's service discovery
    file) has every replica's series: the proxy's `/metrics` answers for one replica only."""

    def __init__(self, ctx, replica: str, interval: float = 5.0):
        super().__init__(name="infinitevl-metrics", daemon=True)
        self.ctx, self.replica, self.interval, self.stopped = ctx, replica, interval, threading.Event()
        self.gauges: dict[str, object] = {}

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.mirror()
            except Exception:
                log.exception("mirroring metrics to Ray failed")

    def mirror(self) -> int:
        """Copy every sample once; returns how many."""
        from ray.util.metrics import Gauge

        self.ctx.refresh_metrics()
        n = 0
        for family in self.ctx.metrics.registry.collect():
            for sample in family.samples:
                gauge = self.gauges.get(sample.name)
                if gauge is None:
                    keys = (*sorted(sample.labels), "replica")
                    gauge = self.gauges[sample.name] = Gauge(sample.name, family.documentation or family.name, keys)
                gauge.set(sample.value, tags={**sample.labels, "replica": self.replica})
                n += 1
        return n


@serve.ingress()
class InfiniteVLReplica:
    """One replica: the engine and `create_app`'s app, with a shared state directory."""

    def __init__(self, engine: dict, server: dict):
        import torch

        from ..engine.runtime import InfiniteVL

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        path = engine.get("model")
        kwargs = {k: v for k, v in engine.items() if k != "model" and v is not None}
        self.engine = InfiniteVL.load(path, **kwargs)
        self.config = ServerConfig(**{**server, "state_shared": True})
        context = serve.get_replica_context()
        self.replica = f"{context.replica_id.unique_id}@{socket.gethostname()}:{os.getpid()}"
        self.watcher = self.mirror = None

    def __serve_build_asgi_app__(self):
        from .app import create_app

        app = create_app(self.engine, self.config)
        self.ctx = app.state.ctx
        self.watcher = HandoffWatcher(self.ctx)
        self.watcher.start()
        self.mirror = MetricsMirror(self.ctx, self.replica)
        self.mirror.start()
        replica = self.replica.encode()

        async def with_replica_header(scope, receive, send):
            async def tagged(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"x-replica", replica)]}
                await send(message)

            await app(scope, receive, tagged if scope["type"] == "http" else send)

        with_replica_header.state = app.state
        return with_replica_header

    def check_health(self) -> None:
        """Ray restarts a replica whose model worker has died."""
        if getattr(self, "ctx", None) is not None and not self.ctx.scheduler.alive:
            raise RuntimeError("the model's worker thread has died")

    def __del__(self) -> None:
        for thread in (getattr(self, "watcher", None), getattr(self, "mirror", None)):
            if thread is not None:
                thread.stopped.set()


def build(args: dict) -> serve.Application:
    """The application for `serve run` / `serve.run`. `args`: `state_dir` (required: shared by all replicas),
    `replicas` (or `min_replicas` / `max_replicas` / `target_ongoing_requests` for autoscaling), `cpus_per_replica`,
    `max_ongoing_requests`, the engine's `model` / `dtype` / `device` / `chunk_size` / `quantize` / `group_size` /
    `int8_products`, and any `ServerConfig` field (e.g. `max_batch`, `durability`, `media_root`)."""
    args = dict(args)
    if not args.get("state_dir"):
        raise ValueError("state_dir is required: the replicas share sessions through it (a shared filesystem "
                         "when they run on several machines)")  # fmt: skip
    engine = {k: args.pop(k) for k in ENGINE_KEYS if k in args}
    replicas = int(args.pop("replicas", 1))
    scaling = {k: args.pop(k) for k in ("min_replicas", "max_replicas", "target_ongoing_requests") if k in args}
    cpus = float(args.pop("cpus_per_replica", 1))
    server = {k: v for k, v in args.items() if k not in ("max_ongoing_requests", "num_fallback_replicas")}
    fields = set(ServerConfig.__dataclass_fields__)
    unknown = sorted(set(server) - fields)
    if unknown:
        raise ValueError(f"unknown settings {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    server = {k: _typed(k, v) for k, v in server.items()}  # `serve run ... max_batch=4` gives strings
    config = ServerConfig(**server)  # checked here, before any replica starts
    server["state_dir"] = str(Path(config.state_dir).resolve())
    options = {
        "ray_actor_options": {"num_cpus": cpus},
        # the scheduler queues and batches itself: let Ray send it what its queue holds
        "max_ongoing_requests": int(args.get("max_ongoing_requests", config.max_queue + config.max_batch)),
        "request_router_config": RequestRouterConfig(
            request_router_class=SessionRouter,
            request_router_kwargs={"num_fallback_replicas": int(args.get("num_fallback_replicas", 0))},
        ),
        "graceful_shutdown_timeout_s": config.shutdown_grace + 5,
        "health_check_period_s": 2,
    }
    if scaling:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=int(scaling.get("min_replicas", 1)),
            max_replicas=int(scaling.get("max_replicas", max(replicas, 1))),
            target_ongoing_requests=float(scaling.get("target_ongoing_requests", config.max_batch)),
        )
    else:
        options["num_replicas"] = replicas
    return serve.deployment(InfiniteVLReplica, name="infinitevl").options(**options).bind(engine, server)


def _typed(name: str, value):
    """A `ServerConfig` field's value from a string, as its default's type says (others pass through)."""
    default = ServerConfig.__dataclass_fields__[name].default
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name}: give true or false (got {value!r})")
        return value.lower() in ("true", "1")
    if isinstance(default, tuple):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"{name}: not a {type(default).__name__} ({value!r})") from None


def serve_on_ray(
    engine: dict,
    config: ServerConfig,
    host: str,
    port: int,
    replicas: int,
    address: str | None = None,
    cpus_per_replica: float = 1.0,
    scaling: dict | None = None,
) -> None:
    """`infinitevl serve --ray`: deploy `build` on a cluster (`address`; None: start a local one) with Ray's proxy
    on host:port, and serve until interrupted; then the deployment is removed (replicas save their sessions)."""
    import ray

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    server = {k: str(v) if isinstance(v, Path) else v for k, v in fields.items() if v is not None}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a cluster started here reports to no one
    ray.init(address=address, include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        args = {**engine, **server, "replicas": replicas, "cpus_per_replica": cpus_per_replica, **(scaling or {})}
        serve.run(build(args), name="infinitevl", route_prefix="/")
        print(f"Ray Serve: {replicas if not scaling else 'autoscaled'} replicas of {config.model_name!r} at "
              f"http://{host}:{port} (sessions in {config.state_dir})", file=sys.stderr, flush=True)  # fmt: skip
        while True:
            time.sleep(3600)
    finally:
        serve.delete("infinitevl")
        serve.shutdown()
        ray.shutdown()
