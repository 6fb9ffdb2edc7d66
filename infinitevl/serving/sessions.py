"""Streaming sessions held by the server: a registry with limits, durable persistence, snapshots.

A served session is a `StreamSession` plus what the server keeps around it (id, times, settings, snapshots). Every
method that changes a session or runs the model is called on the scheduler's worker thread (the app submits them
as tasks; appends are generators that yield after each frame or prefill chunk, so decoding goes on between them);
`info` and `ids` only read and may run anywhere.

- A failing request leaves the session bit-identical: `_mutate` copies the state into a preallocated backup
  before a change and copies it back on any error (a bad frame half way through a video, a failed write).
- With a state directory (store.py), a change is made durable before it is acknowledged: by default a journal
  record of what it wrote, fsynced (`durability="journal"`); or the whole state file (`"full"`); or, with
  `"none"`, only on create, snapshot, idle unloading and shutdown. A change whose write fails is answered 507 and
  leaves both the session and its files as before (its sequence number is not used up). At start-up every session
  found there is listed again and its files are checked (then loaded again on first use): a session whose files
  fail their checks, or hold fewer changes than were acknowledged, is reported as damaged by `info` and the
  server's health from then on, and refused until it is restored from a snapshot or deleted.
- `config.state_shared` (replicas of one deployment on one state directory, ray_deploy.py): a session is owned by
  one replica at a time, the one holding its lock (store.py) while it is in memory; any replica finds any session
  on disk, takes its lock (asking the holder to hand it over, `release_requested`) and reads it back with every
  acknowledged change. A created session is written and released at once: its first use loads it where the
  router sends its requests.
- At most `max_sessions` sessions exist (in memory or on disk). A session unused for `session_idle_timeout`
  seconds leaves memory: saved and unloaded with a state directory (its next use loads it back), deleted without.
"""

from __future__ import annotations

import contextlib
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
from ..engine.session import StreamSession, frames_per_step_for, held_frames
from ..processing.media import MediaError, VideoFrames
from ..state import InfiniteVLState
from .config import ServerConfig
from .errors import APIError
from .prefill import text_steps
from .store import Damaged, FileLock, SessionStore, StoreBusy

log = logging.getLogger("infinitevl.serving")
SESSION_ID = re.compile(r"^sess_[0-9a-f]{24}$")
SIDECAR_FORMAT = "infinitevl-session/3"  # /3: the settings file has a checksum and the journal an ack file
OLD_FORMATS = ("infinitevl-session/2",)
HANDOFF_WAIT = 20.0  # seconds a replica waits for another to hand a session over
COUNTERS = ("tokens", "frames", "images", "videos", "questions", "state_bytes", "ingest_seconds")
NO_RETRY = {"x-should-retry": "false"}  # the openai client would otherwise retry a 409


@dataclass
class Snapshot:
    id: str
    created: float
    counters: dict
    state: InfiniteVLState | None = None  # kept in memory when there is no state directory
    segment: object = None
    held: tuple = ()  # frames held for their step (in memory; on disk they are in the state file)


@dataclass
class FrameTicket:
    """realtime sessions: a frame upload waiting for its turn; a newer upload drops it."""

    frames: int
    dropped: bool = False


@dataclass
class ServedSession:
    id: str
    created: float
    system_prompt: str | None
    frame_size: int
    last_used: float
    stream: StreamSession | None = None  # None: on disk until its next use
    pair_frames: bool = False  # live frames two per temporal step
    frames_per_step: int = 1  # live frames per prefill (a whole number of temporal steps)
    realtime: bool = False  # a newer frame upload replaces one still waiting
    frames_dropped: int = 0  # realtime: frames replaced before their turn (since the server started)
    waiting: FrameTicket | None = None  # realtime: the frame upload waiting for its turn
    counters: dict = field(default_factory=dict)  # as of the last write (for unloaded sessions)
    snapshots: list[Snapshot] = field(default_factory=list)
    dirty: bool = False  # changed since the last write
    seq: int = 0  # journal records written
    damage: str | None = None
    lock: FileLock | None = None  # held while in memory, with a shared state directory
    fold: bool = False  # a failed write may have left the journal untidy: the next change writes the state file


class SessionRegistry:
    def __init__(self, engine, config: ServerConfig, metrics=None):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.shared = config.state_dir is not None and config.state_shared
        self.store = SessionStore(config.state_dir, shared=self.shared) if config.state_dir is not None else None
        self._sessions: dict[str, ServedSession] = {}
        self._lock = threading.Lock()  # guards the dict against readers on other threads
        self._backup: InfiniteVLState | None = None
        self._state_nbytes = engine.model.new_state(1).nbytes

    # -- reading (any thread) --------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        if self.shared:  # other replicas create sessions too (listed once their settings are written)
            return [sid for sid in self.store.session_ids() if self.store.sidecar_path(sid).exists()]
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
            counters["pending_frames"] = stream.stats.pending_frames
        else:
            if self.shared and s.damage is None:  # another replica may have changed it since
                with contextlib.suppress(OSError, Damaged, ValueError):  # damage is found when it is loaded
                    s.counters = self._stored_counters(self.store.counters(s.id))
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
            "pair_frames": s.pair_frames,
            "frames_per_step": s.frames_per_step,
            "realtime": s.realtime,
            "frames_dropped": s.frames_dropped,
            **{k: counters.get(k, 0) for k in (*COUNTERS, "fps", "tokens_per_second", "pending_frames")},
            "snapshots": [self._snapshot_info(s, snap) for snap in s.snapshots],
        }

    # -- changing (worker thread) ----------------------------------------------------------------------------------
    def create(
        self,
        system_prompt: str | None,
        frame_size: int | None,
        pair_frames: bool = False,
        realtime: bool = False,
        frames_per_step: int | None = None,
    ) -> str:
        count = len(self.store.session_ids()) if self.shared else len(self._sessions)
        if count >= self.config.max_sessions:
            raise APIError(
                403,
                f"the session limit ({self.config.max_sessions}) is reached; delete a session "
                "(DELETE /v1/sessions/{id}) or start the server with a higher --max-sessions",
                code="session_limit",
            )
        size = frame_size or self.config.frame_size
        now = time.time()
        s = ServedSession("sess_" + secrets.token_hex(12), now, system_prompt or None, size, now)
        s.pair_frames, s.realtime = pair_frames, realtime
        s.frames_per_step = frames_per_step_for(frames_per_step, pair_frames)
        s.stream = self._new_stream(system_prompt or None, size, pair_frames, s.frames_per_step)
        if self.store is not None:
            if self.shared:
                s.lock = self.store.lock_session(s.id)
            self.store.write_state(s.id, s.stream, 0)
            self._write_sidecar(s)
            if self.shared:  # its requests may be routed to another replica: on disk until its first use
                s.counters, s.stream = self._counters(s), None
                s.lock.release()
                s.lock = None
        with self._lock:
            self._sessions[s.id] = s
        return s.id

    def arrive(self, session_id: str, frames: int) -> FrameTicket | None:
        """realtime sessions: a frame upload takes the waiting place; the one waiting there is dropped."""
        s = self._get(session_id)
        if not s.realtime:
            return None
        ticket = FrameTicket(frames)
        with self._lock:
            if s.waiting is not None:
                s.waiting.dropped = True
                s.frames_dropped += s.waiting.frames
            s.waiting = ticket
        return ticket

    def leave(self, session_id: str, ticket: FrameTicket | None) -> None:
        """The upload is done (or withdrawn): it no longer waits."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None and s.waiting is ticket:
                s.waiting = None

    def append_frames(
        self, session_id: str, frames: list[tuple[Image.Image, float]], ticket: FrameTicket | None = None
    ) -> Generator:
        """Live frames with their timestamps, all or nothing, one frame per step. Returns (frames, tokens); (0, 0)
        for a realtime upload a newer one replaced while it waited (the session is not touched)."""
        if ticket is not None:
            with self._lock:
                if ticket.dropped:
                    return 0, 0
                self._sessions[session_id].waiting = None  # its turn: a newer upload now waits behind it

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
            snap.state, snap.segment, snap.held = stream.state.clone(), copy.copy(stream.segment), stream.held
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
            stream.segment, stream.held = copy.copy(snap.segment), snap.held
            stream.stats.pending_frames = len(snap.held)
        else:
            self._own(s)
            try:  # loaded first, swapped after
                stream, _ = self.store.read(s.id, self.store.snapshot_path(s.id, snap.id), self._restorer(s))
            except Damaged as err:
                raise APIError(409, f"snapshot {snapshot_id} is damaged: {err}", code="snapshot_damaged") from err
        self._apply_counters(stream, snap.counters)
        if self.store is not None:
            self.store.write_state(s.id, stream, s.seq + 1)
            s.seq += 1
        else:
            s.dirty = True
        s.stream, s.last_used, s.damage, s.fold = stream, time.time(), None, False

    def delete(self, session_id: str) -> None:
        s = self._get(session_id)
        if self.shared:
            self._own(s)
        with self._lock:
            del self._sessions[s.id]
        if self.store is not None:
            self.store.delete(s.id)
            if s.lock is not None:
                self.store.delete_lock(s.id)
                s.lock.release()

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
                self._unload(s)
        return [s.id for s in idle]

    def save_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            if s.stream is not None and self.store is not None and (s.dirty or self.shared):
                self._unload(s)

    def close(self) -> None:
        """Give up the state directory (after `save_all`)."""
        if self.store is not None:
            self.store.close()

    def release_requested(self) -> list[str]:
        """Replicas: save and unload the sessions another replica asked for (their requests now go there)."""
        with self._lock:
            held = [s for s in self._sessions.values() if s.lock is not None]
        released = [s for s in held if self.store.handoff_requested(s.id)]
        for s in released:
            self._unload(s)
        return [s.id for s in released]

    def load_index(self) -> None:
        """List the sessions saved in the state directory and check their files (damage is reported from now on,
        not found on first use). Replicas check the sessions no other replica holds."""
        if self.store is None:
            return
        for sid in self.store.session_ids():
            lock = None
            if self.shared:
                try:
                    lock = self.store.lock_session(sid)
                except StoreBusy:
                    continue  # held (and checked) by a live replica
            try:
                s = self._from_disk(sid, verify=True)
            finally:
                if lock is not None:
                    lock.release()
            if s is not None:
                with self._lock:
                    self._sessions[s.id] = s
        log.info("%d saved sessions found in %s", len(self._sessions), self.store.root)

    # -- internals -------------------------------------------------------------------------------------------------
    def _get(self, session_id: str) -> ServedSession:
        with self._lock:
            s = self._sessions.get(session_id) if SESSION_ID.match(session_id) else None
        if s is None and self.shared and SESSION_ID.match(session_id):  # created by another replica
            s = self._from_disk(session_id, owned=False)
            if s is not None:
                with self._lock:
                    s = self._sessions.setdefault(s.id, s)
        if s is None:
            raise APIError(404, f"no session {session_id!r}", code="session_not_found")
        return s

    def _from_disk(self, sid: str, verify: bool = False, owned: bool = True) -> ServedSession | None:
        """A session as its files describe it (unloaded), damaged if they fail their checks; with `verify`, its
        state and journal are read through. None: not a session (a create that never finished, whose files are
        removed if this process owns the session, or another model)."""
        store = self.store
        try:
            meta = store.read_sidecar(sid)
            if meta.get("format") not in (SIDECAR_FORMAT, *OLD_FORMATS) or meta.get("id") != sid:
                raise Damaged(f"{sid}.json is not a session's settings file")
            if meta["format"] == SIDECAR_FORMAT and "checksum" not in json.loads(store.sidecar_path(sid).read_text()):
                raise Damaged(f"{sid}.json has lost its checksum")
            s = ServedSession(sid, meta["created"], meta["system_prompt"], meta["frame_size"], meta["last_used"])
            s.pair_frames, s.realtime = bool(meta.get("pair_frames")), bool(meta.get("realtime"))
            try:
                s.frames_per_step = frames_per_step_for(meta.get("frames_per_step"), s.pair_frames)
            except ValueError as err:
                raise Damaged(f"{sid}.json: {err}") from None
            s.snapshots = [Snapshot(x["id"], x["created"], x["counters"]) for x in meta["snapshots"]]
        except (Damaged, KeyError, TypeError) as err:
            if not store.sidecar_path(sid).exists() and not store.journal_bytes(sid) and not _acked(store, sid):
                if owned:  # (not owned: another replica may be creating it right now)
                    log.warning("session %s: removing the files of a create that never finished", sid)
                    store.delete(sid)
                return None
            s = ServedSession(sid, 0.0, None, self.config.frame_size, 0.0)
            s.damage = str(err) if isinstance(err, Damaged) else f"{sid}.json lacks {err}"
            log.error("session %s is damaged: %s", sid, s.damage)
            return s
        try:
            if meta["format"] == SIDECAR_FORMAT and not store.ack_path(sid).exists():
                raise Damaged(f"{sid}.ack (the number of acknowledged changes) is missing")
            saved = InfiniteVLState.read_metadata(store.state_path(sid))
            if json.loads(saved["fingerprint"]) != self.engine.model.config.fingerprint():
                log.warning("skipping session %s: saved for a different model", sid)
                return None
            if verify:
                stream, _ = store.read(sid, store.state_path(sid), self._restorer(s))
                s.counters = self._counters_of(stream)
            else:
                s.counters = self._stored_counters(store.counters(sid))
        except Damaged as err:
            s.damage = str(err)
        except Exception as err:
            s.damage = f"{sid}.safetensors cannot be read ({type(err).__name__})"
        if s.damage is not None:
            log.error("session %s is damaged: %s", sid, s.damage)
        return s

    def _mutate(self, session_id: str, change: Callable[[StreamSession], object]) -> Generator:
        s = self._get(session_id)
        stream = self._load(s)
        if self._backup is None:
            self._backup = self.engine.model.new_state(1)
        self._backup.copy_(stream.state)
        segment, stats, held = copy.copy(stream.segment), copy.deepcopy(stream.stats), stream.held
        try:
            result = change(stream)
            if inspect.isgenerator(result):
                result = yield from result
            try:
                self._commit(s, stream)
            except OSError:
                s.fold = True
                raise
        except BaseException as err:
            stream.state.copy_(self._backup)
            stream.segment, stream.stats, stream.held = segment, stats, held
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
        seq = s.seq + 1  # used up only once written: a failed write leaves the files as they were
        if mode == "full" or s.fold or self.store.journal_bytes(s.id) >= self.store.state_bytes(s.id):
            self.store.write_state(s.id, stream, seq)
            s.fold = False
        else:
            self.store.append(s.id, stream, self._backup, seq)
        s.seq = seq
        if self.metrics is not None:
            self.metrics.session_write_seconds.observe(time.perf_counter() - t0)

    def _load(self, s: ServedSession) -> StreamSession:
        if s.damage is not None:
            raise _damaged(s)
        if s.stream is None:
            self._own(s)
            if s.damage is not None:
                raise _damaged(s)
            try:
                s.stream, s.seq = self.store.read(s.id, self.store.state_path(s.id), self._restorer(s))
            except Damaged as err:
                s.damage = str(err)
                log.error("session %s is damaged: %s", s.id, err)
                raise _damaged(s) from err
        return s.stream

    def _own(self, s: ServedSession) -> None:
        """Replicas: hold the session's lock (asking its holder to hand it over), then take its settings as they
        are on disk now (another replica may have changed them since)."""
        if not self.shared or s.lock is not None:
            return
        try:
            s.lock = self.store.lock_session(s.id)
        except StoreBusy:
            self.store.request_handoff(s.id)
            try:
                s.lock = self.store.lock_session(s.id, timeout=HANDOFF_WAIT)
            except StoreBusy:
                raise APIError(
                    503, f"session {s.id} is held by another replica that did not hand it over; retry",
                    code="session_busy", headers={"Retry-After": "1"},
                ) from None  # fmt: skip
        self.store.clear_handoff(s.id)
        fresh = self._from_disk(s.id)
        if fresh is None:
            s.lock.release()
            s.lock = None
            with self._lock:
                self._sessions.pop(s.id, None)
            raise APIError(404, f"no session {s.id!r}", code="session_not_found")
        s.system_prompt, s.frame_size, s.snapshots = fresh.system_prompt, fresh.frame_size, fresh.snapshots
        s.pair_frames, s.realtime, s.frames_per_step = fresh.pair_frames, fresh.realtime, fresh.frames_per_step
        s.counters, s.damage, s.stream, s.fold = fresh.counters, fresh.damage, None, False

    def _unload(self, s: ServedSession) -> None:
        """Save and leave memory (and, on a replica, let go of the session)."""
        self._save(s)
        s.stream = None
        if s.lock is not None:
            s.lock.release()
            s.lock = None

    def _restorer(self, s: ServedSession) -> Callable:
        e = self.engine

        def restore(path):
            size = (s.frame_size, s.frame_size)
            return StreamSession.restore(
                path,
                e.model,
                e.processor,
                frame_size=size,
                chunk_size=e.chunk_size,
                pair_frames=s.pair_frames,
                frames_per_step=s.frames_per_step,
            )

        return restore

    def _new_stream(
        self, system_prompt: str | None, size: int, pair_frames: bool = False, frames_per_step: int | None = None
    ) -> StreamSession:
        return self.engine.session(
            system_prompt, frame_size=(size, size), pair_frames=pair_frames, frames_per_step=frames_per_step
        )

    @staticmethod
    def _apply_counters(stream: StreamSession, counters: dict) -> None:
        st = stream.stats
        for k in STREAM_COUNTERS:
            if k in counters:
                setattr(st, k, counters[k])
        st.tokens, st.state_bytes = int(stream.state.num_tokens[0]), stream.state.nbytes

    def _counters_of(self, stream: StreamSession) -> dict:
        stats = stream.stats.as_dict()
        return {**{k: stats[k] for k in COUNTERS}, "pending_frames": stats["pending_frames"]}

    def _stored_counters(self, meta: dict) -> dict:
        counters = json.loads(meta.get("counters", "{}"))
        held = len(held_frames(meta))  # frames waiting for the rest of their step
        return {
            **counters,
            "tokens": int(meta.get("tokens", 0)),
            "state_bytes": self._state_nbytes,
            "pending_frames": held,
        }

    def _counters(self, s: ServedSession) -> dict:
        return dict(s.counters) if s.stream is None else self._counters_of(s.stream)

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
        if s.damage is not None:
            return  # its files stay as they are, to be restored from a snapshot or deleted
        if s.stream is not None:
            self.store.write_state(s.id, s.stream, s.seq + 1)
            s.seq += 1
            s.counters, s.dirty, s.fold = self._counters(s), False, False
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
                "pair_frames": s.pair_frames,
                "frames_per_step": s.frames_per_step,
                "realtime": s.realtime,
                "snapshots": [{"id": x.id, "created": x.created, "counters": x.counters} for x in s.snapshots],
            },
        )


def _acked(store: SessionStore, sid: str) -> bool:
    """Whether any change of the session past its creation was acknowledged (or its ack file is unreadable)."""
    try:
        return bool(store.read_ack(sid))
    except Damaged:
        return True


def _damaged(s: ServedSession) -> APIError:
    return APIError(
        409,
        f"session {s.id} is damaged ({s.damage}); restore one of its snapshots or delete it",
        code="session_damaged",
        headers=NO_RETRY,
    )
