"""Live sources over HTTP: paired frames (a held frame reported, answered around and kept across a restart, the
stream equal to an in-process paired session) and realtime sessions that drop the frames a slower model cannot take
(concurrent uploads against a deliberately slow session)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from test_serving import DATA
from test_serving_sessions import ANSWER, ask, create, engine, info, jpeg, model_dir, start  # noqa: F401

from infinitevl.engine.session import StreamSession
from infinitevl.processing.media import iter_video, load_image

pytestmark = pytest.mark.serial  # a server per test, and a deliberately slow model

SIZE = 56


def upload(http: httpx.Client, sid: str, data: bytes, t: float) -> httpx.Response:
    return http.post(
        f"/v1/sessions/{sid}/upload", params={"timestamp": t}, content=data, headers={"Content-Type": "image/jpeg"}
    )


@pytest.mark.parametrize("per_step", [None, 4])
def test_paired_frames_over_http_survive_a_restart(model_dir, engine, tmp_path, per_step):  # noqa: F811
    frames = [(jpeg(f), t) for f, t in iter_video(DATA / "3.mp4", fps=2.0, max_frames=5)]
    ref = engine.session(frame_size=(SIZE, SIZE), pair_frames=True, frames_per_step=per_step)  # in-process
    step = per_step or 2
    srv = start(model_dir, state_dir=tmp_path / "state")
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        extra = {} if per_step is None else {"frames_per_step": per_step}
        sid = create(http, frame_size=SIZE, pair_frames=True, **extra)
        for n, (data, t) in enumerate(frames[:3], start=1):
            r = upload(http, sid, data, t)
            assert r.status_code == 200, r.text
            ref.append_frame(load_image(data), t)
            got = r.json()["session"]
            assert got["pair_frames"] and got["frames_per_step"] == step
            assert got["pending_frames"] == n % step == ref.stats.pending_frames
            assert got["frames"] == ref.stats.frames == n - n % step and got["tokens"] == ref.stats.tokens
        assert ask(http, sid, "What is shown?") == ref.ask("What is shown?", ANSWER)  # from the complete steps
    srv.stop()
    srv = start(model_dir, state_dir=tmp_path / "state")  # the held frames were written with the session
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            restored = info(http, sid)
            assert restored["pair_frames"] and restored["frames_per_step"] == step
            assert restored["pending_frames"] == 3 % step and restored["frames"] == 3 - 3 % step
            for data, t in frames[3:]:
                assert upload(http, sid, data, t).status_code == 200
                ref.append_frame(load_image(data), t)
            r = http.post(f"/v1/sessions/{sid}/text", json={"text": "and then"})  # commits the fifth frame alone
            ref.append_text("and then")
            final = r.json()["session"]
            assert final["frames"] == ref.stats.frames == 5 and final["pending_frames"] == 0
            assert final["tokens"] == ref.stats.tokens
            assert ask(http, sid, "What happened?") == ref.ask("What happened?", ANSWER)
            bad = http.post("/v1/sessions", json={"pair_frames": True, "frames_per_step": 3})
            assert bad.status_code in (400, 422) and "frames_per_step must be even" in bad.text
    finally:
        srv.stop()


@pytest.fixture()
def slow_frames(monkeypatch):
    """A model slower than the source: every live frame takes 1 s more."""
    real = StreamSession._append_live

    def slow(self, *args, **kwargs):
        time.sleep(1.0)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StreamSession, "_append_live", slow)


@pytest.mark.parametrize("realtime", [True, False])
def test_a_realtime_session_keeps_the_newest_waiting_frame(model_dir, slow_frames, realtime):  # noqa: F811
    data = jpeg(next(iter(iter_video(DATA / "3.mp4", fps=2.0, max_frames=1)))[0])
    n = 6
    srv = start(model_dir)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            sid = create(http, frame_size=SIZE, realtime=realtime)
            results: list = [None] * n

            def send(i: int) -> None:
                with httpx.Client(base_url=srv.url, timeout=60) as client:
                    results[i] = upload(client, sid, data, i * 0.1)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
            for th in threads:  # a source faster than the model: a frame every 0.05 s, each taking 1 s
                th.start()
                time.sleep(0.05)
            for th in threads:
                th.join()
            assert all(r.status_code == 200 for r in results), [r.text for r in results]
            bodies = [r.json() for r in results]
            appended = sum(b["frames_appended"] for b in bodies)
            dropped = sum(b["frames_dropped"] for b in bodies)
            final = info(http, sid)
            assert appended + dropped == n and final["frames"] == appended and final["frames_dropped"] == dropped
            assert final["realtime"] is realtime
            if realtime:
                assert dropped > 0  # frames given way to newer ones, instead of a queue as long as the source
                kept = [i for i, b in enumerate(bodies) if b["frames_appended"]]
                assert kept[0] == 0 and kept[-1] == n - 1  # the first went straight in; the newest always wins
            else:
                assert dropped == 0  # without the option every frame waits its turn
    finally:
        srv.stop()
