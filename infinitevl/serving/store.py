"""Sessions on disk: durable writes, checksums, and a journal of what each acknowledged change wrote.

Layout of a state directory: `sessions/<id>.json` (settings and snapshot list, with a SHA-256 of its content),
`sessions/<id>.safetensors` (the state, with its segment, counters and the journal sequence number it includes),
`sessions/<id>.journal` (changes since), `sessions/<id>.ack` (the number of the last acknowledged change),
`snapshots/<id>/<snap>.safetensors`, and `owner.lock` / `sessions/<id>.lock` (who may write). Every file but the
journal and the ack is written to a temporary name, fsynced, renamed and its folder fsynced, so a crash leaves either
the old file or the new one; folders are fsynced into their parents when created. State files carry a SHA-256 of
their tensors (`InfiniteVLState.save`); journal records and ack slots carry one of their bytes.

Ownership: one server owns a directory (an exclusive `flock` on `owner.lock`, held while it runs; a second server is
refused). Replicas of one deployment share it (a shared `flock`, which still refuses a lone server) and own sessions
one at a time instead: an exclusive `flock` on the session's lock file, held while it is in memory. A `flock` is
released by the kernel when its holder dies, so a killed replica's sessions are free at once and two live writers
of one session are impossible.

A journal record holds what one change wrote: the whole recurrent state of every Gated DeltaNet layer (its memory
changes with every token) and, of the sliding-window layers, only the ring-buffer slots written (for a frame of 256
tokens, 256 of the window's slots), plus the stream counters and segment. Records are numbered; the state file names
the last number it includes, so a crash between writing a new state file and emptying the journal replays nothing
twice. A write that fails (a full disk, an I/O error) is cut back off the journal, so the journal never holds a
change that was not acknowledged in front of one that was.

After each record, its number is written to the ack file (two checksummed slots, written alternately in place, so
a torn write leaves the other): the journal must reach that number. Reading back: the state file, then every record
after it. Invalid bytes at the end of the journal (a write that a crash cut short, or zeros from out-of-order
writeback) are dropped with a warning when they hold nothing past the acknowledged number: that change was never
acknowledged. A journal that ends before the acknowledged number (truncated, deleted), or damage to an acknowledged
record, makes the session damaged (`Damaged`), never silently used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..engine.session import StreamSession
from ..state import AttentionLayerState, BlockSparseLayerState, InfiniteVLState, StateError

log = logging.getLogger("infinitevl.serving")
RECORD = struct.Struct("<4sQQ32s")  # magic, sequence number, payload bytes, SHA-256 of the payload
MAGIC = b"IVJ1"
ACK = struct.Struct("<4sQ20s")  # magic, last acknowledged sequence number, SHA-256 of the two (cut to 20 bytes)
ACK_MAGIC = b"IVA1"


class Damaged(Exception):
    """A session's files fail their checks; the message says which and how."""


class StoreBusy(Exception):
    """The state directory (or a session in it) is owned by another live process."""


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(folder: Path) -> None:
    """`mkdir -p`, fsyncing each new folder's parent, so that a crash cannot lose the folder with what is in it."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)


def write_atomic(path: Path, write) -> None:
    """`write(tmp_path)` then fsync, rename over `path`, fsync the folder. A failed write leaves `path` as it was
    and removes the temporary file."""
    make_dirs(path.parent)
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".tmp").unlink(missing_ok=True)  # InfiniteVLState.save's own temporary
        raise
    tmp.replace(path)
    fsync_dir(path.parent)


def write_all(fd: int, data: bytes) -> None:
    """`os.write` until all of `data` is written (a short write is followed by the rest, or by its error)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FileLock:
    """A `flock` on `path` (created if missing), released by `release()` or by the holder's death."""

    def __init__(self, path: Path, shared: bool = False, timeout: float = 0.0):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise StoreBusy(f"{path.name} is locked by another process") from None
                time.sleep(0.02)
        if not shared:  # who holds it, for the error message of the next one
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor of the open file releases the flock
            self.fd = -1


class SessionStore:
    """The files of one state directory. `shared=False`: this process owns the directory (a second owner, or a
    deployment's replica, is refused with `StoreBusy`); `shared=True`: a replica of a deployment, which must hold a
    session's lock (`lock_session`) before it reads or writes that session."""

    def __init__(self, root: Path, shared: bool = False):
        self.root, self.shared = root, shared
        make_dirs(root / "sessions")
        try:
            self._owner: FileLock | None = FileLock(root / "owner.lock", shared=shared)
        except StoreBusy:
            holder = (root / "owner.lock").read_text().strip()
            who = f"another server (pid {holder})" if holder else "a deployment's replicas"
            raise StoreBusy(
                f"the state directory {root} is in use by {who}; two servers writing one directory would lose "
                "acknowledged changes: stop it, or give this server another --state-dir"
            ) from None

    def close(self) -> None:
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def lock_session(self, sid: str, timeout: float = 0.0) -> FileLock:
        """Own one session (replicas): raises `StoreBusy` if another live process holds it after `timeout` s."""
        return FileLock(self.root / "sessions" / f"{sid}.lock", timeout=timeout)

    # -- paths -----------------------------------------------------------------------------------------------------
    def state_path(self, sid: str) -> Path:
        return self.root / "sessions" / f"{sid}.safetensors"

    def journal_path(self, sid: str) -> Path:
        return self.root / "sessions" / f"{sid}.journal"

    def sidecar_path(self, sid: str) -> Path:
        return self.root / "sessions" / f"{sid}.json"

    def snapshot_path(self, sid: str, snap: str) -> Path:
        return self.root / "snapshots" / sid / f"{snap}.safetensors"

    def ack_path(self, sid: str) -> Path:
        return self.root / "sessions" / f"{sid}.ack"

    def session_ids(self) -> list[str]:
        """Every session with a settings file or a state file (one without the other is reported, not hidden)."""
        folder = self.root / "sessions"
        names = {
            p.name.split(".")[0] for pattern in ("sess_*.json", "sess_*.safetensors") for p in folder.glob(pattern)
        }
        return sorted(names)

    # -- writing ---------------------------------------------------------------------------------------------------
    def write_sidecar(self, sid: str, meta: dict) -> None:
        """The session's settings, with a SHA-256 of their content (`read_sidecar` checks it)."""
        meta = {**meta, "checksum": _json_checksum(meta)}
        write_atomic(self.sidecar_path(sid), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))

    def read_sidecar(self, sid: str) -> dict:
        """The settings `write_sidecar` wrote; `Damaged` if missing, unreadable or changed since."""
        path = self.sidecar_path(sid)
        try:
            meta = json.loads(path.read_text())
            checksum = meta.pop("checksum", None)
        except FileNotFoundError:
            raise Damaged(f"{sid}.json (the session's settings) is missing") from None
        except (OSError, ValueError, AttributeError) as err:
            raise Damaged(f"{sid}.json cannot be read ({type(err).__name__})") from err
        if checksum is not None and checksum != _json_checksum(meta):
            raise Damaged(f"{sid}.json does not match the checksum written with it")
        return meta

    def write_state(self, sid: str, stream: StreamSession, seq: int) -> int:
        """The whole state as the session's file (including records up to `seq`), then an empty journal and the ack.
        Returns the bytes written. Raises only if the state file was not replaced: once it is, the change is made
        (records up to `seq` are skipped on reading, and the state file's number counts as acknowledged)."""
        path = self.state_path(sid)
        extra = {"journal_seq": str(seq), "tokens": str(int(stream.state.num_tokens[0]))}
        write_atomic(path, lambda tmp: stream.save(tmp, extra=extra))
        try:
            journal = self.journal_path(sid)
            if journal.exists() and journal.stat().st_size:
                with open(journal, "rb+") as f:
                    f.truncate(0)
                    os.fsync(f.fileno())
            self.write_ack(sid, seq)
        except OSError as err:
            log.warning("session %s: the state file is written, tidying the journal failed: %s", sid, err)
        return path.stat().st_size

    def append(self, sid: str, stream: StreamSession, before: InfiniteVLState, seq: int) -> int:
        """A journal record of what changed in `stream.state` since `before` (same shapes), fsynced, then `seq` in
        the ack file. Returns the bytes written. On any error the journal is cut back to where it was (and the ack
        to `seq - 1`) before the error is raised: the session's files are as before the change."""
        meta = {"seq": str(seq), "tokens": str(int(stream.state.num_tokens[0])), **stream.metadata()}
        payload = save_bytes(delta(before, stream.state), metadata=meta)
        header = RECORD.pack(MAGIC, seq, len(payload), hashlib.sha256(payload).digest())
        path = self.journal_path(sid)
        new = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                write_all(fd, header + payload)
                os.fsync(fd)
                if new:
                    fsync_dir(path.parent)
                self.write_ack(sid, seq)
            except BaseException:
                os.ftruncate(fd, start)
                os.fsync(fd)
                self._write_ack_slot(sid, seq % 2, max(seq - 2, 0))  # the other slot holds seq - 1
                raise
        finally:
            os.close(fd)
        return len(header) + len(payload)

    def write_ack(self, sid: str, seq: int) -> None:
        """Change `seq` is acknowledged: the journal (or the state file) must reach it."""
        path = self.ack_path(sid)
        new = not path.exists()
        self._write_ack_slot(sid, seq % 2, seq)
        if new:
            fsync_dir(path.parent)

    def _write_ack_slot(self, sid: str, slot: int, seq: int) -> None:
        body = ACK_MAGIC + struct.pack("<Q", seq)
        fd = os.open(self.ack_path(sid), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, ACK.pack(ACK_MAGIC, seq, hashlib.sha256(body).digest()[:20]), slot * ACK.size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_ack(self, sid: str) -> int | None:
        """The last acknowledged change (the larger valid slot); None when the session has no ack file."""
        path = self.ack_path(sid)
        if not path.exists():
            return None
        data = path.read_bytes()
        valid = []
        for slot in range(2):
            chunk = data[slot * ACK.size : (slot + 1) * ACK.size]
            if len(chunk) == ACK.size:
                magic, seq, digest = ACK.unpack(chunk)
                if magic == ACK_MAGIC and hashlib.sha256(magic + struct.pack("<Q", seq)).digest()[:20] == digest:
                    valid.append(seq)
        if not valid:
            raise Damaged(f"{sid}.ack: neither slot is valid")
        return max(valid)

    def journal_bytes(self, sid: str) -> int:
        path = self.journal_path(sid)
        return path.stat().st_size if path.exists() else 0

    def state_bytes(self, sid: str) -> int:
        path = self.state_path(sid)
        return path.stat().st_size if path.exists() else 0

    def write_snapshot(self, sid: str, snap: str, stream: StreamSession) -> None:
        write_atomic(self.snapshot_path(sid, snap), lambda tmp: stream.save(tmp))

    def delete(self, sid: str) -> None:
        # the state file first: a settings file without one is reported damaged (and deleted again), while a state
        # file without settings would be taken for a create that never finished
        files = (self.state_path(sid), self.journal_path(sid), self.ack_path(sid), self.sidecar_path(sid))
        for path in (*files, self._handoff_path(sid)):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.root / "snapshots" / sid, ignore_errors=True)
        fsync_dir(self.root / "sessions")

    def request_handoff(self, sid: str) -> None:
        """Ask the replica holding the session to save it and let go (it looks for this file)."""
        self._handoff_path(sid).touch()

    def handoff_requested(self, sid: str) -> bool:
        return self._handoff_path(sid).exists()

    def clear_handoff(self, sid: str) -> None:
        self._handoff_path(sid).unlink(missing_ok=True)

    def _handoff_path(self, sid: str) -> Path:
        return self.root / "sessions" / f"{sid}.handoff"

    def delete_lock(self, sid: str) -> None:
        (self.root / "sessions" / f"{sid}.lock").unlink(missing_ok=True)

    def delete_snapshot(self, sid: str, snap: str) -> None:
        self.snapshot_path(sid, snap).unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------------------------------
    def read(self, sid: str, path: Path, make_session) -> tuple[StreamSession, int]:
        """A session from a state file (and, for its own file, the journal after it): (session, last seq).
        `make_session(path)` restores the state file; a failing check raises `Damaged`. Invalid bytes at the end of
        the journal that hold no acknowledged change are cut off (with a warning)."""
        try:
            stream = make_session(path)
            seq = int(InfiniteVLState.read_metadata(path).get("journal_seq", 0))
        except (OSError, StateError, ValueError) as err:
            raise Damaged(f"{path.name}: {err}".replace(str(path), path.name)) from err
        if path != self.state_path(sid):
            return stream, seq
        ack = self.read_ack(sid)
        records, tail = self._scan(sid)
        for record_seq, payload in records:
            if record_seq <= seq:
                continue  # already in the state file (a crash came between the two writes)
            if record_seq != seq + 1:
                raise Damaged(f"{sid}.journal: record {record_seq} follows {seq}; records are missing")
            tensors = load_bytes(payload)
            apply_delta(stream.state, tensors)
            stream.apply_metadata(_payload_metadata(payload))
            seq = record_seq
        if ack is not None and seq < ack:
            where = tail[1] if tail else f"the journal ends after change {seq}"
            raise Damaged(f"{sid}.journal: {where}, but changes up to {ack} were acknowledged; records are missing")
        if tail is not None:
            offset, reason, final = tail
            if ack is None and not final:  # no ack file (an older directory): only a last record may be torn
                raise Damaged(f"{sid}.journal: {reason}")
            log.warning("session %s: dropped the end of its journal (%s; never acknowledged)", sid, reason)
            with open(self.journal_path(sid), "rb+") as f:
                f.truncate(offset)
                os.fsync(f.fileno())
        return stream, seq

    def counters(self, sid: str) -> dict:
        """The stream metadata (segment, counters) and token count as of the last record, reading only headers."""
        meta = InfiniteVLState.read_metadata(self.state_path(sid))
        last = None
        for _, payload_meta in self._record_headers(sid):
            last = payload_meta
        return last if last is not None else meta

    def _scan(self, sid: str) -> tuple[list[tuple[int, bytes]], tuple[int, str, bool] | None]:
        """The journal's valid records [(seq, payload)] up to the first invalid byte, and what follows them:
        (offset, what is wrong, whether it is only the last record cut short or zeroed) or None."""
        path = self.journal_path(sid)
        data = path.read_bytes() if path.exists() else b""
        records, offset = [], 0
        while offset < len(data):
            rest = len(data) - offset
            if rest < RECORD.size:
                return records, (offset, f"a record header cut short at byte {offset}", True)
            magic, seq, size, digest = RECORD.unpack_from(data, offset)
            if magic != MAGIC:
                zeros = not any(data[offset:])
                return records, (offset, f"no record at byte {offset}", zeros)
            payload = data[offset + RECORD.size : offset + RECORD.size + size]
            if len(payload) < size:
                return records, (offset, f"record {seq} at byte {offset} is cut short", True)
            if hashlib.sha256(payload).digest() != digest:
                last = offset + RECORD.size + size == len(data)
                return records, (offset, f"record {seq} at byte {offset} fails its checksum", last)
            records.append((seq, payload))
            offset += RECORD.size + size
        return records, None

    def _record_headers(self, sid: str):
        path = self.journal_path(sid)
        if not path.exists():
            return
        size_total = path.stat().st_size
        with open(path, "rb") as f:
            offset = 0
            while offset + RECORD.size <= size_total:
                magic, seq, size, _ = RECORD.unpack(f.read(RECORD.size))
                if magic != MAGIC or offset + RECORD.size + size > size_total:
                    return
                try:
                    (n,) = struct.unpack("<Q", f.read(8))
                    meta = json.loads(f.read(n)).get("__metadata__", {})
                except (struct.error, ValueError) as err:
                    raise Damaged(f"{sid}.journal: record {seq} at byte {offset} cannot be read") from err
                yield seq, meta
                offset += RECORD.size + size
                f.seek(offset)


def delta(before: InfiniteVLState, after: InfiniteVLState) -> dict[str, torch.Tensor]:
    """What changed from `before` to `after` (one row each): recurrent layers whole, attention slots written."""
    out = {"next_position": after.next_position.cpu(), "num_tokens": after.num_tokens.cpu()}
    for i, (old, new) in enumerate(zip(before.layers, after.layers)):
        if isinstance(new, AttentionLayerState):
            slots = (new.positions[0] != old.positions[0]).nonzero().view(-1)
            out[f"layers.{i}.slots"] = slots.cpu()
            out[f"layers.{i}.keys"] = new.keys[:, :, slots].contiguous().cpu()
            out[f"layers.{i}.values"] = new.values[:, :, slots].contiguous().cpu()
            out[f"layers.{i}.positions"] = new.positions[:, slots].contiguous().cpu()
            if isinstance(new, BlockSparseLayerState):  # the chunks those slots belong to: their mean keys
                chunks = torch.unique(slots // new.chunk_size)
                chunks = chunks[chunks < new.chunk_means.shape[2]]
                out[f"layers.{i}.chunks"] = chunks.cpu()
                out[f"layers.{i}.chunk_means"] = new.chunk_means[:, :, chunks].contiguous().cpu()
        else:
            out.update({f"layers.{i}.{k}": v.contiguous().cpu() for k, v in new.tensors().items()})
    return out


def apply_delta(state: InfiniteVLState, tensors: dict[str, torch.Tensor]) -> None:
    state.next_position.copy_(tensors["next_position"])
    state.num_tokens.copy_(tensors["num_tokens"])
    for i, layer in enumerate(state.layers):
        if isinstance(layer, AttentionLayerState):
            slots = tensors[f"layers.{i}.slots"].to(layer.keys.device)
            layer.keys[:, :, slots] = tensors[f"layers.{i}.keys"].to(layer.keys)
            layer.values[:, :, slots] = tensors[f"layers.{i}.values"].to(layer.values)
            layer.positions[:, slots] = tensors[f"layers.{i}.positions"].to(layer.positions.device)
            if f"layers.{i}.chunks" in tensors:
                chunks = tensors[f"layers.{i}.chunks"].to(layer.keys.device)
                layer.chunk_means[:, :, chunks] = tensors[f"layers.{i}.chunk_means"].to(layer.chunk_means)
        else:
            for k, t in layer.tensors().items():
                t.copy_(tensors[f"layers.{i}.{k}"])


def _json_checksum(meta: dict) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _payload_metadata(payload: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + n]).get("__metadata__", {})
