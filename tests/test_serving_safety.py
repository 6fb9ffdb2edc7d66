"""Bad requests get the right 4xx in the OpenAI error shape with a clear message, and leave existing sessions
bit-identical; the API key, the media root (with symlinks), remote fetch limits and overload (429) are enforced."""

from __future__ import annotations

import base64
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_serving import DATA, data_url, varied_model

from infinitevl.engine.runtime import InfiniteVL
from infinitevl.serving import BackgroundServer, ServerConfig, create_app

pytestmark = pytest.mark.serial  # timings: run alone, not beside other tests

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return varied_model(tmp_path_factory.mktemp("safety") / "tiny")


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    """A media root with good files, and symlinks that lead out of it."""
    root = tmp_path_factory.mktemp("media")
    shutil.copy(DATA / "1.jpg", root / "ok.jpg")
    shutil.copy(DATA / "1.mp4", root / "long.mp4")  # 9.7 s
    Image.new("RGB", (600, 600), "red").save(root / "big.png")  # 360,000 pixels
    Image.new("RGB", (2, 500), "blue").save(root / "thin.png")  # too thin to resize for the vision tower
    (root / "out.jpg").symlink_to(DATA / "2.jpg")
    (root / "outdir").symlink_to(DATA, target_is_directory=True)
    (root / "sub").mkdir()
    (root / "sub" / "in.jpg").symlink_to(root / "ok.jpg")  # a link that stays inside is fine
    return root


@pytest.fixture(scope="module")
def server(model_dir, media_root, tmp_path_factory):
    config = ServerConfig(
        model_name="tiny",
        api_key=KEY,
        media_root=media_root,
        state_dir=tmp_path_factory.mktemp("state"),
        allow_remote_media=True,  # but only from public addresses
        max_body_bytes=256 * 1024,
        max_image_pixels=250_000,  # 640x360 video frames pass
        max_video_seconds=5.0,
        max_request_tokens=400,
        max_snapshots=100,
    )
    with BackgroundServer(create_app(InfiniteVL.load(model_dir), config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def session(http) -> str:
    """A session with two frames, which no bad request may change."""
    sid = http.post("/v1/sessions", json={"frame_size": 224}).json()["id"]
    frames = [
        {"image_url": {"url": "ok.jpg"}, "timestamp": 0.0},
        {"image_url": {"url": "sub/in.jpg"}, "timestamp": 0.5},
    ]
    assert http.post(f"/v1/sessions/{sid}/frames", json={"frames": frames}).status_code == 200
    return sid


def session_state(http: httpx.Client, server, sid: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The session's stats and its state's tensors (through a snapshot written to the state directory)."""
    snap = http.post(f"/v1/sessions/{sid}/snapshot").json()
    stats = http.get(f"/v1/sessions/{sid}").json()
    path = server.app.state.ctx.config.state_dir / "snapshots" / sid / f"{snap['id']}.safetensors"
    return {k: stats[k] for k in ("tokens", "frames", "images", "state_bytes")}, load_file(path)


def assert_unchanged(before, after) -> None:
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def check_error(r: httpx.Response, status: int, words: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    return error


TRUNCATED = "data:image/jpeg;base64," + base64.b64encode((DATA / "1.jpg").read_bytes()[:3000]).decode()
MEDIA_CASES = [  # (url, status, words in the message)
    ("data:image/jpeg;base64,/9j/4AAQ$$not-base64", 400, "bad base64"),
    (TRUNCATED, 400, "cannot decode image"),
    ("data:image/jpeg,raw", 400, "must be base64"),
    ("../ok.jpg", 403, "contains '..'"),
    ("sub/../../etc/passwd", 403, "contains '..'"),
    (str(DATA / "2.jpg"), 403, "outside the media root"),
    ("out.jpg", 403, "outside the media root"),  # a symlink to a file outside
    ("outdir/3.jpg", 403, "outside the media root"),  # a symlinked folder
    ("file:///etc/passwd", 403, "outside the media root"),
    ("missing.jpg", 400, "no such file"),
    ("big.png", 400, "exceeds the limit of 250000 pixels"),
    ("http://127.0.0.1:9/x.jpg", 403, "non-public address"),
    ("ftp://example.com/x.jpg", 400, "unsupported URL scheme"),
]


@pytest.mark.parametrize("url,status,words", MEDIA_CASES)
def test_bad_media_is_refused_and_changes_nothing(http, server, session, url, status, words):
    before = session_state(http, server, session)
    chat = {
        "model": "tiny",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    }
    check_error(http.post("/v1/chat/completions", json=chat), status, words)
    frames = {
        "frames": [{"image_url": {"url": "ok.jpg"}, "timestamp": 9.0}, {"image_url": {"url": url}, "timestamp": 10}]
    }
    check_error(http.post(f"/v1/sessions/{session}/frames", json=frames), status, words)
    assert_unchanged(before, session_state(http, server, session))


def test_malformed_bodies_and_limits(http, server, session):
    before = session_state(http, server, session)
    raw = {"Content-Type": "application/json"}
    error = check_error(
        http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=raw),
        400,
        "malformed JSON",
    )
    assert error["type"] == "invalid_request_error"
    check_error(http.post(f"/v1/sessions/{session}/ask", content=b"{oops", headers=raw), 400, "malformed JSON")
    check_error(http.post(f"/v1/sessions/{session}/frames", content=b"[1, 2]", headers=raw), 400, "JSON object")
    huge = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 300_000}]}
    check_error(http.post("/v1/chat/completions", json=huge), 413, "exceeds this server's limit of 262144 bytes")
    check_error(
        http.post(
            f"/v1/sessions/{session}/upload?timestamp=1", content=b"\0" * 300_000, headers={"Content-Type": "image/png"}
        ),
        413,
        "limit",
    )
    frames = {"video_url": {"url": "long.mp4"}}
    check_error(http.post(f"/v1/sessions/{session}/frames", json=frames), 400, "exceeds the limit of 5 s")
    long_prompt = {"model": "tiny", "messages": [{"role": "user", "content": "y" * 500}]}
    error = check_error(http.post("/v1/chat/completions", json=long_prompt), 400, "allows 400 tokens per request")
    assert error["code"] == "context_length_exceeded"
    check_error(
        http.post(f"/v1/sessions/{session}/ask", json={"question": "Hi", "max_tokens": 1000}), 400, "allows 400 tokens"
    )
    bad = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}
    check_error(http.post("/v1/chat/completions", json=bad), 400, "temperature")
    error = check_error(http.post("/v1/chat/completions", json={**bad, "temperature": 0, "n": 9}), 400, "n is 9")
    assert error["param"] == "n"
    check_error(
        http.post(f"/v1/sessions/{session}/upload", content=b"abc", headers={"Content-Type": "text/plain"}),
        415,
        "send image/* or video/*",
    )
    thin = [{"type": "image_url", "image_url": {"url": "thin.png"}}]
    check_error(
        http.post(
            "/v1/chat/completions", json={**bad, "temperature": 0, "messages": [{"role": "user", "content": thin}]}
        ),
        400,
        "aspect ratio of 2x500 exceeds 200",
    )
    check_error(http.post(f"/v1/sessions/{session}/restore", json={"snapshot_id": "nope"}), 404, "no snapshot")
    check_error(http.get("/v1/sessions/sess_nope"), 404, "no session")
    check_error(http.get("/v1/nowhere"), 404, "no route")
    assert_unchanged(before, session_state(http, server, session))


def test_api_key(server, http, session):
    before = session_state(http, server, session)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        wrong.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    frames = {"frames": [{"image_url": {"url": "ok.jpg"}, "timestamp": 20.0}]}
    r = httpx.post(f"{server.url}/v1/sessions/{session}/frames", json=frames)
    error = check_error(r, 401, "missing API key")
    assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    check_error(
        httpx.delete(f"{server.url}/v1/sessions/{session}", headers={"Authorization": "Basic eDp5"}),
        401,
        "must be 'Bearer",
    )
    assert httpx.get(server.url + "/health").status_code == 200  # open, for load balancers
    right = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    photo = [{"type": "image_url", "image_url": {"url": data_url(DATA / "1.jpg", "image/jpeg")}}]
    reply = right.chat.completions.create(model="tiny", messages=[{"role": "user", "content": photo}], max_tokens=3)
    assert reply.usage.completion_tokens >= 1
    assert_unchanged(before, session_state(http, server, session))


class _Files(SimpleHTTPRequestHandler):
    """Serves a folder; /slow drips bytes for longer than the server's time limit."""

    def do_GET(self):
        if self.path != "/slow":
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(10):
                self.wfile.write(b"\0" * 100)
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass  # the server gave up, as it should

    def log_message(self, *args):
        pass


def test_remote_media_within_size_and_time_limits(model_dir):
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Files, directory=str(DATA)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    config = ServerConfig(
        model_name="tiny",
        allow_remote_media=True,
        remote_allow_private=True,
        remote_max_bytes=15_000,
        remote_timeout=1.0,
    )
    try:
        with BackgroundServer(create_app(InfiniteVL.load(model_dir), config)) as srv, httpx.Client(timeout=60) as c:

            def chat(url: str) -> httpx.Response:
                content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Who?"}]
                body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 3}
                return c.post(srv.url + "/v1/chat/completions", json=body)

            assert chat(base + "/1.jpg").status_code == 200  # 12,324 bytes
            check_error(chat(base + "/2.jpg"), 400, "exceeds the limit of 15000 bytes")  # 22,681 bytes
            check_error(chat(base + "/missing.jpg"), 400, "gave HTTP 404")
            t0 = time.monotonic()
            check_error(chat(base + "/slow"), 400, "took longer than 1 s")
            assert time.monotonic() - t0 < 2.5
    finally:
        files.shutdown()


def test_overload_gets_429_and_the_server_stays_healthy(model_dir):
    config = ServerConfig(model_name="tiny", max_batch=1, max_queue=2)
    with BackgroundServer(create_app(InfiniteVL.load(model_dir), config)) as srv, httpx.Client(timeout=60) as c:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Count."}],
            "max_tokens": 150,
            "logit_bias": {"381": -100},
        }
        with ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(lambda _: c.post(srv.url + "/v1/chat/completions", json=body), range(10)))
        statuses = [r.status_code for r in replies]
        assert set(statuses) == {200, 429} and statuses.count(200) >= 3, statuses  # one running, two waiting
        rejected = [r for r in replies if r.status_code == 429]
        for r in rejected:
            assert check_error(r, 429, "the server is busy")["code"] == "queue_full" and r.headers["retry-after"]
        assert all(r.json()["usage"]["completion_tokens"] == 150 for r in replies if r.status_code == 200)
        h = c.get(srv.url + "/health").json()
        assert h["status"] == "ok" and h["rejected"] == len(rejected) and h["active"] == h["queued"] == 0
        assert c.post(srv.url + "/v1/chat/completions", json=body).status_code == 200  # and it still serves
