"""`infinitevl state`: what a saved stream snapshot holds.

Text for people (the stream's counts, the open run of live frames, the session's counters, the memory per layer
kind) or plain JSON with `--json` (numbers as numbers, nested objects, no JSON inside strings)."""

from __future__ import annotations

import json

from .common import check_file, mb

HELP = "inspect a saved state snapshot"


def add_parser(sub) -> None:
    p = sub.add_parser("state", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("path", help="snapshot file written by a session, `stream --save-state` or the server")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def _segment(text: str) -> dict | None:
    """A session's open run of live frames, saved as "start,first_time,last_time,last_t" (see StreamSession)."""
    if not text:
        return None
    try:
        start, first_time, last_time, last_t = text.split(",")
        return {
            "rope_start": int(start),
            "first_time": float(first_time),
            "last_time": float(last_time),
            "last_temporal_index": int(last_t),
        }
    except ValueError:  # a layout this version does not know: shown as saved
        return {"saved_as": text}


def _value(text: str):
    """A metadata value: JSON when it is JSON (the session's counters), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def describe(path) -> dict:
    from ..state import AttentionLayerState, BlockSparseLayerState, InfiniteVLState, SinkWindowLayerState

    state = InfiniteVLState.load(path)
    meta = InfiniteVLState.read_metadata(path)
    layers = []
    for i, layer in enumerate(state.layers):
        kind = "attention" if isinstance(layer, AttentionLayerState) else "gated_deltanet"
        if isinstance(layer, SinkWindowLayerState):
            kind = "sink_attention"
        elif isinstance(layer, BlockSparseLayerState):
            kind = "block_sparse_attention"
        entry = {"layer": i, "kind": kind, "bytes": sum(t.numel() * t.element_size() for t in layer.tensors().values())}
        if isinstance(layer, AttentionLayerState):
            entry.update(window=layer.window, capacity=layer.capacity, filled=int((layer.positions[0] >= 0).sum()))
        if isinstance(layer, SinkWindowLayerState):
            entry.update(num_sinks=layer.num_sinks)
        elif isinstance(layer, BlockSparseLayerState):
            # every key is kept: what the tokens seen so far occupy grows with the stream (allocated: `bytes`)
            entry.update(chunk_size=layer.chunk_size, bytes_used=layer.bytes_used(int(state.num_tokens.max())))
        elif not isinstance(layer, AttentionLayerState):
            entry.update(memory=list(layer.memory.shape))
        layers.append(entry)
    known = (
        "format",
        "fingerprint",
        "windows",
        "variants",
        "segment",
        "counters",
        "checksum",
        "pair_frames",
        "frames_per_step",
        "held_frame",
        "held_frames",
    )
    extra = {k: v for k, v in meta.items() if k not in known}
    return {
        "path": str(path),
        "format": meta.get("format"),
        "batch_size": state.batch_size,
        "tokens": state.num_tokens.tolist(),  # one count per stream
        "next_position": state.next_position.tolist(),
        "dtype": str(state.dtype).replace("torch.", ""),
        "bytes": state.nbytes,
        "checksum": meta.get("checksum"),  # verified on loading: a damaged file never gets this far
        "model": state.fingerprint,
        "layers": layers,
        "segment": _segment(meta.get("segment", "")),
        "counters": json.loads(meta["counters"]) if meta.get("counters") else None,
        "pair_frames": bool(meta.get("pair_frames")),  # live frames two per temporal step
        "frames_per_step": int(meta.get("frames_per_step") or 1 + bool(meta.get("pair_frames"))),
        # frames held (not yet in the state) until their step is full: their timestamps
        "held_frames": _held_times(meta),
        "extra": {k: _value(v) for k, v in extra.items()},
    }


def _one(values: list):
    """A per-stream list shown as its single value when the snapshot holds one stream."""
    return values[0] if len(values) == 1 else values


def run(args) -> int:
    check_file(args.path, "snapshot")
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = info["model"]
    print(f"{info['path']}: {info['format']}")
    streams = "" if info["batch_size"] == 1 else f"{info['batch_size']} streams, "
    print(f"  {streams}tokens seen {_one(info['tokens'])}, next RoPE index {_one(info['next_position'])}")
    print(f"  state {mb(info['bytes'])} ({info['bytes']} bytes), dtype {info['dtype']} (GDN memory fp32)")
    if info["checksum"]:
        print(f"  checksum {info['checksum']} (verified)")
    print(
        f"  model: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, window {m['sliding_window']}, "
        f"vocab {m['vocab_size']}"
    )
    kinds = {}
    for layer in info["layers"]:
        kinds.setdefault(layer["kind"], []).append(layer)
    for kind, layers in kinds.items():
        total = sum(x["bytes"] for x in layers)
        extra = ""
        if kind == "attention":
            extra = f", ring {layers[0]['capacity']} slots, filled {layers[0]['filled']}"
        elif kind == "sink_attention":
            first = layers[0]
            extra = f", {first['num_sinks']} sinks + ring, {first['capacity']} slots, filled {first['filled']}"
        elif kind == "block_sparse_attention":
            used = sum(x["bytes_used"] for x in layers)
            extra = (
                f" allocated for {layers[0]['capacity']} tokens, {mb(used)} used by the {layers[0]['filled']} "
                f"tokens kept (grows with the stream), chunks of {layers[0]['chunk_size']}"
            )
        print(f"  {len(layers)} {kind} layer{'s' if len(layers) != 1 else ''}: {mb(total)}{extra}")
    seg = info["segment"]
    if seg and "saved_as" in seg:
        print(f"  open run of live frames: {seg['saved_as']}")
    elif seg:
        print(
            f"  open run of live frames: timestamps {seg['first_time']:g}-{seg['last_time']:g} s, RoPE block from "
            f"{seg['rope_start']}, last temporal index {seg['last_temporal_index']}"
        )
    counters = info["counters"]
    if counters:
        shown = ", ".join(f"{v:.1f} s ingesting" if k == "ingest_seconds" else f"{v} {k}" for k, v in counters.items())
        print(f"  session: {shown}")
    if info["pair_frames"] or info["frames_per_step"] > 1:
        held = ", ".join(f"{t:g} s" for t in info["held_frames"])
        paired = "in pairs, " if info["pair_frames"] else ""
        print(
            f"  live frames {paired}{info['frames_per_step']} per prefill; "
            f"{f'frames at {held} held' if held else 'no frame held'}"
        )
    for k, v in info["extra"].items():
        print(f"  {k}: {v}")
    return 0


def _held_times(meta: dict[str, str]) -> list[float]:
    """The timestamps of the frames a saved stream holds (`held_frame`: one, in files written before
    frames_per_step)."""
    if meta.get("held_frames"):
        return [d["timestamp"] for d in json.loads(meta["held_frames"])]
    return [json.loads(meta["held_frame"])["timestamp"]] if meta.get("held_frame") else []
