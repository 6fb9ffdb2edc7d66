"""`infinitevl miniature`: the paper's central result in miniature, trained and compared on this CPU.

Generates the digit-recall task from real images, trains a Qwen2.5-VL teacher, converts and distills it into the
InfiniteVL hybrid, a sliding-window-only and a Gated-DeltaNet-only student with the same budget, compares the four on
held-out streams up to 1,024 frames, writes the table and plot into the README and (optionally) installs the hybrid
as the package's default model."""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "train and compare the miniature models (teacher, hybrid, SWA-only, GDN-only) on the recall task"


def add_parser(sub) -> None:
    p = sub.add_parser("miniature", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="runs/miniature", help="working folder (reused: finished steps are skipped)")
    p.add_argument("--media", default=None, help="folder of photographs for backgrounds (default: ../shared/media)")
    p.add_argument("--readme", default=None, help="README whose miniature block to rewrite")
    p.add_argument("--install", default=None, help="copy the trained hybrid here (the default model folder)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..tasks.miniature import MEDIA, Budget
    from ..tasks.miniature import run as run_pipeline

    budget = Budget.quick() if args.quick else Budget()
    report = run_pipeline(
        args.out,
        budget,
        media=Path(args.media) if args.media else MEDIA,
        readme=Path(args.readme) if args.readme else None,
        install=Path(args.install) if args.install else None,
        command="infinitevl " + " ".join(sys.argv[1:]),
    )
    for name, s in report.summary.items():
        print(
            f"{name:>26}: overall {s['overall']:.2f}, by distance "
            + ", ".join(f"{k}: {v:.2f}" for k, v in s["by_distance"].items() if v == v)
        )
    return 0
