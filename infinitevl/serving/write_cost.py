"""What making one session append durable costs, for a state of a real model's size, without loading the model.

`python -m infinitevl.serving.write_cost --dir /some/disk` allocates the 4B configuration's state (201 MB in fp32,
128 MB in bf16) with every memory and ring-buffer slot filled, then repeats: change it as one 448x448 frame does
(256 tokens: every Gated DeltaNet memory, 256 slots of each sliding-window ring) and make the change durable the way
each `--durability` policy does, timing the write and fsync and counting the bytes. Run it under the heavy-job lock
on the disk the state directory will be on; it prints one JSON line per policy and dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import InfiniteVLConfig
from ..state import AttentionLayerState, InfiniteVLState
from .store import SessionStore


class _Stream:
    """What the store needs of a session: its state, its metadata and a way to save both."""

    def __init__(self, state: InfiniteVLState):
        self.state = state

    def metadata(self) -> dict[str, str]:
        return {"segment": "", "counters": "{}"}

    def save(self, path, extra=None):
        return self.state.save(path, extra=extra)


def _filled(config: InfiniteVLConfig, dtype: torch.dtype) -> InfiniteVLState:
    state = InfiniteVLState.allocate(config, 1, dtype)
    for layer in state.layers:
        for name, t in layer.tensors().items():
            if name == "positions":
                t.copy_(torch.arange(t.shape[1]).unsqueeze(0))
            else:
                t.normal_()
    state.num_tokens.fill_(10**6)
    state.next_position.fill_(10**6)
    return state


def _one_frame(state: InfiniteVLState, tokens: int = 256) -> None:
    """Change `state` as appending `tokens` tokens does."""
    start = int(state.num_tokens[0])
    for layer in state.layers:
        if isinstance(layer, AttentionLayerState):
            positions = torch.arange(start, start + tokens)
            slots = positions % layer.capacity
            layer.keys[:, :, slots] = torch.randn_like(layer.keys[:, :, slots])
            layer.values[:, :, slots] = torch.randn_like(layer.values[:, :, slots])
            layer.positions[0, slots] = positions
        else:
            for t in layer.tensors().values():
                t.add_(0.01)
    state.num_tokens += tokens
    state.next_position += tokens


def measure(folder: Path, dtype: torch.dtype, repeats: int = 5) -> list[dict]:
    config = InfiniteVLConfig()  # the 4B model's defaults
    store = SessionStore(folder)
    stream = _Stream(_filled(config, dtype))
    before = stream.state.clone()
    sid = "sess_" + "0" * 24
    results = []
    for policy in ("journal", "full"):
        times, sizes = [], []
        store.write_state(sid, stream, 0)
        for seq in range(1, repeats + 1):
            before.copy_(stream.state)
            _one_frame(stream.state)
            t0 = time.perf_counter()
            if policy == "journal":
                sizes.append(store.append(sid, stream, before, seq))
                store.journal_path(sid).unlink()  # each record measured on its own
            else:
                sizes.append(store.write_state(sid, stream, seq))
            times.append(time.perf_counter() - t0)
        results.append(
            {
                "policy": policy,
                "dtype": str(dtype).removeprefix("torch."),
                "state_mb": round(stream.state.nbytes / 2**20, 1),
                "written_mb": round(statistics.median(sizes) / 2**20, 1),
                "seconds_median": round(statistics.median(times), 3),
                "seconds_max": round(max(times), 3),
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--dir", default=None, help="a folder on the disk to measure (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            for row in measure(Path(tmp), dtype, args.repeats):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
