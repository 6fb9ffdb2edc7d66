"""Streaming sessions over HTTP: the real MP4 pushed frame by frame with questions in between (checked against an
in-process `StreamSession`), video chunks, snapshots across a server restart, rollback of failing requests, idle
unloading and the session limit."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from test_serving import DATA, varied_model

from infinitevl.engine.generation import SamplingParams
from infinitevl.engine.runtime import InfiniteVL
from infinitevl.processing.media import iter_video, load_image, read_video
from infinitevl.serving import BackgroundServer, ServerConfig, create_app

pytestmark = pytest.mark.serial  # timings: run alone, not beside other tests

ANSWER = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return varied_model(tmp_path_factory.mktemp("sessions") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir) -> InfiniteVL:
    return InfiniteVL.load(model_dir)


def start(model_dir: Path, **overrides) -> BackgroundServer:
    config = ServerConfig(**{"model_name": "tiny", "media_root": DATA, **overrides})
    return BackgroundServer(create_app(InfiniteVL.load(model_dir), config)).start()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start(model_dir, state_dir=tmp_path_factory.mktemp("state"))
    yield srv
    srv.stop()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def jpeg(frame) -> bytes:
    buf = io.BytesIO()
    frame.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def frame_item(data: bytes, timestamp: float) -> dict:
    return {"image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}, "timestamp": timestamp}


def create(http: httpx.Client, **body) -> str:
    r = http.post("/v1/sessions", json={"frame_size": 224, **body})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def push(http: httpx.Client, sid: str, frames: list[tuple[bytes, float]]) -> dict:
    r = http.post(f"/v1/sessions/{sid}/frames", json={"frames": [frame_item(d, t) for d, t in frames]})
    assert r.status_code == 200, r.text
    return r.json()


def ask(http: httpx.Client, sid: str, question: str, stream: bool = False) -> str:
    r = http.post(f"/v1/sessions/{sid}/ask", json={"question": question, "max_tokens": 12, "stream": stream})
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]["content"]
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


def info(http: httpx.Client, sid: str) -> dict:
    r = http.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


def test_the_mp4_frame_by_frame_with_questions_in_between(http, engine):
    sid = create(http)
    ref = engine.session(frame_size=(224, 224))  # the same stream, in-process
    questions = {4: "What is happening?", 13: "What changed since the start?"}
    sizes, n = set(), 0
    for n, (frame, t) in enumerate(iter_video(DATA / "1.mp4", fps=2.0), start=1):
        data = jpeg(frame)
        if n % 2:  # JSON with a data URL, or the raw bytes
            result = push(http, sid, [(data, t)])
        else:
            r = http.post(
                f"/v1/sessions/{sid}/upload",
                params={"timestamp": t},
                content=data,
                headers={"Content-Type": "image/jpeg"},
            )
            assert r.status_code == 200, r.text
            result = r.json()
        ref.append_frame(load_image(data), t)
        assert result["frames_appended"] == 1 and result["tokens_appended"] >= 64  # 224x224: 64 per frame
        assert result["session"]["tokens"] == ref.stats.tokens and result["session"]["frames"] == n
        sizes.add(result["session"]["state_bytes"])
        if n in questions:
            expected = ref.ask(questions[n], ANSWER)
            assert ask(http, sid, questions[n]) == expected
            assert ask(http, sid, questions[n], stream=True) == expected
            assert info(http, sid)["tokens"] == ref.stats.tokens  # asking left the stream as it was
    final = info(http, sid)
    assert n == 20 and final["frames"] == 20 and final["questions"] == 4
    assert sizes == {final["state_bytes"]} == {ref.stats.state_bytes}  # constant from the first frame to the last
    assert final["fps"] > 0 and final["ingest_seconds"] > 0
    assert ask(http, sid, "Summarize the video.") == ref.ask("Summarize the video.", ANSWER)


def test_video_chunks_continue_the_stream(http, engine):
    sid = create(http)
    ref = engine.session(frame_size=(224, 224))
    r = http.post(f"/v1/sessions/{sid}/frames", json={"video_url": {"url": "3.mp4"}, "fps": 1.0})
    assert r.status_code == 200, r.text
    first = read_video(DATA / "3.mp4", fps=1.0, max_frames=256)
    for f, t in zip(first.frames, first.timestamps):
        ref.append_frame(f, t)
    assert r.json()["frames_appended"] == len(first.frames) == 7
    raw = (DATA / "2.avi").read_bytes()
    r = http.post(
        f"/v1/sessions/{sid}/upload", params={"fps": 1.0}, content=raw, headers={"Content-Type": "video/x-msvideo"}
    )
    assert r.status_code == 200, r.text
    second = read_video(DATA / "2.avi", fps=1.0, max_frames=256)
    start_at = first.timestamps[-1] + 1.0  # by default a chunk starts just after the last frame
    for f, t in zip(second.frames, second.timestamps):
        ref.append_frame(f, start_at + t - second.timestamps[0])
    assert info(http, sid)["tokens"] == ref.stats.tokens
    assert ask(http, sid, "What did you see?") == ref.ask("What did you see?", ANSWER)


def test_snapshot_restart_restore(model_dir, tmp_path):
    state_dir = tmp_path / "state"
    frames = [(jpeg(f), t) for f, t in iter_video(DATA / "3.mp4", fps=2.0, max_frames=8)]
    question = "What is on the screen?"
    srv = start(model_dir, state_dir=state_dir)
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        sid = create(http)
        push(http, sid, frames[:4])
        snap = http.post(f"/v1/sessions/{sid}/snapshot").json()
        at_snapshot = ask(http, sid, question)
        push(http, sid, frames[4:])
        later = ask(http, sid, question)
        tokens_later = info(http, sid)["tokens"]
    srv.stop()  # its shutdown writes the session to the state directory
    assert snap["tokens"] < tokens_later and snap["frames"] == 4
    srv = start(model_dir, state_dir=state_dir)  # a new server with a newly loaded model
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            restored = info(http, sid)
            assert restored["loaded"] is False and restored["tokens"] == tokens_later and restored["frames"] == 8
            assert [s["id"] for s in restored["snapshots"]] == [snap["id"]]
            assert ask(http, sid, question) == later  # the saved stream, exactly
            r = http.post(f"/v1/sessions/{sid}/restore", json={"snapshot_id": snap["id"]})
            assert r.status_code == 200, r.text
            assert r.json()["tokens"] == snap["tokens"] and r.json()["frames"] == 4
            assert ask(http, sid, question) == at_snapshot  # as without the restart
            push(http, sid, frames[4:])  # and the restored stream goes on as the original did
            assert ask(http, sid, question) == later
            assert http.post(f"/v1/sessions/{sid}/restore", json={"snapshot_id": "snap_0"}).status_code == 404
    finally:
        srv.stop()


def test_a_failing_request_leaves_the_session_bit_identical(http, server):
    sid = create(http)
    frames = [(jpeg(f), t) for f, t in iter_video(DATA / "1.mp4", fps=2.0, max_frames=3)]
    push(http, sid, frames[:2])
    before = http.post(f"/v1/sessions/{sid}/snapshot").json()
    stats = info(http, sid)
    # the first frame is fine and appended, the second goes back in time: the whole request must be undone
    r = http.post(
        f"/v1/sessions/{sid}/frames", json={"frames": [frame_item(*frames[2]), frame_item(frames[0][0], 0.0)]}
    )
    assert r.status_code == 400 and "earlier than the previous one" in r.json()["error"]["message"]
    r = http.post(f"/v1/sessions/{sid}/frames", json={"frames": [frame_item(frames[2][0][:500], 5.0)]})
    assert r.status_code == 400 and "cannot decode image" in r.json()["error"]["message"]
    after = http.post(f"/v1/sessions/{sid}/snapshot").json()
    state_dir = server.app.state.ctx.config.state_dir
    a, b = (load_file(state_dir / "snapshots" / sid / f"{s['id']}.safetensors") for s in (before, after))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    now = info(http, sid)
    assert {k: now[k] for k in ("tokens", "frames", "state_bytes")} == {
        k: stats[k] for k in ("tokens", "frames", "state_bytes")
    }
    push(http, sid, frames[2:])  # and the session still works
    assert info(http, sid)["frames"] == 3


def test_idle_sessions_leave_memory_and_come_back(model_dir, tmp_path):
    srv = start(model_dir, state_dir=tmp_path / "state", session_idle_timeout=0.3, janitor_interval=0.05)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            sid = create(http)
            push(http, sid, [(jpeg(f), t) for f, t in iter_video(DATA / "3.mp4", fps=2.0, max_frames=2)])
            answer = ask(http, sid, "What is this?")
            deadline = time.monotonic() + 10
            while info(http, sid)["loaded"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert info(http, sid)["loaded"] is False and http.get("/health").json()["sessions_loaded"] == 0
            # loaded back, unchanged (it may leave memory again at once: the answer takes longer than the 0.3 s
            # idle limit on a busy machine)
            assert ask(http, sid, "What is this?") == answer
    finally:
        srv.stop()


def test_session_limit_deletion_and_media_limits_without_a_state_dir(model_dir):
    srv = start(model_dir, max_sessions=2, media_root=None, max_video_frames=4)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            first, second = create(http), create(http, system_prompt=None)
            r = http.post("/v1/sessions", json={})
            assert r.status_code == 403 and r.json()["error"]["code"] == "session_limit"  # not retried by clients
            assert http.delete(f"/v1/sessions/{first}").json() == {"id": first, "object": "session", "deleted": True}
            assert http.get(f"/v1/sessions/{first}").status_code == 404
            assert [s["id"] for s in http.get("/v1/sessions").json()["data"]] == [second]
            third = create(http)
            r = http.post(
                f"/v1/sessions/{third}/frames", json={"frames": [{"image_url": {"url": "1.jpg"}, "timestamp": 0}]}
            )
            assert r.status_code == 400 and "--media-root" in r.json()["error"]["message"]  # no local files here
            video = "data:video/mp4;base64," + base64.b64encode((DATA / "3.mp4").read_bytes()).decode()
            r = http.post(f"/v1/sessions/{third}/frames", json={"video_url": {"url": video}})
            assert r.status_code == 200 and r.json()["frames_appended"] == 4  # 6 s sampled at 4 / 6 frames a second
    finally:
        srv.stop()


def test_idle_sessions_are_deleted_without_a_state_dir(model_dir):
    srv = start(model_dir, session_idle_timeout=0.3, janitor_interval=0.05)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            sid = create(http)
            deadline = time.monotonic() + 10
            while http.get(f"/v1/sessions/{sid}").status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert http.get(f"/v1/sessions/{sid}").status_code == 404  # idle, and nowhere to keep it
            assert http.get("/health").json()["sessions"] == 0
    finally:
        srv.stop()
