"""The live-session page in a real browser: Debian's headless Chromium, driven by Selenium through Debian's
chromedriver, against a real `infinitevl serve` (the bundled model, an API key, a state directory) on a free port.

The page is used as a person would: the key typed in (wrong first), a real MP4 chosen in the file input and played,
a frame size the server refuses for a moment, a question typed and sent with Enter, a snapshot taken, a folder of
real photos sent while the server is busy, the snapshot restored, the page reloaded, the server restarted, and
Chromium's fake webcam. What the page shows is checked
against the server's API and, where possible, against an independent reference (the video's duration read with
PyAV, the non-streamed answer to the same question). Any console error fails the test; network errors count only
where the step provokes them (401 while the key is wrong, 400 for the refused frames, refused connections while
the server is down). The screenshot in the README (docs/web-page.png) is written here when INFINITEVL_SCREENSHOT=1.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import pytest
from conftest import MEDIA, ROOT, missing_tool
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from infinitevl.config import InfiniteVLConfig
from infinitevl.defaults import BUNDLED
from infinitevl.engine.runtime import InfiniteVL
from infinitevl.serving import BackgroundServer, ServerConfig, create_app
from infinitevl.serving.webpage import PAGE_DIR

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Headless Chromium as root; without the background-networking flags it stalls on refused connections here.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",  # a webcam: Chromium's test pattern, allowed without asking
    "--use-fake-ui-for-media-stream",
    "--window-size=1360,1000",
]
DATA = MEDIA / "mllm_demo" / "mllm_demo_data"
VIDEO = DATA / "3.mp4"  # H.264, which Debian's Chromium decodes (the AVI it cannot open)
PHOTOS = [DATA / f"{i}.jpg" for i in (1, 2, 3)]
# The README's picture is rewritten only when asked (INFINITEVL_SCREENSHOT=1): every run would otherwise change it
# (session ids, clock), leaving the checkout modified.
SCREENSHOT = ROOT / "docs" / "web-page.png"
KEY = "page-test-key"
FPS = 4
QUESTION = "Which digit was last shown with tag A?"  # the bundled model's task: other questions get its fixed reply
PIXEL_LIMIT = 100_000  # the server's --max-image-pixels: 224 px frames pass, 448 px frames are refused


def need_browser() -> None:
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    missing_tool("Debian's chromium and chromium-driver are not installed (as root: `make browser`)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`infinitevl serve` in a subprocess, restartable on the same port with the same state directory."""

    def __init__(self, state_dir: Path, log: Path):
        self.state_dir, self.log = state_dir, log
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            str(Path(sys.executable).with_name("infinitevl")),
            "serve",
            "--port",
            self.url.rsplit(":", 1)[1],
            "--api-key",
            KEY,
            "--state-dir",
            str(self.state_dir),
            "--max-image-pixels",
            str(PIXEL_LIMIT),
            "--max-batch",  # one answer at a time and one request waiting: two held requests make it busy
            "1",
            "--max-queue",
            "1",
            "--log-level",
            "warning",
        ]
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # a clean stop: the sessions are saved
            assert self.proc.wait(30) == 0, self.log.read_text()

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


@pytest.fixture()
def server(tmp_path):
    srv = Server(tmp_path / "state", tmp_path / "server.log")
    srv.start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.proc.kill()


@pytest.fixture()
def browser(tmp_path):
    need_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


class Page:
    """What a person sees on the page, by element id, and the browser's console."""

    def __init__(self, driver):
        self.d = driver

    def el(self, id_: str):
        return self.d.find_element(By.ID, id_)

    def value(self, id_: str) -> str:
        return self.el(id_).get_attribute("data-value")

    def number(self, id_: str) -> float:
        return float(self.value(id_))

    def messages(self) -> str:
        return self.el("messages").text

    def wait(self, condition, what: str, timeout: float = 30):
        return WebDriverWait(self.d, timeout, poll_frequency=0.1).until(lambda _: condition(), message=what)

    def console(self, *allowed: str) -> None:
        """Every console entry since the last call: nothing from the page's scripts (errors or warnings), and
        network errors only of the kinds the step provokes."""
        bad = [
            e
            for e in self.d.get_log("browser")
            if e["level"] in ("SEVERE", "WARNING")
            and not (e["source"] == "network" and any(a in e["message"] for a in allowed))
        ]
        assert not bad, bad

    def answers(self):
        return self.d.find_elements(By.CSS_SELECTOR, "#answers li")

    def ask(self, question: str, max_tokens: int) -> dict:
        before = len(self.answers())
        box = self.el("max-tokens")
        box.clear()
        box.send_keys(str(max_tokens))
        box = self.el("question")
        box.clear()
        box.send_keys(question, Keys.ENTER)  # the keyboard is enough
        self.wait(lambda: len(self.answers()) == before + 1, "the question is listed")
        item = self.answers()[0]
        self.wait(lambda: item.get_attribute("data-state") in ("done", "error"), "the answer is complete")
        assert item.get_attribute("data-state") == "done", item.text
        return {
            "text": item.find_element(By.CLASS_NAME, "a").get_attribute("textContent"),
            "clock": float(item.get_attribute("data-clock")),
            "chunks": int(item.get_attribute("data-chunks")),
        }


def hold_generation(url: str) -> socket.socket:
    """A streamed chat completion of the task question that would run for minutes (end-of-turn forbidden), on a raw
    socket: closing the socket cancels it."""
    eos = InfiniteVLConfig.from_file(BUNDLED).eos_token_ids
    body = json.dumps(
        {
            "model": "infinitevl",
            "messages": [{"role": "user", "content": QUESTION}],  # its task: other prompts get the fixed reply at once
            "max_tokens": 20000,
            "stream": True,
            "logit_bias": {str(i): -100 for i in eos},
        }
    ).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def video_duration(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base)


def reference_answer(api: httpx.Client, sid: str, question: str, max_tokens: int) -> str:
    r = api.post(f"/v1/sessions/{sid}/ask", json={"question": question, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_the_page_files_are_open_and_nothing_else_is():
    """The page needs no key and loads nothing from elsewhere; its open path leads nowhere but to its own files."""
    config = ServerConfig(api_key=KEY)
    with BackgroundServer(create_app(InfiniteVL.load(BUNDLED), config)) as srv:
        page = httpx.get(srv.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
        assert links and all(u.startswith("/web/") or u.startswith("data:") for u in links), links
        imports = re.findall(r'from "([^"]+)"', (PAGE_DIR / "app.js").read_text())
        assert imports and all(u.startswith("./") for u in imports), imports
        for name in sorted(p.name for p in PAGE_DIR.iterdir()):
            served = httpx.get(f"{srv.url}/web/{name}")
            assert served.status_code == 200 and served.content == (PAGE_DIR / name).read_bytes(), name
        assert httpx.get(srv.url + "/v1/sessions").status_code == 401
        for path in ("/web/../v1/sessions", "/web/%2e%2e/v1/sessions", "/web/../../../../etc/passwd"):
            conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
            conn.request("GET", path)  # sent as written: no client-side normalisation of the dots
            answer = conn.getresponse()
            assert answer.status == 404 and b'"data"' not in answer.read(), path
            conn.close()


@pytest.mark.serial  # a browser playing a video in real time against a server: run alone
def test_the_page_runs_a_live_session(browser, server, tmp_path):
    page = Page(browser)
    api = server.api()

    # The key: none, a wrong one, the right one; each answer is told in words.
    browser.get(server.url + "/")
    page.wait(lambda: "needs an API key" in page.messages(), "the page asks for the key")
    page.el("api-key").send_keys("not-the-key", Keys.ENTER)
    page.wait(lambda: "invalid API key" in page.messages(), "a wrong key is refused in words")
    page.el("api-key").clear()
    page.el("api-key").send_keys(KEY, Keys.ENTER)
    page.wait(lambda: "API key accepted" in page.messages(), "the right key is accepted")
    page.console("status of 401")
    note = page.el("model-note").text  # the bundled model: its two tasks and what to ask it
    assert "two tasks" in note and "Which digit was last shown with tag" in note and "Read the last" in note

    # The real MP4 through the file input, played and sent as it plays; a moment at a frame size the server
    # refuses (its pixel limit) does not stop the stream.
    fps = page.el("fps")
    fps.clear()
    fps.send_keys(str(FPS))
    page.el("video-file").send_keys(str(VIDEO))
    page.wait(lambda: "session=sess_" in browser.current_url, "the session id is in the URL")
    sid = browser.current_url.split("session=")[1]
    seen: list[tuple[int, int]] = []

    def observe(until, what: str, timeout: float = 60):
        def look():
            seen.append((int(page.value("tokens")), int(page.value("state-bytes"))))
            return until()

        page.wait(look, what, timeout)

    observe(lambda: page.number("frames") >= 4, "frames are taken in")
    frame_size = Select(page.el("frame-size"))
    frame_size.select_by_value("448")
    observe(lambda: "exceeds the limit" in page.messages(), "a refused frame is told in words")
    frame_size.select_by_value("224")
    tokens_at_refusal = int(page.value("tokens"))
    done = f"{VIDEO.name} finished"
    observe(lambda: done in page.messages() and page.value("queue") == "0", "the whole video is sent")
    page.console("status of 400")

    info = api.get(f"/v1/sessions/{sid}").json()
    tokens, states = zip(*seen)
    assert len(set(tokens)) >= 10 and list(tokens) == sorted(tokens), "the token count grows as frames arrive"
    assert set(states) == {info["state_bytes"]}, "the state size stays the same while the tokens grow"
    assert info["tokens"] == int(page.value("tokens")) > tokens_at_refusal, "frames after the refused ones count"
    assert info["frames"] == int(page.value("frames"))
    refused, dropped = int(page.value("refused")), int(page.value("dropped"))
    duration = video_duration(VIDEO)
    assert refused >= 1 and dropped == 0
    sampled = math.floor(duration * FPS) + 1  # at 0, 1/FPS, 2/FPS, ... of the video's time
    assert sampled - 1 <= info["frames"] + refused <= sampled, "a file's frames are all sent or refused, none lost"
    clock = page.number("stream-time")
    assert duration - 2 / FPS <= clock <= duration, "the stream time is the video's own time"

    # A question, typed and sent with Enter, answered as server-sent events; the answer is the server's own
    # (non-streamed) answer to the same question, about the stream up to its last frame.
    answer = page.ask(QUESTION, 16)
    expected = reference_answer(api, sid, QUESTION, 16)
    assert expected, "the bundled model answers its own task's question"
    assert answer["text"] == expected and answer["chunks"] >= 2 and answer["clock"] == clock
    assert api.get(f"/v1/sessions/{sid}").json()["tokens"] == info["tokens"], "asking leaves the stream as it was"

    # A snapshot, more frames (a folder of real photos) sent while the server is busy, then the snapshot restored.
    page.el("snapshot").click()
    page.wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#snapshots li"), "the snapshot is listed")
    snap = browser.find_element(By.CSS_SELECTOR, "#snapshots li")
    snap_id = snap.get_attribute("data-id")
    assert int(snap.get_attribute("data-tokens")) == info["tokens"]
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    held = [hold_generation(server.url)]
    page.wait(lambda: api.get("/health").json()["active"] == 1, "one answer runs")
    held.append(hold_generation(server.url))
    page.wait(lambda: api.get("/health").json()["queued"] == 1, "another one waits: the server is full")
    page.el("image-folder").send_keys(str(folder))
    page.wait(lambda: "the server is busy (HTTP 429)" in page.messages(), "a busy server is told in words")
    assert page.number("frames") == info["frames"]
    for sock in held:  # the running answer goes first, which lets the waiting one start and go
        sock.close()
    later = info["frames"] + len(PHOTOS)
    observe(lambda: page.number("frames") == later and page.value("queue") == "0", "the photos are all taken in")
    page.console("status of 429")
    assert api.get(f"/v1/sessions/{sid}").json()["frames"] == later
    assert page.number("stream-time") > clock, "the photos come after the video in the stream"
    snap.find_element(By.TAG_NAME, "button").click()
    page.wait(lambda: page.number("tokens") == info["tokens"], "the snapshot is restored")
    restored = api.get(f"/v1/sessions/{sid}").json()
    assert (restored["tokens"], restored["frames"]) == (info["tokens"], info["frames"])
    assert page.number("stream-time") == clock
    assert len(set(s for _, s in seen)) == 1
    page.console()
    frame = browser.execute_script("return window.outerHeight - window.innerHeight")
    browser.set_window_size(1360, browser.execute_script("return document.body.scrollHeight") + frame)
    shot = SCREENSHOT if os.environ.get("INFINITEVL_SCREENSHOT") == "1" else tmp_path / "web-page.png"
    browser.save_screenshot(str(shot))  # the whole page
    assert shot.stat().st_size > 10_000

    # A reload finds the session from the URL (and the key kept for this tab).
    browser.refresh()
    page.wait(lambda: f"session {sid} found" in page.messages(), "the reloaded page finds the session")
    page.wait(lambda: page.number("tokens") == info["tokens"], "with its figures")
    assert page.number("stream-time") == clock
    assert browser.find_element(By.CSS_SELECTOR, "#snapshots li").get_attribute("data-id") == snap_id
    page.console()

    # The server stops and starts again: the page says it is unreachable meanwhile, then finds the session (from
    # the state directory) and answers from it as before.
    server.stop()
    page.wait(lambda: "cannot reach the server" in page.messages(), "the page tells that the server is away")
    server.start()
    page.wait(lambda: "server answers again" in page.messages(), "the page finds the server again", timeout=30)
    assert page.number("tokens") == info["tokens"]
    again = page.ask(QUESTION, 16)
    assert again["text"] == answer["text"] and again["clock"] == clock, "the same state gives the same answer"
    page.console("net::ERR_CONNECTION_", "net::ERR_EMPTY_RESPONSE")  # refused, reset or closed while it was away

    # The webcam (Chromium's fake camera) continues the same stream, later in its time.
    page.el("camera").click()
    observe(lambda: page.number("frames") >= info["frames"] + 2, "webcam frames are taken in")
    page.el("stop").click()
    assert page.number("stream-time") > clock and api.get(f"/v1/sessions/{sid}").json()["frames"] >= info["frames"] + 2
    assert len(set(s for _, s in seen)) == 1
    page.console()
    server.stop()


def test_a_new_session_takes_pairs_and_frames_per_prefill(browser, server):
    """The page's session options reach the server: a new session with frames in pairs and 4 frames per prefill."""
    page = Page(browser)
    api = server.api()
    browser.get(server.url + "/")
    page.wait(lambda: "needs an API key" in page.messages(), "the page asks for the key")
    page.el("api-key").send_keys(KEY, Keys.ENTER)
    page.wait(lambda: "API key accepted" in page.messages(), "the key is accepted")
    page.console("status of 401")  # the page's requests before the key was given
    page.el("pair-frames").click()
    Select(page.el("frames-per-step")).select_by_value("4")
    page.el("new-session").click()
    page.wait(lambda: "4 per prefill" in page.el("session-id").text, "the session's settings are shown")
    sid = page.el("session-id").text.split()[1].rstrip(",")
    info = api.get(f"/v1/sessions/{sid}").json()
    assert info["pair_frames"] and info["frames_per_step"] == 4 and info["pending_frames"] == 0
    assert "in pairs, 4 per prefill" in page.el("session-id").text
    page.console()
