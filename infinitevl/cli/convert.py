"""`infinitevl convert`: a student InfiniteVL checkpoint from a Qwen2.5-VL teacher (transformers format)."""

from __future__ import annotations

import json

HELP = "build an InfiniteVL student from a Qwen2.5-VL teacher checkpoint"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help=HELP, description=HELP + " (see infinitevl/training/convert.py for the initialisation)."
    )
    p.add_argument("--teacher", required=True, help="Qwen2.5-VL folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--init",
        choices=["teacher", "mimic"],
        default="teacher",
        help="GDN layers from the teacher's attention (default) or the official random 'mimic' init",
    )
    p.add_argument(
        "--layers",
        default="hybrid",
        help="'hybrid' (layer i softmax when i %% 4 == 0), 'softmax' (no GDN layers: the student equals "
        "the teacher), or a comma list of linear/sliding/full",
    )
    p.add_argument("--window", type=int, default=8192, help="sliding window of the softmax layers (0: full)")
    p.add_argument("--expand-v", type=float, default=2, help="GDN value width as a multiple of the key width")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="storage dtype (default: fp32)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..checkpoint import resolve
    from ..training.convert import convert, parse_layer_types

    teacher_cfg = json.loads((resolve(args.teacher) / "config.json").read_text())
    n = (teacher_cfg.get("text_config") or teacher_cfg)["num_hidden_layers"]
    out = convert(
        args.teacher,
        args.out,
        init=args.init,
        layer_types=parse_layer_types(args.layers, n),
        window=args.window or None,
        expand_v=args.expand_v,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
    )
    cfg = json.loads((out / "config.json").read_text())
    kinds = {t: cfg["layer_types"].count(t) for t in sorted(set(cfg["layer_types"]))}
    print(f"student written to {out}: {kinds}")
    return 0
