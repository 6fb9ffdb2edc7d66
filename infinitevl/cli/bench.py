"""`infinitevl bench`: measure InfiniteVL against the Transformer baseline and the machine's limits, in one run.

Writes one JSON file per section into --out, PNG plots next to them, and the report (docs/benchmarks.md for the
default --out). The full run takes about 40 minutes on a quiet 2-core machine; --quick runs every section at tiny
sizes in seconds (a smoke test: its numbers mean nothing). --only reruns some sections: the report is rebuilt from
every section's JSON found in --out. --configs restricts what the sections measure (a rerun section's JSON then
holds only those configs)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .common import CliError

HELP = "benchmark InfiniteVL against the Transformer baseline (JSON, plots, docs/benchmarks.md)"


def add_parser(sub) -> None:
    from ..bench import CONFIG_NAMES, SECTIONS

    p = sub.add_parser("bench", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="docs/benchmarks", help="folder for the JSON and PNG files")
    p.add_argument("--markdown", default=None, help="report path (default: the --out folder's name + .md)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds: checks that the code works")
    p.add_argument("--only", default=None, help=f"comma-separated sections among {','.join(SECTIONS)}")
    p.add_argument("--configs", default=None, help=f"comma-separated configs among {','.join(CONFIG_NAMES)}")
    p.add_argument("--report-only", action="store_true", help="only rebuild plots and report from the JSON in --out")
    p.add_argument("--video", default=None, help="video for the streaming section (default: the demo's 1.mp4)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def _split(value: str | None, known, what: str) -> list[str] | None:
    if value is None:
        return None
    items = [x.strip() for x in value.split(",") if x.strip()]
    unknown = [x for x in items if x not in known]
    if unknown:
        raise CliError(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return items


def run(args) -> int:
    import importlib.util

    missing = [m for m in ("matplotlib", "psutil") if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"the benchmarks need {' and '.join(missing)}: pip install -e .[bench]")
    from ..bench import CONFIG_NAMES, SECTIONS, report
    from ..bench.runner import full_plan, quick_plan
    from ..bench.runner import run as run_bench
    from ..bench.timing import Progress

    out = Path(args.out)
    markdown = Path(args.markdown) if args.markdown else out.with_name(out.name + ".md")
    if args.report_only:
        print(report.write(out, markdown))
        return 0
    sections = _split(args.only, SECTIONS, "sections") or list(SECTIONS)
    configs = _split(args.configs, CONFIG_NAMES, "configs")
    plan = (quick_plan() if args.quick else full_plan()).select(configs)
    if args.video:
        if not Path(args.video).exists():
            raise CliError(f"--video {args.video}: no such file")
        plan.streaming["video"] = args.video
    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be >= 1 (got {args.threads})")
        plan.threads = args.threads
    command = shlex.join(["infinitevl", *sys.argv[1:]]) if Path(sys.argv[0]).name == "infinitevl" else None
    command = command or shlex.join(["infinitevl", "bench", *_given(args)])
    print(run_bench(plan, out, sections, command, markdown, Progress(quiet=args.quiet)))
    return 0


def _given(args) -> list[str]:
    """The options as given, when the command did not come from the console script (tests, python -m)."""
    parts = ["--out", args.out]
    for flag, value in (
        ("--markdown", args.markdown),
        ("--only", args.only),
        ("--configs", args.configs),
        ("--video", args.video),
        ("--threads", args.threads),
    ):
        if value:
            parts += [flag, str(value)]
    return parts + (["--quick"] if args.quick else [])
