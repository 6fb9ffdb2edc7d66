"""Serving on Ray Serve (infinitevl/serving/ray_deploy.py) with the bundled model, on this machine's CPUs:

- throughput: N sessions appending frames at once (one frame per request, each client sending its next frame when
  the previous one is acknowledged), served by 1 replica and then by 2 (each replica one CPU and one torch thread);
  aggregate frames/s and prompt tokens/s from the first request to the last answer;
- moving a session: SIGKILL of the replica holding a session, then the time until an append to that session is
  acknowledged again through the same URL (Ray notices the death, the ring drops the replica, a live replica reads
  the session back: its state file plus journal, whose sizes are recorded);
- the proxy's cost: the same small requests (GET /health, GET /v1/sessions/{id}) sent one at a time to a plain
  `create_app` server (uvicorn in this process) and to the 1-replica deployment through Ray's HTTP proxy; the
  difference of the medians is what Ray adds per request.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .timing import summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _frames(n: int) -> list[bytes]:
    import io

    from ..defaults import MEDIA
    from ..processing.media import iter_video

    video = MEDIA / "mllm_demo" / "mllm_demo_data" / "1.mp4"
    out = []
    for frame, _ in iter_video(video, fps=4.0, max_frames=n):
        buf = io.BytesIO()
        frame.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def throughput(url: str, sessions: int, frames: list[bytes], size: int) -> dict[str, Any]:
    """`sessions` clients at once, each creating a session and uploading `frames` one request at a time."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as http:
        ids = [http.post("/v1/sessions", json={"frame_size": size}).json()["id"] for _ in range(sessions)]
        for sid in ids:  # warm: each session loaded on its replica, the first frame's kernels built
            r = http.post(f"/v1/sessions/{sid}/upload?timestamp=0", content=frames[0],
                          headers={"Content-Type": "image/jpeg"})  # fmt: skip
            r.raise_for_status()
    tokens = [0] * sessions
    replicas: set[str] = set()
    errors: list[str] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for k, frame in enumerate(frames):
                r = http.post(f"/v1/sessions/{ids[i]}/upload?timestamp={1 + k * 0.25:.3f}", content=frame,
                              headers={"Content-Type": "image/jpeg"})  # fmt: skip
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                tokens[i] += r.json()["tokens_appended"]
                replicas.add(r.headers.get("x-replica", "plain"))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(sessions)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"throughput: {errors[0]}")
    n = sessions * len(frames)
    return {
        "sessions": sessions,
        "frames_per_session": len(frames),
        "frame_size": size,
        "wall_s": wall,
        "frames_per_s": n / wall,
        "tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / wall,
        "replicas_used": len(replicas),
    }


def request_cost(url: str, sid: str, repeats: int) -> dict[str, Any]:
    import httpx

    out = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for name, path in (("health", "/health"), ("session_info", f"/v1/sessions/{sid}")):
            for _ in range(3):
                http.get(path).raise_for_status()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                http.get(path).raise_for_status()
                times.append(time.perf_counter() - t0)
            out[name] = summary(times)
    return out


def move_after_kill(url: str, state_dir: Path, frames: list[bytes], size: int) -> dict[str, Any]:
    """A session with `frames` appended; SIGKILL its replica; seconds until an append to it is acknowledged."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as http:
        sid = http.post("/v1/sessions", json={"frame_size": size}).json()["id"]
        for k, frame in enumerate(frames):
            r = http.post(f"/v1/sessions/{sid}/upload?timestamp={k * 0.25:.3f}", content=frame,
                          headers={"Content-Type": "image/jpeg"})  # fmt: skip
            r.raise_for_status()
        info = http.get(f"/v1/sessions/{sid}").json()
        owner = r.headers["x-replica"]
        folder = state_dir / "sessions"
        state_file = (folder / f"{sid}.safetensors").stat().st_size
        journal = (folder / f"{sid}.journal").stat().st_size if (folder / f"{sid}.journal").exists() else 0
        os.kill(int(owner.rsplit(":", 1)[1]), signal.SIGKILL)
        killed = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            try:
                r = http.post(f"/v1/sessions/{sid}/text", json={"text": "Still there?"})
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - killed > 300:
                raise RuntimeError("the session did not come back within 300 s")
            time.sleep(0.05)
        moved = time.perf_counter() - killed
        back = r.json()["session"]
    return {
        "seconds": moved,
        "attempts": attempts,
        "tokens_before": info["tokens"],
        "tokens_after": back["tokens"],
        "frames_before": info["frames"],
        "frames_after": back["frames"],
        "state_bytes": info["state_bytes"],
        "state_file_bytes": state_file,
        "journal_bytes": journal,
        "from_replica": owner,
        "to_replica": r.headers.get("x-replica"),
    }


def _deploy(replicas: int, state_dir: Path, settings: dict) -> None:
    from ray import serve

    from ..serving.ray_deploy import build

    args = {"state_dir": str(state_dir), "replicas": replicas, "max_batch": settings["max_batch"]}
    serve.run(build(args), name="infinitevl", route_prefix="/")


def run(plan, progress) -> dict[str, Any]:
    import httpx
    import ray
    from ray import serve

    from ..engine.runtime import InfiniteVL
    from ..serving import BackgroundServer, ServerConfig, create_app

    p = plan.ray
    frames = _frames(p["frames"])
    size = p["frame_size"]
    result: dict[str, Any] = {"throughput": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        progress("ray: a plain server in this process (the proxy's reference)")
        engine = InfiniteVL.load()
        with BackgroundServer(create_app(engine, ServerConfig(state_dir=tmp / "plain"))) as srv:
            sid = httpx.post(f"{srv.url}/v1/sessions", json={"frame_size": size}).json()["id"]
            plain = request_cost(srv.url, sid, p["requests"])
        del engine
        port = _free_port()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # the cluster started here reports to no one
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"
            for replicas in (1, 2):
                progress(f"ray: {replicas} replica(s), {p['sessions']} sessions x {p['frames']} frames")
                state_dir = tmp / f"ray{replicas}"
                _deploy(replicas, state_dir, p)
                if replicas == 1:
                    sid = httpx.post(f"{url}/v1/sessions", json={"frame_size": size}).json()["id"]
                    proxied = request_cost(url, sid, p["requests"])
                result["throughput"][str(replicas)] = throughput(url, p["sessions"], frames, size)
                if replicas == 2:
                    progress("ray: SIGKILL of a replica, then the time its session takes to answer again")
                    result["move"] = move_after_kill(url, state_dir, frames, size)
                serve.delete("infinitevl")
        finally:
            serve.shutdown()
            ray.shutdown()
    result["proxy"] = {
        "plain": plain,
        "ray": proxied,
        "added_s": {k: proxied[k]["median_s"] - plain[k]["median_s"] for k in plain},
    }
    return result
