"""Sessions on disk: durable writes, checksums, and a journal of what each acknowledged change wrote.

Layout of a state directory: `sessions/<id>.json` (settings and snapshot list), `sessions/<id>.safetensors` (the
state, with its segment, counters and the journal sequence number it includes), `sessions/<id>.journal` (changes
since), `snapshots/<id>/<snap>.safetensors`. Every file is written to a temporary name, fsynced, renamed and its
folder fsynced, so a crash leaves either the old file or the new one. State files carry a SHA-256 of their tensors
(`InfiniteVLState.save`); journal records carry one of their bytes.

A journal record holds what one change wrote: the whole recurrent state of every Gated DeltaNet layer (its memory
changes with every token) and, of the sliding-window layers, only the ring-buffer slots written (for a frame of 256
tokens, 256 of the window's slots), plus the stream counters and segment. Records are numbered; the state file names
the last number it includes, so a crash between writing a new state file and emptying the journal replays nothing
twice. Reading back: the state file, then every record after it. A record cut short at the end of the journal is a
write that a crash interrupted before its change was acknowledged: it is dropped. Anything else that fails its
checksum makes the session damaged (`Damaged`), never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..engine.session import StreamSession
from ..state import AttentionLayerState, InfiniteVLState, StateError

RECORD = struct.Struct("<4sQQ32s")  # magic, sequence number, payload bytes, SHA-256 of the payload
MAGIC = b"IVJ1"


class Damaged(Exception):
    """A session's files fail their checks; the message says which and how."""


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """`write(tmp_path)` then fsync, rename over `path`, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


class SessionStore:
    def __init__(self, root: Path):
        self.root = root
        (root / "sessions").mkdir(parents=True, exist_ok=True)

    # -- paths -----------------------------------------------------------------------------------------------------
    def state_path(self, sid: str) -> Path:
        return self.root / "sessions" / f"{sid}.safetensors"

    def journal_path(self, sid: str) -> Path:
        return self.root / "sessions" / f"{sid}.journal"

    def sidecar_path(self, sid: str) -> Path:
        return self.root / "sessions" / f"{sid}.json"

    def snapshot_path(self, sid: str, snap: str) -> Path:
        return self.root / "snapshots" / sid / f"{snap}.safetensors"

    def sidecars(self) -> list[Path]:
        return sorted((self.root / "sessions").glob("sess_*.json"))

    # -- writing ---------------------------------------------------------------------------------------------------
    def write_sidecar(self, sid: str, meta: dict) -> None:
        write_atomic(self.sidecar_path(sid), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))

    def write_state(self, sid: str, stream: StreamSession, seq: int) -> int:
        """The whole state as the session's file (including records up to `seq`), then an empty journal. Returns
        the bytes written."""
        path = self.state_path(sid)
        extra = {"journal_seq": str(seq), "tokens": str(int(stream.state.num_tokens[0]))}
        write_atomic(path, lambda tmp: stream.save(tmp, extra=extra))
        journal = self.journal_path(sid)
        if journal.exists() and journal.stat().st_size:
            with open(journal, "rb+") as f:
                f.truncate(0)
                os.fsync(f.fileno())
        return path.stat().st_size

    def append(self, sid: str, stream: StreamSession, before: InfiniteVLState, seq: int) -> int:
        """A journal record of what changed in `stream.state` since `before` (same shapes); fsynced before it
        returns. Returns the bytes written."""
        meta = {"seq": str(seq), "tokens": str(int(stream.state.num_tokens[0])), **stream.metadata()}
        payload = save_bytes(delta(before, stream.state), metadata=meta)
        header = RECORD.pack(MAGIC, seq, len(payload), hashlib.sha256(payload).digest())
        path = self.journal_path(sid)
        new = not path.exists()
        with open(path, "ab") as f:
            f.write(header + payload)
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(path.parent)
        return len(header) + len(payload)

    def journal_bytes(self, sid: str) -> int:
        path = self.journal_path(sid)
        return path.stat().st_size if path.exists() else 0

    def state_bytes(self, sid: str) -> int:
        path = self.state_path(sid)
        return path.stat().st_size if path.exists() else 0

    def write_snapshot(self, sid: str, snap: str, stream: StreamSession) -> None:
        write_atomic(self.snapshot_path(sid, snap), lambda tmp: stream.save(tmp))

    def delete(self, sid: str) -> None:
        self.sidecar_path(sid).unlink(missing_ok=True)  # first: without it, the rest is not a session
        for path in (self.state_path(sid), self.journal_path(sid)):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.root / "snapshots" / sid, ignore_errors=True)
        fsync_dir(self.root / "sessions")

    def delete_snapshot(self, sid: str, snap: str) -> None:
        self.snapshot_path(sid, snap).unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------------------------------
    def read(self, sid: str, path: Path, make_session) -> tuple[StreamSession, int]:
        """A session from a state file (and, for its own file, the journal after it): (session, last seq).
        `make_session(path)` restores the state file; a failing check raises `Damaged`."""
        try:
            stream = make_session(path)
            seq = int(InfiniteVLState.read_metadata(path).get("journal_seq", 0))
        except (OSError, StateError, ValueError) as err:
            raise Damaged(f"{path.name}: {err}".replace(str(path), path.name)) from err
        if path != self.state_path(sid):
            return stream, seq
        for record_seq, payload in self._records(sid):
            if record_seq <= seq:
                continue  # already in the state file (a crash came between the two writes)
            if record_seq != seq + 1:
                raise Damaged(f"{sid}.journal: record {record_seq} follows {seq}; records are missing")
            tensors = load_bytes(payload)
            apply_delta(stream.state, tensors)
            stream.apply_metadata(_payload_metadata(payload))
            seq = record_seq
        return stream, seq

    def counters(self, sid: str) -> dict:
        """The stream metadata (segment, counters) and token count as of the last record, reading only headers."""
        meta = InfiniteVLState.read_metadata(self.state_path(sid))
        last = None
        for _, payload_meta in self._record_headers(sid):
            last = payload_meta
        return last if last is not None else meta

    def _records(self, sid: str):
        """(seq, payload) of every complete record; a record cut short at the end is truncated away."""
        path = self.journal_path(sid)
        if not path.exists():
            return
        with open(path, "rb+") as f:
            offset = 0
            while True:
                header = f.read(RECORD.size)
                if not header:
                    return
                complete = len(header) == RECORD.size
                if complete:
                    magic, seq, size, digest = RECORD.unpack(header)
                    if magic != MAGIC:
                        raise Damaged(f"{sid}.journal: no record at byte {offset}")
                    payload = f.read(size)
                    complete = len(payload) == size
                if not complete:  # the tail of a write that never finished: it was never acknowledged
                    f.truncate(offset)
                    os.fsync(f.fileno())
                    return
                if hashlib.sha256(payload).digest() != digest:
                    raise Damaged(f"{sid}.journal: record {seq} at byte {offset} fails its checksum")
                offset += RECORD.size + size
                yield seq, payload

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
        else:
            for k, t in layer.tensors().items():
                t.copy_(tensors[f"layers.{i}.{k}"])


def _payload_metadata(payload: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + n]).get("__metadata__", {})
