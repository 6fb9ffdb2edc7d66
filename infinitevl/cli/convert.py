"""`infinitevl convert`: a student InfiniteVL checkpoint from a Qwen2.5-VL teacher (transformers format)."""

from __future__ import annotations

import json

HELP = "build an InfiniteVL student from a Qwen2.5-VL teacher checkpoint"
DESCRIPTION = (
    HELP + ". The student keeps the teacher's vision tower, embeddings, MLPs and norms; its softmax-attention layers "
    "keep the teacher's attention weights with a sliding window, and its Gated DeltaNet layers start from the "
    "teacher's query, key, value and output projections (--init teacher) or from the official random initialisation "
    "(--init mimic). Distillation (`infinitevl train`) then teaches the new layers."
)


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help=HELP, description=DESCRIPTION)
    p.add_argument("--teacher", default=None, help="Qwen2.5-VL folder (config.json + safetensors)")
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
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="storage dtype of the student's weights (default: float32, the dtype it is built in)",
    )
    p.add_argument(
        "--variant",
        choices=["online", "offline"],
        default=None,
        help="instead: turn the InfiniteVL model --base into the paper's v2 Online or Offline variant (a config change; "
        "docs/variants.md)",
    )
    p.add_argument("--base", default=None, help="with --variant: the InfiniteVL-Base folder")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="with --variant: a size other than the paper's, e.g. num_sink_tokens=64 (repeatable)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    if args.variant or args.base:
        return _variant(args)
    if not args.teacher:
        raise SystemExit("convert: --teacher is required (or --variant with --base)")
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


def _variant(args) -> int:
    from ..training.variants import make_variant

    if not (args.variant and args.base):
        raise SystemExit("convert: --variant and --base go together")
    options = {}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"convert: --option {item!r} is not FIELD=VALUE")
        options[name.strip()] = json.loads(value)
    out = make_variant(args.base, args.out, args.variant, **options)
    cfg = json.loads((out / "config.json").read_text())
    kinds = {t: cfg["layer_types"].count(t) for t in sorted(set(cfg["layer_types"]))}
    print(f"{args.variant} variant written to {out}: {kinds}")
    return 0
