"""`infinitevl state`: what a saved stream snapshot holds."""

from __future__ import annotations

import json

from ..state import AttentionLayerState, InfiniteVLState
from .common import mb

HELP = "inspect a saved state snapshot"


def add_parser(sub) -> None:
    p = sub.add_parser("state", help=HELP, description=HELP)
    p.add_argument("path", help="snapshot file written by a session, `stream --save-state` or the server")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def describe(path) -> dict:
    state = InfiniteVLState.load(path)
    meta = InfiniteVLState.read_metadata(path)
    layers = []
    for i, layer in enumerate(state.layers):
        kind = "attention" if isinstance(layer, AttentionLayerState) else "gated_deltanet"
        entry = {"layer": i, "kind": kind, "bytes": sum(t.numel() * t.element_size() for t in layer.tensors().values())}
        if isinstance(layer, AttentionLayerState):
            entry.update(window=layer.window, capacity=layer.capacity, filled=int((layer.positions[0] >= 0).sum()))
        else:
            entry.update(memory=list(layer.memory.shape))
        layers.append(entry)
    return {
        "path": str(path),
        "format": meta.get("format"),
        "batch_size": state.batch_size,
        "tokens": state.num_tokens.tolist(),
        "next_position": state.next_position.tolist(),
        "dtype": str(state.dtype).replace("torch.", ""),
        "bytes": state.nbytes,
        "model": state.fingerprint,
        "layers": layers,
        "extra": {k: v for k, v in meta.items() if k not in ("format", "fingerprint", "windows")},
    }


def run(args) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = info["model"]
    print(f"{info['path']}: {info['format']}")
    print(f"  streams {info['batch_size']}, tokens seen {info['tokens']}, next RoPE index {info['next_position']}")
    print(f"  state {mb(info['bytes'])} ({info['bytes']} bytes), dtype {info['dtype']} (GDN memory fp32)")
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
        print(f"  {len(layers)} {kind} layers: {mb(total)}{extra}")
    for k, v in info["extra"].items():
        print(f"  {k}: {v}")
    return 0
