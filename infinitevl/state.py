"""The inference state of a stream: fixed-size, allocated once, saved and loaded as safetensors.

Per Gated DeltaNet layer: the conv tails of q, k and v (the last K - 1 pre-conv inputs) and the memory S
[B, H, Dk, Dv], always fp32. Per sliding-window layer: a ring buffer of the last W - 1 rotated keys and values with
their stream positions (-1 = empty). Per stream: the running RoPE index (`next_position`) and the number of tokens
seen (`num_tokens`, which is also the stream position of the next token). Both are [B] int64 tensors that the model
updates in place, one entry per stream; `tokens_seen` is the count of a one-stream state as a plain int. Nothing here
grows with the input; the byte size is fixed at allocation (`nbytes`). The v2 variants (docs/variants.md): Online's
sink layers keep the first `num_sinks` positions plus a ring (`SinkWindowLayerState`, fixed); Offline's block-sparse
layers keep every key and the mean key of each complete chunk (`BlockSparseLayerState`, allocated for `max_context`
like full attention, with `bytes_used` growing with the stream). Full-attention layers (teacher-style models only) get a cache of a
fixed `max_context` and refuse to go past it. A saved state carries a SHA-256 of its tensors; loading a file whose
tensors do not match it (a damaged file) raises `StateError`.

The model reads and updates these objects in place; this module knows nothing about modules or weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LINEAR, SINK, SPARSE, InfiniteVLConfig

STATE_FORMAT = "infinitevl-state/1"


def graph_capturing(t: torch.Tensor) -> bool:
    """Whether `t`'s device is recording a CUDA graph (then nothing may read device values on the host)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class StateError(ValueError):
    """A state that does not fit the model, is corrupt, or is used past its capacity."""


@dataclass
class LinearLayerState:
    conv_q: torch.Tensor  # [B, H*Dk, K-1]
    conv_k: torch.Tensor  # [B, KVh*Dk, K-1]
    conv_v: torch.Tensor  # [B, KVh*Dv, K-1]
    memory: torch.Tensor  # [B, H, Dk, Dv] fp32

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"conv_q": self.conv_q, "conv_k": self.conv_k, "conv_v": self.conv_v, "memory": self.memory}


@dataclass
class AttentionLayerState:
    keys: torch.Tensor  # [B, KV, capacity, D], rotated; head-major so that a decode step reads contiguous rows
    values: torch.Tensor  # [B, KV, capacity, D]
    positions: torch.Tensor  # [B, capacity] int64 stream positions, -1 = empty slot
    window: int | None  # None: full attention, the cache must hold everything

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "positions": self.positions}

    def ordered(self, num_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled slots in stream order: keys, values [B, KV, n, D] and positions [B, n], n = the most slots
        any row has filled (a row with fewer has empty slots, position -1). Views while no row has wrapped around,
        copies after."""
        counts = num_tokens.tolist()
        if max(counts) <= self.capacity:  # nothing overwritten yet: slot i holds stream position i
            n = max(counts)
            return self.keys[:, :, :n], self.values[:, :, :n], self.positions[:, :n]
        shifts = [c % self.capacity for c in counts]
        if len(set(shifts)) == 1:
            s = shifts[0]
            return (self.keys.roll(-s, dims=2), self.values.roll(-s, dims=2), self.positions.roll(-s, dims=1))
        rows = [
            (self.keys[b].roll(-s, dims=1), self.values[b].roll(-s, dims=1), self.positions[b].roll(-s, dims=0))
            for b, s in enumerate(shifts)
        ]
        return tuple(torch.stack(parts) for parts in zip(*rows))  # type: ignore[return-value]

    def filled(self, num_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled slots in any order (enough for a decode step): a view of the first slots until the ring
        wraps around, then the whole ring."""
        if graph_capturing(self.keys):  # no host sync inside a CUDA graph: the whole ring, empty slots masked
            return self.keys, self.values, self.positions
        n = min(int(num_tokens.max()), self.capacity)
        return self.keys[:, :, :n], self.values[:, :, :n], self.positions[:, :n]

    def write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the tokens that remain among the last `capacity`; keys/values [B, T, KV, D], positions [B, T]."""
        cap = self.capacity
        if positions.shape[1] == 1 and self.window is not None:  # one token per row: no host sync (CUDA graphs)
            pos = positions[:, 0]
            rows, slots, real = torch.arange(pos.shape[0], device=pos.device), pos % cap, pos >= 0
            for buf, new in ((self.keys, keys), (self.values, values)):
                buf[rows, :, slots] = torch.where(real[:, None, None], new[:, 0].to(buf.dtype), buf[rows, :, slots])
            self.positions[rows, slots] = torch.where(real, pos, self.positions[rows, slots])
            return
        last = positions.max(dim=1, keepdim=True).values
        keep = (positions >= 0) & (positions > last - cap)
        if self.window is None and bool((positions >= cap).any()):
            raise StateError(f"the full-attention cache holds {cap} tokens and the stream has gone past it")
        rows, cols = keep.nonzero(as_tuple=True)
        slots = positions[rows, cols] % cap
        self.keys[rows, :, slots] = keys[rows, cols].to(self.keys.dtype)
        self.values[rows, :, slots] = values[rows, cols].to(self.values.dtype)
        self.positions[rows, slots] = positions[rows, cols]


class InfiniteVLState:
    """The whole model's state for a batch of streams."""

    def __init__(self, layers, next_position: torch.Tensor, num_tokens: torch.Tensor, fingerprint: dict):
        self.layers: list[LinearLayerState | AttentionLayerState] = layers
        self.next_position = next_position  # [B] int64: RoPE index of the next text token
        self.num_tokens = num_tokens  # [B] int64: stream tokens seen so far
        self.fingerprint = fingerprint

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def allocate(
        cls,
        config: InfiniteVLConfig,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_context: int | None = None,
    ) -> InfiniteVLState:
        """Zeroed state. `max_context` sizes the caches of full-attention layers (only those need it)."""
        t = config.text
        K = t.conv_size
        layers: list = []
        for i, kind in enumerate(t.layer_types):
            if kind == LINEAR:
                layers.append(
                    LinearLayerState(
                        conv_q=torch.zeros(
                            batch_size, t.num_linear_heads * t.linear_head_dim, K - 1, dtype=dtype, device=device
                        ),
                        conv_k=torch.zeros(batch_size, t.linear_key_dim, K - 1, dtype=dtype, device=device),
                        conv_v=torch.zeros(batch_size, t.linear_value_dim, K - 1, dtype=dtype, device=device),
                        memory=torch.zeros(
                            batch_size,
                            t.num_linear_heads,
                            t.linear_head_dim,
                            t.linear_value_head_dim,
                            dtype=torch.float32,
                            device=device,
                        ),
                    )
                )
            elif kind == SINK:
                layers.append(SinkWindowLayerState.allocate(t, batch_size, dtype, device))
            elif kind == SPARSE:
                if max_context is None:
                    raise StateError(f"layer {i} is block-sparse (keeps every key): allocate with max_context")
                layers.append(BlockSparseLayerState.allocate(t, batch_size, max_context, dtype, device))
            else:
                window = t.layer_window(i)
                if window is None and max_context is None:
                    raise StateError(f"layer {i} is full attention: allocate the state with max_context")
                cap = window - 1 if window is not None else max_context
                shape = (batch_size, t.num_key_value_heads, cap, t.head_dim)
                layers.append(
                    AttentionLayerState(
                        keys=torch.zeros(shape, dtype=dtype, device=device),
                        values=torch.zeros(shape, dtype=dtype, device=device),
                        positions=torch.full((batch_size, cap), -1, dtype=torch.long, device=device),
                        window=window,
                    )
                )
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(layers, zeros, zeros.clone(), config.fingerprint())

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.num_tokens.shape[0]

    @property
    def tokens_seen(self) -> int:
        """Tokens this (one-stream) state has seen, as an int; `num_tokens[i]` is stream i's count in a batch."""
        if self.batch_size != 1:
            raise StateError(f"this state holds {self.batch_size} streams: num_tokens[i] is stream i's count")
        return int(self.num_tokens[0])

    @property
    def dtype(self) -> torch.dtype:
        for layer in self.layers:
            return layer.keys.dtype if isinstance(layer, AttentionLayerState) else layer.conv_q.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.num_tokens.device

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"next_position": self.next_position, "num_tokens": self.num_tokens}
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.{k}": v for k, v in layer.tensors().items()})
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # -- copies --------------------------------------------------------------------------------------------------
    def clone(self) -> InfiniteVLState:
        """An independent copy (a branch): changing one never touches the other."""
        new = self._like()
        new.copy_(self)
        return new

    def _like(self) -> InfiniteVLState:
        layers = []
        for layer in self.layers:
            fields = {k: torch.empty_like(v) for k, v in layer.tensors().items()}
            layers.append(dataclasses.replace(layer, **fields))
        return InfiniteVLState(
            layers, torch.empty_like(self.next_position), torch.empty_like(self.num_tokens), dict(self.fingerprint)
        )

    def copy_(self, other: InfiniteVLState) -> InfiniteVLState:
        """Overwrite this state's buffers with another's (same shapes); no allocation."""
        mine, theirs = self.tensors(), other.tensors()
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            raise StateError("cannot copy a state of a different shape")
        for k, t in mine.items():
            t.copy_(theirs[k])
        return self

    def reset(self) -> InfiniteVLState:
        for name, t in self.tensors().items():
            t.fill_(-1 if name.endswith("positions") else 0)
        return self

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Write a safetensors file whose metadata identifies the model configuration. Written to a temporary
        name and renamed, so an interrupted save never leaves a half-written snapshot under `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        windows = [layer.window if isinstance(layer, AttentionLayerState) else None for layer in self.layers]
        meta = {
            "format": STATE_FORMAT,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "windows": json.dumps(windows),
        }
        variants = [layer.options() if hasattr(layer, "options") else None for layer in self.layers]
        if any(variants):
            meta["variants"] = json.dumps(variants)
        meta.update(extra or {})
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        meta["checksum"] = tensor_checksum(tensors)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(
        cls, path: str | Path, config: InfiniteVLConfig | None = None, device: torch.device | str = "cpu"
    ) -> InfiniteVLState:
        """Read a snapshot; with `config`, refuse one written for a different model."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no state snapshot at {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise StateError(f"{path} is not a readable state snapshot: {err}") from err
        if meta.get("format") != STATE_FORMAT:
            raise StateError(f"{path} is not an InfiniteVL state (format {meta.get('format')!r})")
        if "checksum" in meta and tensor_checksum(tensors) != meta["checksum"]:
            raise StateError(f"{path} is damaged: its tensors do not match the checksum written with them")
        fingerprint = json.loads(meta["fingerprint"])
        if config is not None and fingerprint != config.fingerprint():
            diff = sorted(
                k
                for k in set(fingerprint) | set(config.fingerprint())
                if fingerprint.get(k) != config.fingerprint().get(k)
            )
            raise StateError(f"{path} was saved for a different model configuration (differs in: {', '.join(diff)})")
        windows = json.loads(meta["windows"])
        variants = json.loads(meta.get("variants", "null")) or [None] * len(windows)
        layers = []
        for i, window in enumerate(windows):
            prefix = f"layers.{i}."
            fields = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if variants[i] and "num_sinks" in variants[i]:
                layers.append(SinkWindowLayerState(**fields, window=window, **variants[i]))
            elif variants[i] and "chunk_size" in variants[i]:
                layers.append(BlockSparseLayerState(**fields, window=window, **variants[i]))
            elif "keys" in fields:
                layers.append(AttentionLayerState(**fields, window=window))
            else:
                layers.append(LinearLayerState(**fields))
        return cls(layers, tensors["next_position"], tensors["num_tokens"], fingerprint)

    @staticmethod
    def read_metadata(path: str | Path) -> dict[str, str]:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `tensors` (in name order), as "sha256:<hex>"."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


# -- the v2 variants' caches (docs/variants.md) -----------------------------------------------------------------------
@dataclass
class SinkWindowLayerState(AttentionLayerState):
    """Online: slots [0, num_sinks) keep stream positions 0 .. num_sinks - 1 for ever; the other window - 1 slots are
    a ring of the latest later positions (position p >= num_sinks lives in slot num_sinks + (p - num_sinks) % ring).
    Fixed size: num_sinks + window - 1 slots per layer."""

    num_sinks: int = 0

    @classmethod
    def allocate(cls, text, batch_size, dtype, device) -> SinkWindowLayerState:
        cap = text.num_sink_tokens + text.sliding_window - 1
        shape = (batch_size, text.num_key_value_heads, cap, text.head_dim)
        return cls(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            positions=torch.full((batch_size, cap), -1, dtype=torch.long, device=device),
            window=text.sliding_window,
            num_sinks=text.num_sink_tokens,
        )

    def options(self) -> dict:
        return {"num_sinks": self.num_sinks}

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        ns, ring = self.num_sinks, self.capacity - self.num_sinks
        return torch.where(positions < ns, positions, ns + (positions - ns) % ring)

    def ordered(self, num_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled slots in stream order (sinks, then the ring from its oldest slot); empty slots position -1."""
        counts = num_tokens.tolist()
        ns, ring = self.num_sinks, self.capacity - self.num_sinks
        if max(counts) <= self.capacity:  # nothing overwritten yet: slot i holds stream position i
            n = max(counts)
            return self.keys[:, :, :n], self.values[:, :, :n], self.positions[:, :n]
        rows = []
        for b, c in enumerate(counts):
            s = max(c - ns, 0) % ring
            rows.append(
                tuple(
                    torch.cat([t[b, ..., :ns], t[b, ..., ns:].roll(-s, dims=-1)], dim=-1)
                    for t in (self.keys.transpose(-1, -2), self.values.transpose(-1, -2), self.positions)
                )
            )
        keys, values, positions = (torch.stack(parts) for parts in zip(*rows))
        return keys.transpose(-1, -2), values.transpose(-1, -2), positions

    def write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the sinks and the tokens that remain among the latest window - 1; keys/values [B, T, KV, D]."""
        ring = self.capacity - self.num_sinks
        last = positions.max(dim=1, keepdim=True).values
        keep = (positions >= 0) & ((positions < self.num_sinks) | (positions > last - ring))
        rows, cols = keep.nonzero(as_tuple=True)
        slots = self._slots(positions[rows, cols])
        self.keys[rows, :, slots] = keys[rows, cols].to(self.keys.dtype)
        self.values[rows, :, slots] = values[rows, cols].to(self.values.dtype)
        self.positions[rows, slots] = positions[rows, cols]


@dataclass
class BlockSparseLayerState(AttentionLayerState):
    """Offline: every key at slot = stream position (like a full-attention cache, sized by max_context), plus the
    mean of each complete chunk of `chunk_size` keys [B, KV, capacity // chunk_size, D], updated as chunks fill.
    Allocated up front; `bytes_used` is what the tokens seen so far occupy, which grows with the input."""

    chunk_means: torch.Tensor = None  # type: ignore[assignment]
    chunk_size: int = 32

    @classmethod
    def allocate(cls, text, batch_size, max_context, dtype, device) -> BlockSparseLayerState:
        C = text.sparse_chunk_size
        shape = (batch_size, text.num_key_value_heads, max_context, text.head_dim)
        return cls(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            positions=torch.full((batch_size, max_context), -1, dtype=torch.long, device=device),
            window=None,
            chunk_means=torch.zeros(
                batch_size, text.num_key_value_heads, max_context // C, text.head_dim, dtype=dtype, device=device
            ),
            chunk_size=C,
        )

    def options(self) -> dict:
        return {"chunk_size": self.chunk_size}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "chunk_means": self.chunk_means}

    def bytes_used(self, num_tokens: int) -> int:
        """Bytes holding the first `num_tokens` tokens' keys, values, positions and complete chunks' means."""
        per_token = sum(t[:, ..., :1, :].numel() * t.element_size() for t in (self.keys, self.values))
        per_token += self.positions[:, :1].numel() * self.positions.element_size()
        per_chunk = self.chunk_means[:, :, :1].numel() * self.chunk_means.element_size()
        n = min(num_tokens, self.capacity)
        return n * per_token + (n // self.chunk_size) * per_chunk

    def write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the keys, then summarise every chunk whose last position has just been written."""
        super().write(keys, values, positions)
        C = self.chunk_size
        done = (positions >= 0) & ((positions + 1) % C == 0) & (positions < self.chunk_means.shape[2] * C)
        rows, cols = done.nonzero(as_tuple=True)
        if len(rows):
            chunks = positions[rows, cols] // C
            span = chunks.unsqueeze(-1) * C + torch.arange(C, device=positions.device)  # [n, C]
            self.chunk_means[rows, :, chunks] = self.keys[rows.unsqueeze(-1), :, span].mean(1)  # [n, KV, D]
