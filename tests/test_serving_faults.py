"""Faults at the session store, injected where they happen: a write that fails (ENOSPC at the write call, a write
cut short by the file size limit after 4 KiB reached the disk), a second server on the same state directory, a last
journal record torn or zero-filled by a crash, a journal cut back or deleted, a settings file with a flipped byte,
and folders created without being fsynced into their parents. After each, the server keeps exactly the acknowledged
changes (compared with the same changes made on a server that had no fault), or reports the session as damaged from
the moment it starts."""

from __future__ import annotations

import errno
import logging
import os
import resource
import shutil
import signal
from pathlib import Path

import httpx
import pytest
import torch
from test_serving import DATA, varied_model

from infinitevl.engine.runtime import InfiniteVL
from infinitevl.engine.session import StreamSession
from infinitevl.serving import BackgroundServer, ServerConfig, create_app
from infinitevl.serving import store as store_module
from infinitevl.serving.store import SessionStore, StoreBusy

TEXTS = ["The first note.", "A second note, which fails.", "A third note.", "And a fourth one, the last."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return varied_model(tmp_path_factory.mktemp("faults") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir) -> InfiniteVL:
    return InfiniteVL.load(model_dir)


def start(engine, state_dir: Path) -> BackgroundServer:
    config = ServerConfig(model_name="tiny", media_root=DATA, state_dir=state_dir)
    return BackgroundServer(create_app(engine, config)).start()


def append(http: httpx.Client, sid: str, text: str) -> httpx.Response:
    return http.post(f"/v1/sessions/{sid}/text", json={"text": text})


def stored(engine, state_dir: Path, sid: str) -> tuple[StreamSession, int]:
    """The session as a fresh server reads it from `state_dir` (state file plus journal)."""
    store = SessionStore(state_dir)
    try:
        make = lambda p: StreamSession.restore(p, engine.model, engine.processor, frame_size=(56, 56))  # noqa: E731
        return store.read(sid, store.state_path(sid), make)
    finally:
        store.close()


def reference(engine, tmp_path: Path, texts: list[str]) -> tuple[dict, StreamSession]:
    """The same appends on a server without faults: its session's counters and state as stored."""
    srv = start(engine, tmp_path / "reference")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            sid = http.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
            for text in texts:
                assert append(http, sid, text).status_code == 200
            info = http.get(f"/v1/sessions/{sid}").json()
    finally:
        srv.stop()
    return info, stored(engine, tmp_path / "reference", sid)[0]


class JournalWriteFails:
    """The next write to a journal: `os.write` raises ENOSPC, after passing `written` bytes to the real write."""

    def __init__(self, monkeypatch, written: int = 0):
        self.real, self.written, self.armed = os.write, written, False
        monkeypatch.setattr(os, "write", self)

    def __call__(self, fd, data):
        if self.armed and os.readlink(f"/proc/self/fd/{fd}").endswith(".journal"):
            self.armed = False
            if self.written:
                self.real(fd, bytes(data[: self.written]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(fd, data)


class FileSizeLimit:
    """RLIMIT_FSIZE at a file's current size (+ `extra`): the kernel cuts the next write there (a short write, then
    EFBIG), whichever code makes it."""

    def __init__(self, path: Path, extra: int):
        self.limit, self.old = path.stat().st_size + extra, None

    def __enter__(self):
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        signal.signal(signal.SIGXFSZ, self.handler)


@pytest.mark.parametrize("fault", ["enospc", "enospc-after-4k", "size-limit-after-4k"])
def test_a_failed_journal_write_loses_nothing_acknowledged(engine, tmp_path, monkeypatch, fault):
    """One append fails (507); the next appends and a restart (a crash copy, and a clean stop) keep exactly the
    acknowledged appends, bit-identical to a server where that append was never sent."""
    state_dir = tmp_path / "state"
    injected = JournalWriteFails(monkeypatch, written=4096 if fault == "enospc-after-4k" else 0)
    srv = start(engine, state_dir)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            sid = http.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
            assert append(http, sid, TEXTS[0]).status_code == 200
            before = http.get(f"/v1/sessions/{sid}").json()
            journal = state_dir / "sessions" / f"{sid}.journal"
            if fault.startswith("size-limit"):
                with FileSizeLimit(journal, extra=4096):
                    failed = append(http, sid, TEXTS[1])
            else:
                injected.armed = True
                failed = append(http, sid, TEXTS[1])
                assert not injected.armed, "the fault was not reached"
            assert failed.status_code == 507 and failed.json()["error"]["code"] == "state_write_failed"
            assert http.get(f"/v1/sessions/{sid}").json()["tokens"] == before["tokens"]
            for text in TEXTS[2:]:
                assert append(http, sid, text).status_code == 200
            shutil.copytree(state_dir, tmp_path / "crashed")  # every acknowledged change is on disk
    finally:
        srv.stop()
    expected, ref = reference(engine, tmp_path, [TEXTS[0], *TEXTS[2:]])
    for folder in (tmp_path / "crashed", state_dir):
        srv = start(engine, folder)
        try:
            back = httpx.get(f"{srv.url}/v1/sessions/{sid}").json()
            assert back["status"] == "ok", back["damage"]
            assert {k: back[k] for k in ("tokens", "frames")} == {k: expected[k] for k in ("tokens", "frames")}
        finally:
            srv.stop()
        stream, _ = stored(engine, folder, sid)
        for name, tensor in ref.state.tensors().items():
            assert torch.equal(stream.state.tensors()[name], tensor), name


def test_a_second_server_on_the_same_state_directory_is_refused(engine, tmp_path):
    state_dir = tmp_path / "state"
    srv = start(engine, state_dir)
    try:
        with pytest.raises(StoreBusy, match=f"in use by another server \\(pid {os.getpid()}\\)"):
            create_app(engine, ServerConfig(state_dir=state_dir))
        with pytest.raises(StoreBusy, match="in use"):  # nor may a deployment's replica join it
            create_app(engine, ServerConfig(state_dir=state_dir, state_shared=True))
        with httpx.Client(base_url=srv.url, timeout=60) as http:  # the first one goes on
            sid = http.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
            assert append(http, sid, TEXTS[0]).status_code == 200
    finally:
        srv.stop()
    start(engine, state_dir).stop()  # free again once the first has stopped


def crash_copies(engine, tmp_path: Path) -> tuple[str, Path, Path, dict, dict]:
    """A session with four acknowledged appends: copies of its directory before and after the fourth, and its
    counters at both."""
    state_dir = tmp_path / "state"
    srv = start(engine, state_dir)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            sid = http.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
            for text in TEXTS[:3]:
                assert append(http, sid, text).status_code == 200
            three = http.get(f"/v1/sessions/{sid}").json()
            shutil.copytree(state_dir, tmp_path / "before")
            assert append(http, sid, TEXTS[3]).status_code == 200
            four = http.get(f"/v1/sessions/{sid}").json()
            shutil.copytree(state_dir, tmp_path / "after")
    finally:
        srv.stop()
    return sid, tmp_path / "before", tmp_path / "after", three, four


@pytest.mark.parametrize("tail", ["torn", "zeros"])
def test_an_unacknowledged_last_record_is_dropped_with_a_warning(engine, tmp_path, caplog, tail):
    """A crash while the fourth record was written: its bytes reached the journal cut short, or as zeros (the
    file grew, its data was never written back), and its acknowledgement did not. The session is served with
    three appends, and the journal goes on after them."""
    sid, before, after, three, _ = crash_copies(engine, tmp_path)
    journal = after / "sessions" / f"{sid}.journal"
    size_before = (before / "sessions" / f"{sid}.journal").stat().st_size
    data = bytearray(journal.read_bytes())
    if tail == "torn":
        data = data[: len(data) - 100]
    else:
        data[size_before:] = bytes(len(data) - size_before)
    journal.write_bytes(bytes(data))
    shutil.copy(before / "sessions" / f"{sid}.ack", after / "sessions" / f"{sid}.ack")
    with caplog.at_level(logging.WARNING, logger="infinitevl.serving"):
        srv = start(engine, after)
    try:
        assert any("dropped the end of its journal" in r.getMessage() for r in caplog.records)
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            back = http.get(f"/v1/sessions/{sid}").json()
            assert back["status"] == "ok" and back["tokens"] == three["tokens"]
            assert journal.stat().st_size == size_before
            assert append(http, sid, TEXTS[3]).status_code == 200
    finally:
        srv.stop()
    _, ref = reference(engine, tmp_path, TEXTS)
    stream, _ = stored(engine, after, sid)
    for name, tensor in ref.state.tensors().items():
        assert torch.equal(stream.state.tensors()[name], tensor), name


def damage(folder: Path, sid: str, how: str) -> None:
    sessions = folder / "sessions"
    if how == "journal cut at a record boundary":
        shutil.copy(folder.parent / "before" / "sessions" / f"{sid}.journal", sessions / f"{sid}.journal")
    elif how == "journal deleted":
        (sessions / f"{sid}.journal").unlink()
    elif how == "ack deleted":
        (sessions / f"{sid}.ack").unlink()
    elif how == "settings byte flipped":
        raw = bytearray((sessions / f"{sid}.json").read_bytes())
        raw[raw.index(b'"frame_size": ') + 14] ^= 0x01  # 56 -> 46: still JSON, no longer what was written
        (sessions / f"{sid}.json").write_bytes(bytes(raw))
    elif how == "settings deleted":
        (sessions / f"{sid}.json").unlink()


@pytest.mark.parametrize(
    "how",
    ["journal cut at a record boundary", "journal deleted", "ack deleted", "settings byte flipped", "settings deleted"],
)
def test_lost_acknowledged_changes_are_reported_at_startup(engine, tmp_path, how):
    """Tampering that leaves valid files behind: reported by GET /v1/sessions/{id} and /health as soon as the
    server is up (before any use), refused (409), listed, and deletable."""
    sid, _, after, _, _ = crash_copies(engine, tmp_path)
    damage(after, sid, how)
    srv = start(engine, after)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.get("/health").json()["sessions_damaged"] == 1
            info = http.get(f"/v1/sessions/{sid}").json()
            assert info["status"] == "damaged" and info["damage"], info
            assert sid in [s["id"] for s in http.get("/v1/sessions").json()["data"]]
            r = append(http, sid, "more")
            assert r.status_code == 409 and r.json()["error"]["code"] == "session_damaged"
            assert http.delete(f"/v1/sessions/{sid}").status_code == 200
            assert http.get("/health").json()["sessions_damaged"] == 0
            assert not list((after / "sessions").glob(f"{sid}.*"))
    finally:
        srv.stop()


def test_folders_are_fsynced_into_their_parents(engine, tmp_path, monkeypatch):
    synced: list[Path] = []
    real = store_module.fsync_dir
    monkeypatch.setattr(store_module, "fsync_dir", lambda folder: (synced.append(Path(folder)), real(folder)))
    root = tmp_path / "new" / "state"
    store = SessionStore(root)
    try:
        stream = engine.session(frame_size=(56, 56))
        store.write_state("sess_" + "0" * 24, stream, 0)
        store.write_snapshot("sess_" + "0" * 24, "snap_1", stream)
    finally:
        store.close()
    created = [tmp_path / "new", root, root / "sessions", root / "snapshots", root / "snapshots" / ("sess_" + "0" * 24)]
    for folder in created:
        assert folder.parent in synced, f"{folder} was created but {folder.parent} never fsynced"


def test_replicas_on_one_directory_hand_a_session_over_and_never_write_it_together(engine, tmp_path, monkeypatch):
    """Two replicas (shared state directory): a session held by one is handed over when the other is asked for it;
    a holder that does not let go leaves the other with 503 and the files untouched; nothing acknowledged is lost."""
    from infinitevl.serving import sessions as sessions_module
    from infinitevl.serving.ray_deploy import HandoffWatcher

    monkeypatch.setattr(sessions_module, "HANDOFF_WAIT", 1.0)
    state_dir = tmp_path / "state"
    config = ServerConfig(model_name="tiny", state_dir=state_dir, state_shared=True)
    a, b = (BackgroundServer(create_app(engine, config)).start() for _ in range(2))
    watchers = [HandoffWatcher(a.app.state.ctx)]
    watchers[0].start()
    try:
        with pytest.raises(StoreBusy, match="in use by a deployment's replicas"):
            create_app(engine, ServerConfig(state_dir=state_dir))  # a lone server may not join them
        sid = httpx.post(f"{a.url}/v1/sessions", json={"frame_size": 56}).json()["id"]
        assert append(httpx.Client(base_url=a.url, timeout=60), sid, TEXTS[0]).status_code == 200  # a holds it
        assert a.app.state.ctx.sessions.loaded_count() == 1
        r = append(httpx.Client(base_url=b.url, timeout=60), sid, TEXTS[1])  # a hands it over to b
        assert r.status_code == 200, r.text
        assert a.app.state.ctx.sessions.loaded_count() == 0 and b.app.state.ctx.sessions.loaded_count() == 1
        files = {p.name: p.read_bytes() for p in (state_dir / "sessions").glob(f"{sid}.*") if p.suffix != ".handoff"}
        r = append(httpx.Client(base_url=a.url, timeout=60), sid, TEXTS[2])  # b has no watcher: it keeps it
        assert r.status_code == 503 and r.json()["error"]["code"] == "session_busy"
        after = {p.name: p.read_bytes() for p in (state_dir / "sessions").glob(f"{sid}.*") if p.suffix != ".handoff"}
        assert after == files  # a wrote nothing while b held the session
        watchers.append(HandoffWatcher(b.app.state.ctx))
        watchers[1].start()
        assert append(httpx.Client(base_url=a.url, timeout=60), sid, TEXTS[2]).status_code == 200
        back = httpx.get(f"{b.url}/v1/sessions/{sid}").json()  # b reads what a wrote
    finally:
        for w in watchers:
            w.stopped.set()
        a.stop()
        b.stop()
    expected, ref = reference(engine, tmp_path, TEXTS[:3])
    assert back["tokens"] == expected["tokens"]
    stream, _ = stored(engine, state_dir, sid)
    for name, tensor in ref.state.tensors().items():
        assert torch.equal(stream.state.tensors()[name], tensor), name


def test_a_replica_leaves_alone_a_session_another_is_creating(engine, tmp_path):
    """A state file without its settings file yet, locked by its creator: not listed, 404, and not removed (a
    server that owns the directory would remove it as a create that never finished)."""
    state_dir = tmp_path / "state"
    srv = BackgroundServer(create_app(engine, ServerConfig(state_dir=state_dir, state_shared=True))).start()
    creator = SessionStore(state_dir, shared=True)
    sid = "sess_" + "1" * 24
    lock = creator.lock_session(sid)
    try:
        creator.write_state(sid, engine.session(frame_size=(56, 56)), 0)
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.get("/v1/sessions").json()["data"] == []
            assert http.get(f"/v1/sessions/{sid}").status_code == 404
        assert creator.state_path(sid).exists()
    finally:
        lock.release()
        creator.close()
        srv.stop()
    srv = start(engine, state_dir)  # alone on the directory: a create that never finished is removed
    try:
        assert httpx.get(f"{srv.url}/v1/sessions/{sid}").status_code == 404
    finally:
        srv.stop()
    assert not (state_dir / "sessions" / f"{sid}.safetensors").exists()
