"""`infinitevl merge`: fold LoRA adapters (from `sft-long`) into a plain checkpoint."""

from __future__ import annotations

HELP = "fold LoRA adapters into the base model and write a plain checkpoint"


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help=HELP, description=HELP)
    p.add_argument("--base", required=True, help="the model the adapters were trained on")
    p.add_argument("--adapters", required=True, help="adapter folder written by sft-long (out/adapters)")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..training.lora import merge

    print(f"merged checkpoint written to {merge(args.base, args.adapters, args.out)}")
    return 0
