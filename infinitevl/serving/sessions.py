"""Streaming sessions held by the server: a registry with limits, persistence in a state directory, snapshots.

A served session is a `StreamSession` plus what the server keeps around it (id, times, settings, snapshots). Every
method that changes a session or runs the model is called on the scheduler's worker thread (the app submits them
as tasks), so they never race with each other or with generation; `info` and `ids` only read and may run anywhere.

- A failing request leaves the session bit-identical: `_mutate` copies the state into a preallocated backup
  before a change and copies it back on any error. (Media is decoded before the state is touched anyway; this
  also covers a failure half way through a prefill, such as running out of memory.)
- With a state directory, a session is its state file (`StreamSession.save`, which keeps the open frame segment)
  plus a JSON sidecar (settings, counters, snapshots). Both are written when the session is created, snapshotted
  or unloaded after idling, and when the server stops; at start-up every session found there is listed again and
  loaded on first use. A crash loses what happened since the last write.
- At most `max_sessions` sessions exist (in memory or on disk). A session unused for `session_idle_timeout`
  seconds leaves memory: saved and unloaded with a state directory (its next use loads it back), deleted without.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..engine.generation import prefill
from ..engine.session import StreamSession
from ..processing.media import MediaError, VideoFrames
from ..state import InfiniteVLState, StateError
from .config import ServerConfig
from .errors import APIError

log = logging.getLogger("infinitevl.serving")
SESSION_ID = re.compile(r"^sess_[0-9a-f]{24}$")
SNAPSHOT_ID = re.compile(r"^snap_[0-9a-f]{16}$")
SIDECAR_FORMAT = "infinitevl-session/1"
COUNTERS = ("tokens", "frames", "images", "videos", "questions", "state_bytes", "ingest_seconds")


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
    counters: dict = field(default_factory=dict)  # as of the last save (for unloaded sessions)
    snapshots: list[Snapshot] = field(default_factory=list)
    dirty: bool = False  # changed since the last save


class SessionRegistry:
    def __init__(self, engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.dir = config.state_dir
        self._sessions: dict[str, ServedSession] = {}
        self._lock = threading.Lock()  # guards the dict against readers on other threads
        self._backup: InfiniteVLState | None = None

    # -- reading (any thread) --------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def loaded_count(self) -> int:
        with self._lock:
            return sum(s.stream is not None for s in self._sessions.values())

    def info(self, session_id: str) -> dict:
        s = self._get(session_id)
        stream = s.stream
        if stream is not None:
            st = stream.stats
            counters = {**st.as_dict(), "fps": st.recent_fps}
        else:
            counters = {**s.counters, "fps": 0.0, "tokens_per_second": 0.0}
        return {
            "id": s.id,
            "created": s.created,
            "last_used": s.last_used,
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
                429,
                f"the session limit ({self.config.max_sessions}) is reached; delete a session first",
                code="session_limit",
            )
        size = frame_size or self.config.frame_size
        now = time.time()
        s = ServedSession("sess_" + secrets.token_hex(12), now, system_prompt or None, size, now)
        s.stream = self.engine.session(system_prompt or None, frame_size=(size, size))
        with self._lock:
            self._sessions[s.id] = s
        self._save(s)
        return s.id

    def append_frames(self, session_id: str, frames: list[tuple[Image.Image, float]]) -> tuple[int, int]:
        """Live frames with their timestamps, all or nothing. Returns (frames, tokens) appended."""
        return len(frames), self._mutate(session_id, lambda st: sum(st.append_frame(f, t) for f, t in frames))

    def append_video(self, session_id: str, video: VideoFrames, offset: float | None) -> tuple[int, int]:
        """A decoded video chunk as live frames; by default its clock starts just after the last frame."""

        def run(stream: StreamSession) -> int:
            start = offset
            if start is None:
                seg = stream.segment
                start = seg.last_time + 1.0 / video.fps if seg is not None else 0.0
            first = video.timestamps[0]
            return sum(stream.append_frame(f, start + t - first) for f, t in zip(video.frames, video.timestamps))

        return len(video.frames), self._mutate(session_id, run)

    def append_text(self, session_id: str, text: str) -> tuple[int, int]:
        return 0, self._mutate(session_id, lambda st: st.append_text(text))

    def branch(self, session_id: str, row: InfiniteVLState, question: str) -> torch.Tensor:
        """Copy the session's state into `row` and prefill the question there (as `StreamSession.ask` does on a
        clone): the answer is generated from the branch and the session itself is untouched."""
        s = self._get(session_id)
        stream = self._load(s)
        c = self.engine.model.config
        ids = [c.vision_end_token_id] if stream.segment is not None else []
        ids += self.engine.processor.tokenize(f"{question}<|im_end|>\n<|im_start|>assistant\n")
        row.copy_(stream.state)
        logits = prefill(self.engine.model, row, torch.tensor([ids]), chunk_size=self.engine.chunk_size)
        stream.stats.questions += 1
        s.last_used, s.dirty = time.time(), True
        return logits

    def snapshot(self, session_id: str) -> dict:
        s = self._get(session_id)
        stream = self._load(s)
        snap = Snapshot("snap_" + secrets.token_hex(8), time.time(), self._counters(s))
        if self.dir is None:
            snap.state, snap.segment = stream.state.clone(), copy.copy(stream.segment)
        else:
            stream.save(self._snapshot_path(s.id, snap.id))
        s.snapshots.append(snap)
        while len(s.snapshots) > self.config.max_snapshots:
            old = s.snapshots.pop(0)
            if self.dir is not None:
                self._snapshot_path(s.id, old.id).unlink(missing_ok=True)
        s.last_used = time.time()
        self._save(s)  # the session's own file too, so that its sidecar and state agree
        return self._snapshot_info(s, snap)

    def restore(self, session_id: str, snapshot_id: str) -> None:
        s = self._get(session_id)
        snap = next((x for x in s.snapshots if x.id == snapshot_id), None)
        if snap is None:
            raise APIError(404, f"session {session_id} has no snapshot {snapshot_id!r}", code="snapshot_not_found")
        stream = self._load(s)
        if snap.state is not None:
            stream.state.copy_(snap.state)
            stream.segment = copy.copy(snap.segment)
        else:
            stream = self._read_stream(s, self._snapshot_path(s.id, snap.id))  # loaded first, swapped after
        self._apply_counters(stream, snap.counters)
        s.stream, s.last_used, s.dirty = stream, time.time(), True

    def delete(self, session_id: str) -> None:
        s = self._get(session_id)
        with self._lock:
            del self._sessions[s.id]
        if self.dir is not None:
            for path in (self._state_path(s.id), self._sidecar_path(s.id)):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.dir / "snapshots" / s.id, ignore_errors=True)

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Unload (with a state directory) or delete (without) sessions idle past the limit; returns their ids."""
        timeout = self.config.session_idle_timeout
        if timeout is None:
            return []
        now = time.time() if now is None else now
        with self._lock:
            idle = [s for s in self._sessions.values() if s.stream is not None and now - s.last_used > timeout]
        for s in idle:
            if self.dir is None:
                self.delete(s.id)
            else:
                self._save(s)
                s.stream = None
        return [s.id for s in idle]

    def save_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            if s.dirty:
                self._save(s)

    def load_index(self) -> None:
        """List the sessions saved in the state directory (their states load on first use)."""
        if self.dir is None:
            return
        fingerprint = self.engine.model.config.fingerprint()
        for sidecar in sorted((self.dir / "sessions").glob("sess_*.json")):
            try:
                meta = json.loads(sidecar.read_text())
                if meta.get("format") != SIDECAR_FORMAT or not SESSION_ID.match(meta["id"]):
                    raise ValueError("not a session sidecar")
                saved = InfiniteVLState.read_metadata(self._state_path(meta["id"]))
                if json.loads(saved["fingerprint"]) != fingerprint:
                    raise ValueError("saved for a different model")
            except Exception as err:
                log.warning("skipping saved session %s: %s", sidecar.name, err)
                continue
            s = ServedSession(
                meta["id"],
                meta["created"],
                meta["system_prompt"],
                meta["frame_size"],
                meta["last_used"],
                counters=meta["counters"],
            )
            s.snapshots = [Snapshot(x["id"], x["created"], x["counters"]) for x in meta["snapshots"]]
            with self._lock:
                self._sessions[s.id] = s
        log.info("%d saved sessions found in %s", len(self._sessions), self.dir)

    # -- internals -------------------------------------------------------------------------------------------------
    def _get(self, session_id: str) -> ServedSession:
        with self._lock:
            s = self._sessions.get(session_id) if SESSION_ID.match(session_id) else None
        if s is None:
            raise APIError(404, f"no session {session_id!r}", code="session_not_found")
        return s

    def _mutate(self, session_id: str, change: Callable[[StreamSession], int]) -> int:
        s = self._get(session_id)
        stream = self._load(s)
        if self._backup is None:
            self._backup = self.engine.model.new_state(1)
        self._backup.copy_(stream.state)
        segment, stats = copy.copy(stream.segment), copy.deepcopy(stream.stats)
        try:
            result = change(stream)
        except BaseException as err:
            stream.state.copy_(self._backup)
            stream.segment, stream.stats = segment, stats
            if isinstance(err, MediaError):
                raise APIError(400, str(err), code="invalid_media") from err
            raise
        s.last_used, s.dirty = time.time(), True
        return result

    def _load(self, s: ServedSession) -> StreamSession:
        if s.stream is None:
            s.stream = self._read_stream(s, self._state_path(s.id))
            self._apply_counters(s.stream, s.counters)
        return s.stream

    def _read_stream(self, s: ServedSession, path: Path) -> StreamSession:
        e = self.engine
        try:
            return StreamSession.restore(
                path, e.model, e.processor, frame_size=(s.frame_size, s.frame_size), chunk_size=e.chunk_size
            )
        except (OSError, StateError) as err:
            raise APIError(
                500, f"session {s.id} cannot be read from {path.name}: {err}", code="state_unreadable"
            ) from err

    @staticmethod
    def _apply_counters(stream: StreamSession, counters: dict) -> None:
        st = stream.stats
        st.images, st.videos = counters.get("images", 0), counters.get("videos", 0)
        st.questions, st.frames = counters.get("questions", 0), counters.get("frames", st.frames)
        st.ingest_seconds = counters.get("ingest_seconds", 0.0)
        st.tokens, st.state_bytes = int(stream.state.num_tokens[0]), stream.state.nbytes

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
        """State file first, then the sidecar that describes it (each written to a temporary name and renamed)."""
        if self.dir is None:
            return
        if s.stream is not None:
            s.stream.save(self._state_path(s.id))
            s.counters, s.dirty = self._counters(s), False
        meta = {
            "format": SIDECAR_FORMAT,
            "id": s.id,
            "created": s.created,
            "last_used": s.last_used,
            "system_prompt": s.system_prompt,
            "frame_size": s.frame_size,
            "counters": s.counters,
            "snapshots": [{"id": x.id, "created": x.created, "counters": x.counters} for x in s.snapshots],
        }
        path = self._sidecar_path(s.id)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(path)

    def _state_path(self, session_id: str) -> Path:
        return self.dir / "sessions" / f"{session_id}.safetensors"

    def _sidecar_path(self, session_id: str) -> Path:
        return self.dir / "sessions" / f"{session_id}.json"

    def _snapshot_path(self, session_id: str, snapshot_id: str) -> Path:
        return self.dir / "snapshots" / session_id / f"{snapshot_id}.safetensors"
