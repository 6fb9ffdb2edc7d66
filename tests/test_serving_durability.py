"""Sessions survive crashes exactly as acknowledged: a real `infinitevl serve` is killed with SIGKILL in the middle of
a long video append, and the restarted server has every acknowledged append and nothing of the interrupted one
(checked against an in-process session fed the same appends). Damaged files (zeros written into the tensor data, a
flipped byte in an acknowledged journal record) make the session reported as damaged, never used; a record cut short
by a crash before it was acknowledged is dropped; restoring a snapshot brings a damaged session back. More faults
(failed writes, a second server, tampering): test_serving_faults.py."""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file
from test_serving import DATA, serve_process, varied_model
from test_serving_sessions import frame_item, jpeg

from infinitevl.engine.generation import SamplingParams
from infinitevl.engine.runtime import InfiniteVL
from infinitevl.processing.media import iter_video, load_image, read_video
from infinitevl.serving import BackgroundServer, ServerConfig, create_app

ANSWER = SamplingParams(max_new_tokens=8)
QUESTION = {"question": "What did you see?", "max_tokens": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return varied_model(tmp_path_factory.mktemp("durable") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir) -> InfiniteVL:
    return InfiniteVL.load(model_dir)


def serve(model_dir: Path, state_dir: Path, durability: str) -> tuple[subprocess.Popen, str]:
    args = ["--model", str(model_dir), "--state-dir", str(state_dir), "--durability", durability]
    proc, url, _ = serve_process([*args, "--media-root", str(DATA)])
    return proc, url


def test_sigkill_during_an_append_keeps_exactly_the_acknowledged_appends(model_dir, engine, tmp_path):
    state_dir, durability = tmp_path / "state", "journal"
    photos = [jpeg(f) for f, _ in iter_video(DATA / "3.mp4", fps=2.0, max_frames=2)]
    proc, url = serve(model_dir, state_dir, durability)
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            sid = http.post("/v1/sessions", json={"frame_size": 112}).json()["id"]
            acked = [
                http.post(f"/v1/sessions/{sid}/frames", json={"video_url": {"url": "3.mp4"}, "fps": 1.0}),
                http.post(f"/v1/sessions/{sid}/text", json={"text": "Now two photos."}),
                http.post(f"/v1/sessions/{sid}/frames", json={"frames": [frame_item(photos[0], 8.0),
                                                                         frame_item(photos[1], 8.5)]}),
            ]  # fmt: skip
            assert [r.status_code for r in acked] == [200, 200, 200], [r.text for r in acked]
            expected = acked[-1].json()["session"]
            chunks = http.get("/health").json()["prefill_chunks"]
            long = {"video_url": {"url": "1.mp4"}, "fps": 8.0, "timestamp_offset": 20.0}  # 78 frames
            outcome: list = []

            def append() -> None:
                try:
                    outcome.append(httpx.post(f"{url}/v1/sessions/{sid}/frames", json=long, timeout=120))
                except httpx.HTTPError as err:
                    outcome.append(err)

            thread = threading.Thread(target=append)
            thread.start()
            while http.get("/health").json()["prefill_chunks"] < chunks + 4:  # some of its frames are in
                assert thread.is_alive(), outcome
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            thread.join(60)
        assert isinstance(outcome[0], httpx.HTTPError), "the append finished before the kill"
    finally:
        proc.kill()
    proc, url = serve(model_dir, state_dir, durability)
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            back = http.get(f"/v1/sessions/{sid}").json()
            assert {k: back[k] for k in ("tokens", "frames", "images", "videos")} == {
                k: expected[k] for k in ("tokens", "frames", "images", "videos")
            }
            ref = engine.session(frame_size=(112, 112))
            video = read_video(DATA / "3.mp4", fps=1.0, max_frames=256)
            for f, t in zip(video.frames, video.timestamps):
                ref.append_frame(f, t)
            ref.append_text("Now two photos.")
            ref.append_frame(load_image(photos[0]), 8.0)
            ref.append_frame(load_image(photos[1]), 8.5)
            answer = http.post(f"/v1/sessions/{sid}/ask", json=QUESTION).json()["choices"][0]["message"]["content"]
            assert answer == ref.ask(QUESTION["question"], ANSWER)
            short = {**long, "fps": 1.0}  # the lost timestamps were never recorded: they are accepted again
            assert http.post(f"/v1/sessions/{sid}/frames", json=short).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def start(model_dir: Path, state_dir: Path, durability: str = "journal") -> BackgroundServer:
    config = ServerConfig(model_name="tiny", media_root=DATA, state_dir=state_dir, durability=durability)
    return BackgroundServer(create_app(InfiniteVL.load(model_dir), config)).start()


@pytest.mark.parametrize("durability", ["full", "journal"])
def test_what_is_on_disk_after_each_acknowledged_change(model_dir, tmp_path, durability):
    """A copy of the state directory taken while the server runs (what a crash would leave) has every change."""
    state_dir = tmp_path / "state"
    srv = start(model_dir, state_dir, durability)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            sid = http.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
            for offset in (0.0, 10.0):
                r = http.post(f"/v1/sessions/{sid}/frames", json={"video_url": {"url": "3.mp4"}, "fps": 1.0,
                                                                  "timestamp_offset": offset})  # fmt: skip
                assert r.status_code == 200, r.text
            r = http.post(f"/v1/sessions/{sid}/text", json={"text": "and then"})
            expected = r.json()["session"]
            assert expected["videos"] == 2 and expected["frames"] == 14 and expected["images"] == 0
            shutil.copytree(state_dir, tmp_path / "crashed")
    finally:
        srv.stop()
    srv = start(model_dir, tmp_path / "crashed", durability)
    try:
        back = httpx.get(f"{srv.url}/v1/sessions/{sid}").json()
        assert {k: back[k] for k in ("tokens", "frames", "videos")} == {
            k: expected[k] for k in ("tokens", "frames", "videos")
        }
        assert httpx.post(f"{srv.url}/v1/sessions/{sid}/ask", json=QUESTION, timeout=60).status_code == 200
    finally:
        srv.stop()


def tensor_range(path: Path, name: str) -> tuple[int, int]:
    """Byte range of one tensor's data in a safetensors file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def test_damaged_files_are_refused_and_snapshots_bring_the_session_back(model_dir, tmp_path):
    state_dir = tmp_path / "state"
    frames = [(jpeg(f), t) for f, t in iter_video(DATA / "1.mp4", fps=2.0, max_frames=4)]
    srv = start(model_dir, state_dir)
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        sid = http.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
        assert http.post(f"/v1/sessions/{sid}/frames", json={"frames": [frame_item(*frames[0])]}).status_code == 200
        snap = http.post(f"/v1/sessions/{sid}/snapshot").json()["id"]
        for item in frames[1:]:
            shutil.copytree(state_dir, tmp_path / "before_last", dirs_exist_ok=True)
            assert http.post(f"/v1/sessions/{sid}/frames", json={"frames": [frame_item(*item)]}).status_code == 200
        at_snapshot_tokens = next(s for s in http.get(f"/v1/sessions/{sid}").json()["snapshots"])["tokens"]
        tokens = http.get(f"/v1/sessions/{sid}").json()["tokens"]
        crashed = tmp_path / "crashed"
        shutil.copytree(state_dir, crashed)  # every acknowledged change is on disk: a copy is a crash
    srv.stop()
    journal = crashed / "sessions" / f"{sid}.journal"
    assert journal.stat().st_size > 0

    # a record cut short at the end (a crash while writing it, before it was acknowledged): the session without it
    torn = tmp_path / "torn"
    shutil.copytree(crashed, torn)
    with open(torn / "sessions" / f"{sid}.journal", "rb+") as f:
        f.truncate(journal.stat().st_size - 10)
    shutil.copy(tmp_path / "before_last" / "sessions" / f"{sid}.ack", torn / "sessions" / f"{sid}.ack")
    srv = start(model_dir, torn)
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.post(f"/v1/sessions/{sid}/ask", json=QUESTION).status_code == 200
        back = http.get(f"/v1/sessions/{sid}").json()
        assert back["status"] == "ok" and back["frames"] == 3 and back["tokens"] < tokens
    srv.stop()

    # a flipped byte inside a journal record, and 4 KiB of zeros in the state file's tensor data
    flipped = tmp_path / "flipped"
    shutil.copytree(crashed, flipped)
    data = bytearray((flipped / "sessions" / f"{sid}.journal").read_bytes())
    data[-100] ^= 0xFF  # in the tensor data of the last record
    (flipped / "sessions" / f"{sid}.journal").write_bytes(bytes(data))
    zeroed = tmp_path / "zeroed"
    shutil.copytree(state_dir, zeroed)  # after the clean shutdown: the whole state in the file, no journal
    path = zeroed / "sessions" / f"{sid}.safetensors"
    begin, end = tensor_range(path, next(k for k in load_file(path) if k.endswith(".memory")))
    raw = bytearray(path.read_bytes())
    assert any(raw[begin : begin + 4096]) and end - begin >= 4096
    raw[begin : begin + 4096] = bytes(4096)
    path.write_bytes(bytes(raw))
    for folder, words in ((flipped, "fails its checksum"), (zeroed, "damaged")):
        srv = start(model_dir, folder)
        try:
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                r = http.post(f"/v1/sessions/{sid}/ask", json=QUESTION)
                error = r.json()["error"]
                assert r.status_code == 409 and error["code"] == "session_damaged" and words in error["message"]
                assert r.headers["x-should-retry"] == "false" and str(folder) not in error["message"]
                info = http.get(f"/v1/sessions/{sid}").json()
                assert info["status"] == "damaged" and info["damage"]
                assert http.get("/health").json()["sessions_damaged"] == 1
                frame = {"frames": [frame_item(frames[0][0], 99.0)]}
                assert http.post(f"/v1/sessions/{sid}/frames", json=frame).status_code == 409
                r = http.post(f"/v1/sessions/{sid}/restore", json={"snapshot_id": snap})
                assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["tokens"] == at_snapshot_tokens
                assert http.post(f"/v1/sessions/{sid}/ask", json=QUESTION).status_code == 200
        finally:
            srv.stop()
