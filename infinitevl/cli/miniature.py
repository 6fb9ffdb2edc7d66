"""`infinitevl miniature`: the paper's central result in miniature, trained and compared on this CPU.

Generates two tasks from real images (recall: which digit was last shown with a tag, up to 1,000 frames back;
read-back: every digit of the last 1-4 frames, four tokens each, plus the same recall question far back), trains a
Qwen2.5-VL teacher on both, converts and distills it into the InfiniteVL hybrid, the hybrid with its attention layer
last, a sliding-window-only and a Gated-DeltaNet-only student with the same budget, compares the five on held-out
streams, writes the tables and plot into the README and (optionally) installs the hybrid as the package's default
model with the SWA-only student beside it."""

from __future__ import annotations

import sys
from pathlib import Path

TASKS = ("recall", "copy")  # checked before the heavy imports (the pipeline's own list is the same)
HELP = "train and compare the miniature models (teacher, hybrids, SWA-only, GDN-only) on the recall and read-back tasks"


def add_parser(sub) -> None:
    p = sub.add_parser("miniature", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="runs/miniature", help="working folder (reused: finished steps are skipped)")
    p.add_argument(
        "--media",
        default=None,
        help="folder of photographs (*.jpg) for the backgrounds (default: the ones the package ships)",
    )
    p.add_argument(
        "--readme",
        default=None,
        help="page whose miniature block to rewrite (docs/miniature.md; its figure goes to docs/miniature/)",
    )
    p.add_argument(
        "--install",
        default=None,
        help="copy the trained hybrid here (the default model folder); SWA-only goes beside it as swa-only-model",
    )
    p.add_argument("--tasks", default="recall,copy", help="comma-separated tasks to train and compare: recall, copy")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test)")
    p.add_argument(
        "--v2",
        action="store_true",
        help="the paper's v2 models instead: InfiniteVL-Base, -Online and -Offline against v1's SWA hybrid "
        "(--readme: the page with the miniature-v2 block, docs/variants.md)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from .common import CliError

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise CliError(f"--tasks: unknown {', '.join(unknown) or 'empty'} (choose among {', '.join(TASKS)})")
    from ..tasks.miniature import Budget

    budget = Budget.quick() if args.quick else Budget()
    common = dict(
        media=Path(args.media) if args.media else None,
        readme=Path(args.readme) if args.readme else None,
        command="infinitevl " + " ".join(sys.argv[1:]),
        tasks=tasks,
    )
    if args.v2:
        if args.install:
            raise CliError("--install goes with the v1 models only (the v2 run installs nothing)")
        from ..tasks.miniature_v2 import run as run_v2

        report = run_v2(args.out, budget, **common)
    else:
        from ..tasks.miniature import run as run_pipeline

        report = run_pipeline(args.out, budget, install=Path(args.install) if args.install else None, **common)
    for name, s in report.summary.items():
        parts = []
        if "overall" in s:
            parts.append(
                f"recall task {s['overall']:.2f} (by distance "
                + ", ".join(f"{k}: {v:.2f}" for k, v in s["by_distance"].items() if v == v)
                + ")"
            )
        if "copy" in s:
            c = s["copy"]
            parts.append(
                "read-back "
                + ", ".join(f"{n} digits: {v:.2f}" for n, v in c["read"].items())
                + f"; far recall {c['recall_overall']:.2f}"
            )
        print(f"{name:>26}: " + "; ".join(parts))
    return 0
