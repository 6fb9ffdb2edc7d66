"""The miniature, extended to the paper's second version: InfiniteVL-Base, -Online and -Offline against v1.

The same tasks, data, teacher and per-model step budget as `miniature.py` (docs/miniature.md), at its four layers
in the order that reproduced both halves of v1's claim (layers 0-2 Gated DeltaNet, layer 3 softmax attention):

- **v1 hybrid**: layer 3 sliding-window attention (window `WINDOW`), trained exactly as `miniature.py`'s
  "hybrid, SWA last" (convert, distill-layer, distill-e2e, sft, sft-long, merge).
- **Base**: layer 3 full attention; convert, distill-layer, distill-e2e and sft as v1, then its own sft-long.
- **Online** and **Offline**: Base after its sft, turned into the variant (`training.variants.make_variant`, no new
  parameter), then the same sft-long under the variant's mask: the paper's long-sequence architectural fine-tuning.
  Sizes scaled from the paper's to the miniature's 32-token window (`ONLINE`, `OFFLINE`).

Every model gets the same steps in every stage and the same data; they are compared on the held-out streams of
`miniature.py` (up to 1,024 frames: 32 times the window), with accuracy by distance, the bytes the state occupies and
the time per frame at each length. The expected outcome is committed in docs/miniature/v2-prediction.md before the
run.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import FULL, LINEAR
from . import comparison
from .miniature import (
    LAYERS,
    TASKS,
    WINDOW,
    Budget,
    Report,
    datasets,
    log,
    mark_tasks,
    run_stage,
    train_student,
    train_teacher,
)

# The paper: 256 sinks + a 2048-token window; top-64 of 32-token chunks, the initial chunk and the local 2048 tokens,
# dense below 8192. Scaled to the miniature's 32-token window: the window stays the v1 model's, the sinks are an
# eighth of it (the paper's ratio), top-k x chunk equals the local span (as 64 x 32 = 2048), and queries past twice
# the window use the sparse pattern (every training stream of sft-long reaches it).
ONLINE = {"num_sink_tokens": WINDOW // 8, "sliding_window": WINDOW}
OFFLINE = {
    "sparse_chunk_size": 4,
    "sparse_top_k": WINDOW // 4,
    "sparse_init_chunks": 1,
    "sparse_local_tokens": WINDOW,
    "sparse_dense_threshold": 2 * WINDOW,
}
V1 = "hybrid-swa-last"
NAMES = {
    "v1": "v1 hybrid (sliding window)",
    "base": "InfiniteVL-Base (full attention)",
    "online": "InfiniteVL-Online (sinks + window)",
    "offline": "InfiniteVL-Offline (block-sparse)",
}
BLOCK = "miniature-v2"


def base_layers(n: int) -> list[str]:
    """v1's SWA-last layout with the softmax layer made full attention."""
    return [FULL if i % 4 == 3 else LINEAR for i in range(n)]


def train_base(root: Path, teacher: Path, budget: Budget, data: dict) -> Path:
    """Base up to the end of its sft: convert (full attention), distill-layer, distill-e2e, sft."""
    from ..training.convert import convert

    work = root / "v2-base"
    current = convert(teacher, work / "start", layer_types=base_layers(LAYERS), window=None)
    current = run_stage(
        "distill-layer", current, work / "distill-layer", data["main"], budget.distill_layer, budget, teacher=teacher
    )
    mixers = "[gdn,swa,mlp]"
    current = run_stage(
        "distill-e2e",
        current,
        work / "distill-e2e",
        data["main"],
        budget.distill_e2e,
        budget,
        teacher=teacher,
        trainable=mixers,
    )
    return run_stage("sft", current, work / "sft", data["sft"], budget.sft, budget, trainable=mixers)


def long_finetune(root: Path, name: str, base_sft: Path, budget: Budget, data: dict, tasks) -> Path:
    """One model from Base's sft: the variant's config (none for Base), sft-long under its mask, merge."""
    from ..training.lora import merge
    from ..training.variants import make_variant

    work = root / f"v2-{name}"
    final = work / "final"
    if (final / "config.json").exists():
        return final
    start = base_sft
    if name in ("online", "offline"):
        start = make_variant(base_sft, work / "start", name, **(ONLINE if name == "online" else OFFLINE))
    adapters = run_stage(
        "sft-long", start, work / "sft-long", data["long"], budget.sft_long, budget, **{"lora.r": 8, "lora.alpha": 16}
    )
    merge(start, adapters, final)
    mark_tasks(final, tasks)
    return final


def run(
    root: str | Path,
    budget: Budget | None = None,
    media: Path | None = None,
    readme: Path | None = None,
    command: str = "infinitevl miniature --v2",
    tasks=TASKS,
) -> Report:
    """Train v1's hybrid, Base, Online and Offline from one teacher and compare them; write the report (and the
    page's `miniature-v2` block with its figure, when `readme` is given). A folder of an earlier `miniature` run is
    reused: its data, teacher and v1 hybrid are the same."""
    tasks = tuple(t for t in TASKS if t in tasks)
    if not tasks:
        raise ValueError(f"no task to run (choose among {', '.join(TASKS)})")
    marker = f"<!-- {BLOCK}:start -->"
    if readme is not None and marker not in (readme.read_text() if readme.exists() else ""):
        raise ValueError(f"{readme}: no page with a {marker} ... <!-- {BLOCK}:end --> block")
    budget = budget or Budget()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    resumed = (root / "teacher" / "DONE").exists()
    data = datasets(root, budget, media, tasks)
    teacher = train_teacher(root, budget, data, media, tasks)
    log(f"teacher ready ({time.perf_counter() - t0:.0f} s)")
    models = {"v1": train_student(root, V1, teacher, budget, data, tasks)}
    base_sft = train_base(root, teacher, budget, data)
    for name in ("base", "online", "offline"):
        models[name] = long_finetune(root, name, base_sft, budget, data, tasks)
    train_minutes = (time.perf_counter() - t0) / 60
    log(f"models ready ({time.perf_counter() - t0:.0f} s)")
    rows = {}
    for key, folder in models.items():
        name = NAMES[key]
        rows[name] = []
        if "recall" in tasks:
            rows[name] += comparison.evaluate_model(folder, budget.eval_lengths, budget.eval_streams, media)
        if "copy" in tasks:
            rows[name] += comparison.evaluate_model(
                folder, budget.copy_eval_lengths, budget.copy_eval_streams, media, task="copy"
            )
        log(f"evaluated {name}")
    summary = comparison.summarise(rows)
    meta = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "minutes": (time.perf_counter() - t0) / 60,
        "train_minutes": train_minutes,
        "resumed": resumed,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "budget": asdict(budget),
        "tasks": list(tasks),
        "window": WINDOW,
        "online": ONLINE,
        "offline": OFFLINE,
    }
    report = Report(summary, meta, rows)
    report.save(root / "report-v2.json")
    plots = root / "plots-v2"
    comparison.plot(summary, plots)
    if readme is not None:
        figure_dir = readme.parent / "miniature"
        figure_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(plots / "miniature.png", figure_dir / "miniature-v2.png")
        table = comparison.markdown(summary, meta)
        comparison.write_readme(readme, table + "\n\n![miniature v2](miniature/miniature-v2.png)", block=BLOCK)
        (figure_dir / "results-v2.md").write_text(
            comparison.results_page(summary, meta, table).replace(
                "# The miniature: results", "# The miniature, v2 variants: results", 1
            )
            + "\nSizes: Online "
            + ", ".join(f"{k} {v}" for k, v in ONLINE.items())
            + "; Offline "
            + ", ".join(f"{k} {v}" for k, v in OFFLINE.items())
            + ".\n"
        )
    return report
