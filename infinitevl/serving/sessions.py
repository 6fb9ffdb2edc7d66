"""Streaming sessions held by the server: a registry with limits, durable persistence, snapshots.

A served session is a `StreamSession` plus what the server keeps around it (id, times, settings, snapshots). Every
method that changes a session or runs the model is called on the scheduler's worker thread (the app submits them
as tasks; appends are generators that yield after each frame or prefill chunk, so decoding goes on between them);
`info` and `ids` only read and may run anywhere.

- A failing request leaves the session bit-identical: `_mutate` copies the state into a preallocated backup
  before a change and copies it back on any error (a bad frame half way through a video, a failed write).
- With a state directory (store.py), a change is made durable before it is acknowledged: by default a journal
  record of what it wrote, fsynced (`durability="journal"`); or the whole state file (`"full"`); or, with
  `"none"`, only on create, snapshot, idle unloading and shutdown. At start-up every session found there is listed
  again and loaded on first use. A session whose files fail their checksums is reported as damaged and refused
  until it is restored from a snapshot or deleted.
- At most `max_sessions` sessions exist (in memory or on disk). A session unused for `session_idle_timeout`
  seconds leaves memory: saved and unloaded with a state directory (its next use loads it back), deleted without.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from PIL import Image

from ..engine.session import COUNTERS as STREAM_COUNTERS
from ..engine.session import StreamSession
from ..processing.media import MediaError, VideoFrames
from ..state import InfiniteVLState
from .config import ServerConfig
from .errors import APIError
from .prefill import text_steps
from .store import Damaged, SessionStore

log = logging.getLogger("infinitevl.serving")
SESSION_ID = re.compile(r"^sess_[0-9a-f]{24}$")
SIDECAR_FORMAT = "infinitevl-session/2"
COUNTERS = ("tokens", "frames", "images", "videos", "questions", "state_bytes", "ingest_seconds")
NO_RETRY = {"x-should-retry": "false"}  # the openai client would otherwise retry a 409


@dataclass
class Snapshot:
    id: str
    created: float
    counters: dict
    state: InfiniteVLState | None = None  # kept in memory when there is no state directory
    segment: object = None


@dataclass
class ServedSession:
    id: str
    created: float
    system_prompt: str | None
    frame_size: int
    last_used: float
    stream: StreamSession | None = None  # None: on disk until its next use
    counters: dict = field(default_factory=dict)  # as of the last write (for unloaded sessions)
    snapshots: list[Snapshot] = field(default_factory=list)
    dirty: bool = False  # changed since the last write
    seq: int = 0  # journal records written
    damage: str | None = None


class SessionRegistry:
    def __init__(self, engine, config: ServerConfig, metrics=None):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.store = SessionStore(config.state_dir) if config.state_dir is not None else None
        self._sessions: dict[str, ServedSession] = {}
        self._lock = threading.Lock()  # guards the dict against readers on other threads
        self._backup: InfiniteVLState | None = None
        self._state_nbytes = engine.model.new_state(1).nbytes

    # -- reading (any thread) --------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def loaded_count(self) -> int:
        with self._lock:
            return sum(s.stream is not None for s in self._sessions.values())

    @property
    def state_nbytes(self) -> int:
        """Bytes of one session's state (the same for every session)."""
        return self._state_nbytes

    def damaged_count(self) -> int:
        with self._lock:
            return sum(s.damage is not None for s in self._sessions.values())

    def info(self, session_id: str) -> dict:
        s = self._get(session_id)
        stream = s.stream
        if stream is not None:
            counters = {**stream.stats.as_dict(), "fps": stream.stats.recent_fps}
        else:
            counters = {**s.counters, "fps": 0.0, "tokens_per_second": 0.0}
        return {
            "id": s.id,
            "created": s.created,
            "last_used": s.last_used,
            "status": "damaged" if s.damage else "ok",
            "damage": s.damage,
            "loaded": stream is not None,
            "system_prompt": s.system_prompt,
            "frame_size": s.frame_size,
            **{k: counters.get(k, 0) for k in (*COUNTERS, "fps", "tokens_per_second")},
            "snapshots": [self._snapshot_info(s, snap) for snap in s.snapshots],
        }

    # -- changing (worker thread) ----------------------------------------------------------------------------------
    def create(self, system_prompt: str | None, frame_size: int | None) -> str:
        if len(self._sessions) >= self.config.max_sessions:
            raise APIError(
                403,
                f"the session limit ({self.config.max_sessions}) is reached; delete a session "
                "(DELETE /v1/sessions/{id}) or start the server with a higher --max-sessions",
                code="session_limit",
            )
        size = frame_size or self.config.frame_size
        now = time.time()
        s = ServedSession("sess_" + secrets.token_hex(12), now, system_prompt or None, size, now)
        s.stream = self._new_stream(system_prompt or None, size)
        if self.store is not None:
            self.store.write_state(s.id, s.stream, 0)
            self._write_sidecar(s)
        with self._lock:
            self._sessions[s.id] = s
        return s.id

    def append_frames(self, session_id: str, frames: list[tuple[Image.Image, float]]) -> Generator:
        """Live frames with their timestamps, all or nothing, one frame per step. Returns (frames, tokens)."""

        def run(stream: StreamSession):
            n = 0
            for f, t in frames:
                n += stream.append_frame(f, t)
                yield
            stream.stats.images += len(frames)
            return n

        tokens = yield from self._mutate(session_id, run)
        return len(frames), tokens

    def append_video(self, session_id: str, video: VideoFrames, offset: float | None) -> Generator:
        """A decoded video chunk as live frames; by default its clock starts just after the last frame."""

        def run(stream: StreamSession):
            start = offset
            if start is None:
                seg = stream.segment
                start = seg.last_time + 1.0 / video.fps if seg is not None else 0.0
            first, n = video.timestamps[0], 0
            for f, t in zip(video.frames, video.timestamps):
                n += stream.append_frame(f, start + t - first)
                yield
            stream.stats.videos += 1
            return n

        tokens = yield from self._mutate(session_id, run)
        return len(video.frames), tokens

    def append_text(self, session_id: str, text: str) -> Generator:
        tokens = yield from self._mutate(session_id, lambda st: st.append_text_steps(text, self.config.prefill_chunk))
        return 0, tokens

    def branch(self, session_id: str, row: InfiniteVLState, question: str) -> Generator:
        """Copy the session's state into `row` and prefill the question there (as `StreamSession.ask` does on a
        clone), one chunk per step: the answer is generated from the branch and the session itself is untouched."""
        s = self._get(session_id)
        stream = self._load(s)
        c = self.engine.model.config
        ids = ([c.vision_end_token_id] if stream.segment is not None else []) + stream.question_ids(question)
        row.copy_(stream.state)
        stream.stats.questions += 1
        s.last_used, s.dirty = time.time(), True
        return (yield from text_steps(self.engine.model, row, ids, self.config.prefill_chunk))

    def snapshot(self, session_id: str) -> dict:
        s = self._get(session_id)
        stream = self._load(s)
        snap = Snapshot("snap_" + secrets.token_hex(8), time.time(), self._counters(s))
        if self.store is None:
            snap.state, snap.segment = stream.state.clone(), copy.copy(stream.segment)
        else:
            self.store.write_snapshot(s.id, snap.id, stream)
        s.snapshots.append(snap)
        while len(s.snapshots) > self.config.max_snapshots:
            old = s.snapshots.pop(0)
            if self.store is not None:
                self.store.delete_snapshot(s.id, old.id)
        s.last_used = time.time()
        if self.store is not None:
            self._write_sidecar(s)
        return self._snapshot_info(s, snap)

    def restore(self, session_id: str, snapshot_id: str) -> None:
        """Put the session back as it was at a snapshot (also the way back for a damaged session)."""
        s = self._get(session_id)
        snap = next((x for x in s.snapshots if x.id == snapshot_id), None)
        if snap is None:
            raise APIError(404, f"session {session_id} has no snapshot {snapshot_id!r}", code="snapshot_not_found")
        if snap.state is not None:
            stream = self._load(s)
            stream.state.copy_(snap.state)
            stream.segment = copy.copy(snap.segment)
        else:
            try:  # loaded first, swapped after
                stream, _ = self.store.read(s.id, self.store.snapshot_path(s.id, snap.id), self._restorer(s))
            except Damaged as err:
                raise APIError(409, f"snapshot {snapshot_id} is damaged: {err}", code="snapshot_damaged") from err
        self._apply_counters(stream, snap.counters)
        s.stream, s.last_used, s.damage = stream, time.time(), None
        if self.store is not None:
            s.seq += 1
            self.store.write_state(s.id, stream, s.seq)
        else:
            s.dirty = True

    def delete(self, session_id: str) -> None:
        s = self._get(session_id)
        with self._lock:
            del self._sessions[s.id]
        if self.store is not None:
            self.store.delete(s.id)

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Unload (with a state directory) or delete (without) sessions idle past the limit; returns their ids."""
        timeout = self.config.session_idle_timeout
        if timeout is None:
            return []
        now = time.time() if now is None else now
        with self._lock:
            idle = [s for s in self._sessions.values() if s.stream is not None and now - s.last_used > timeout]
        for s in idle:
            if self.store is None:
                self.delete(s.id)
            else:
                self._save(s)
                s.stream = None
        return [s.id for s in idle]

    def save_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            if s.dirty and s.stream is not None and self.store is not None:
                self._save(s)

    def load_index(self) -> None:
        """List the sessions saved in the state directory (their states load, and are verified, on first use)."""
        if self.store is None:
            return
        fingerprint = self.engine.model.config.fingerprint()
        for sidecar in self.store.sidecars():
            try:
                meta = json.loads(sidecar.read_text())
                if meta.get("format") != SIDECAR_FORMAT or not SESSION_ID.match(meta["id"]):
                    raise ValueError("not a session sidecar")
                s = ServedSession(
                    meta["id"], meta["created"], meta["system_prompt"], meta["frame_size"], meta["last_used"]
                )
                s.snapshots = [Snapshot(x["id"], x["created"], x["counters"]) for x in meta["snapshots"]]
            except Exception as err:
                log.warning("skipping %s: %s", sidecar.name, err)
                continue
            try:
                saved = InfiniteVLState.read_metadata(self.store.state_path(s.id))
                if json.loads(saved["fingerprint"]) != fingerprint:
                    log.warning("skipping session %s: saved for a different model", s.id)
                    continue
                s.counters = self._stored_counters(self.store.counters(s.id))
            except Damaged as err:
                s.damage = str(err)
                log.error("session %s is damaged: %s", s.id, err)
            except Exception as err:
                s.damage = f"{s.id}.safetensors cannot be read ({type(err).__name__})"
                log.error("session %s is damaged: %s", s.id, err)
            with self._lock:
                self._sessions[s.id] = s
        log.info("%d saved sessions found in %s", len(self._sessions), self.store.root)

    # -- internals -------------------------------------------------------------------------------------------------
    def _get(self, session_id: str) -> ServedSession:
        with self._lock:
            s = self._sessions.get(session_id) if SESSION_ID.match(session_id) else None
        if s is None:
            raise APIError(404, f"no session {session_id!r}", code="session_not_found")
        return s

    def _mutate(self, session_id: str, change: Callable[[StreamSession], object]) -> Generator:
        s = self._get(session_id)
        stream = self._load(s)
        if self._backup is None:
            self._backup = self.engine.model.new_state(1)
        self._backup.copy_(stream.state)
        segment, stats = copy.copy(stream.segment), copy.deepcopy(stream.stats)
        try:
            result = change(stream)
            if inspect.isgenerator(result):
                result = yield from result
            self._commit(s, stream)
        except BaseException as err:
            stream.state.copy_(self._backup)
            stream.segment, stream.stats = segment, stats
            if isinstance(err, MediaError):
                raise APIError(400, str(err), code="invalid_media") from err
            if isinstance(err, OSError):
                log.error("session %s: the change could not be saved: %s", s.id, err)
                raise APIError(507, "the change could not be saved (the state directory is not writable or full); "
                               "the session is as before it", code="state_write_failed") from err  # fmt: skip
            raise
        s.last_used = time.time()
        return result

    def _commit(self, s: ServedSession, stream: StreamSession) -> None:
        """Make the change durable before it is acknowledged (as the durability setting says)."""
        mode = self.config.durability
        if self.store is None or mode == "none":
            s.dirty = True
            return
        t0 = time.perf_counter()
        s.seq += 1
        if mode == "full" or self.store.journal_bytes(s.id) >= self.store.state_bytes(s.id):
            self.store.write_state(s.id, stream, s.seq)
        else:
            self.store.append(s.id, stream, self._backup, s.seq)
        if self.metrics is not None:
            self.metrics.session_write_seconds.observe(time.perf_counter() - t0)

    def _load(self, s: ServedSession) -> StreamSession:
        if s.damage is not None:
            raise _damaged(s)
        if s.stream is None:
            try:
                s.stream, s.seq = self.store.read(s.id, self.store.state_path(s.id), self._restorer(s))
            except Damaged as err:
                s.damage = str(err)
                log.error("session %s is damaged: %s", s.id, err)
                raise _damaged(s) from err
        return s.stream

    def _restorer(self, s: ServedSession) -> Callable:
        e = self.engine

        def restore(path):
            size = (s.frame_size, s.frame_size)
            return StreamSession.restore(path, e.model, e.processor, frame_size=size, chunk_size=e.chunk_size)

        return restore

    def _new_stream(self, system_prompt: str | None, size: int) -> StreamSession:
        return self.engine.session(system_prompt, frame_size=(size, size))

    @staticmethod
    def _apply_counters(stream: StreamSession, counters: dict) -> None:
        st = stream.stats
        for k in STREAM_COUNTERS:
            if k in counters:
                setattr(st, k, counters[k])
        st.tokens, st.state_bytes = int(stream.state.num_tokens[0]), stream.state.nbytes

    def _stored_counters(self, meta: dict) -> dict:
        counters = json.loads(meta.get("counters", "{}"))
        return {**counters, "tokens": int(meta.get("tokens", 0)), "state_bytes": self._state_nbytes}

    def _counters(self, s: ServedSession) -> dict:
        if s.stream is None:
            return dict(s.counters)
        stats = s.stream.stats.as_dict()
        return {k: stats[k] for k in COUNTERS}

    def _snapshot_info(self, s: ServedSession, snap: Snapshot) -> dict:
        return {
            "id": snap.id,
            "session_id": s.id,
            "created": snap.created,
            "tokens": snap.counters["tokens"],
            "frames": snap.counters["frames"],
        }

    def _save(self, s: ServedSession) -> None:
        """The whole state file, then the sidecar (unloading, shutdown)."""
        if s.stream is not None and s.damage is None:
            s.seq += 1
            self.store.write_state(s.id, s.stream, s.seq)
            s.counters, s.dirty = self._counters(s), False
        self._write_sidecar(s)

    def _write_sidecar(self, s: ServedSession) -> None:
        self.store.write_sidecar(
            s.id,
            {
                "format": SIDECAR_FORMAT,
                "id": s.id,
                "created": s.created,
                "last_used": s.last_used,
                "system_prompt": s.system_prompt,
                "frame_size": s.frame_size,
                "snapshots": [{"id": x.id, "created": x.created, "counters": x.counters} for x in s.snapshots],
            },
        )


def _damaged(s: ServedSession) -> APIError:
    return APIError(
        409,
        f"session {s.id} is damaged ({s.damage}); restore one of its snapshots or delete it",
        code="session_damaged",
        headers=NO_RETRY,
    )
