"""The plans (what the full run and the quick run measure, with their sizes and time budgets) and the loop that runs
the sections, writes one JSON file per section and regenerates the report.

The full plan is sized for about 40 minutes on a quiet 2-core machine (the largest parts: the InfiniteVL stream of
1,100 frames, the 4B decode points, the baseline's longest prefills); every loop also has a time budget, so a slower
machine gets fewer points rather than a run that never ends. The quick plan runs the same code on the tiny config
in seconds (it is the test that keeps this code alive).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import SECTIONS, machine
from .timing import OtherLoad, Progress

K, M = 2**10, 2**20
FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "official-tiny"  # in the repository
CACHE = Path(os.environ.get("INFINITEVL_BENCH_CACHE", Path.home() / ".cache" / "infinitevl-bench"))


@dataclass
class Plan:
    name: str
    bandwidth_bytes: int
    matmul_size: int
    probe_repeats: int
    ops: dict[str, Any]
    decode_configs: list[str]
    decode: dict[str, dict]
    prefill_configs: list[str]
    prefill: dict[str, dict]
    memory_configs: list[str]
    memory: dict[str, dict]
    real_configs: list[str]
    real: dict[str, dict]
    streaming: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    threads: int | None = None  # torch threads for the run (None: torch's default, one per core)
    precision: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    ray: dict[str, Any] = field(default_factory=lambda: {"skip": True})  # Ray Serve replicas (bench/ray.py)
    variants: dict[str, Any] = field(default_factory=dict)  # Online / Offline (bench/variants.py)
    stream4b: dict[str, Any] = field(default_factory=lambda: {"skip": True})  # real-size streaming (bench/stream4b.py)

    def select(self, configs: list[str] | None) -> Plan:
        """The plan restricted to some configurations (streaming runs only if its config is among them)."""
        if not configs:
            return self
        keep = lambda names: [n for n in names if n in configs]  # noqa: E731
        plan = Plan(**asdict(self))
        plan.decode_configs = keep(plan.decode_configs)
        plan.prefill_configs = keep(plan.prefill_configs)
        plan.memory_configs = keep(plan.memory_configs)
        plan.real_configs = keep(plan.real_configs)
        if plan.streaming.get("config") not in configs:
            plan.streaming = {**plan.streaming, "skip": True}
        if plan.precision.get("config") not in configs:
            plan.precision = {**plan.precision, "skip": True}
        if plan.stream4b.get("config") not in configs:
            plan.stream4b = {**plan.stream4b, "skip": True}
        return plan

    def section(self, name: str) -> dict[str, Any]:
        """The part of the plan a section uses (recorded in its JSON)."""
        if name == "machine":
            return {
                "bandwidth_bytes": self.bandwidth_bytes,
                "matmul_size": self.matmul_size,
                "repeats": self.probe_repeats,
            }
        if name == "ops":
            return self.ops
        if name in ("decode", "prefill", "memory", "real"):
            names = getattr(self, f"{name}_configs")
            return {n: getattr(self, name)[n] for n in names}
        if name in ("precision", "quality", "ray", "variants", "stream4b"):
            return getattr(self, name)
        return self.streaming


_CONTEXTS = [1 * K, 4 * K, 16 * K, 64 * K, 256 * K, 1 * M, 4 * M, 16 * M]


def full_plan() -> Plan:
    return Plan(
        name="full",
        bandwidth_bytes=2**30,
        matmul_size=2048,
        probe_repeats=7,
        ops={
            "gdn": {"B": 1, "T": 4096, "H": 16, "Dk": 128, "Dv": 256},
            "chunk_repeats": 7,
            "step_repeats": 200,
            "swa_prefill": [[8192, 8192], [8192, 2048]],
            "swa_repeats": 3,
            "swa_heads": {"H": 16, "KV": 2, "D": 128},
            "swa_window": 8192,
        },
        decode_configs=["tiny", "mini", "4b"],
        decode={
            "tiny": dict(
                contexts=_CONTEXTS,
                baseline_contexts=_CONTEXTS[:6],
                repeats=100,  # ~2 ms steps: many repeats, or thread wake-ups dominate the median
                warmup=10,
                point_seconds=10,
                seconds=150,
                probe_longest=False,
            ),
            "mini": dict(
                contexts=_CONTEXTS,
                baseline_contexts=_CONTEXTS,
                repeats=20,
                warmup=3,
                point_seconds=15,
                seconds=300,
                probe_longest=False,
            ),
            "4b": dict(
                contexts=_CONTEXTS[:6],
                baseline_contexts=_CONTEXTS[:4],
                repeats=5,
                warmup=1,
                point_seconds=25,
                seconds=600,
                probe_longest=True,
            ),
        },
        prefill_configs=["tiny", "mini"],
        prefill={
            "tiny": dict(
                lengths=[1 * K, 4 * K, 16 * K, 64 * K],
                repeats=3,
                repeat_below=4 * K,
                baseline_call_seconds=60,
                seconds=180,
            ),
            "mini": dict(
                lengths=[1 * K, 4 * K, 16 * K, 32 * K, 64 * K],
                repeats=3,
                repeat_below=4 * K,
                baseline_call_seconds=240,
                seconds=900,
            ),
        },
        memory_configs=["mini", "4b"],
        memory={
            "mini": dict(
                contexts=_CONTEXTS[:6],
                baseline_contexts=_CONTEXTS[:7],
                baseline_longest=False,
                steps=2,
                worker_timeout=900,
                seconds=600,
                curve_contexts=[4**i * K for i in range(8)],
            ),
            "4b": dict(
                contexts=[4 * K, 1 * M],
                baseline_contexts=[4 * K],
                baseline_longest=True,
                steps=2,
                worker_timeout=900,
                seconds=600,
                curve_contexts=[4**i * K for i in range(8)],
            ),
        },
        # the 4b is left out: a real 64K prefill of it would take about an hour on a 2-core CPU
        real_configs=["mini"],
        real={"mini": dict(context=64 * K, repeats=20, warmup=3, worker_timeout=1800)},
        streaming=dict(
            config="mini",
            frame_size=448,
            fps=2.0,
            frames=1100,
            warmup_frames=3,
            fps_window=20,
            late_frame=1000,
            infinitevl_seconds=1500,
            baseline_seconds=420,
            baseline_stop_ratio=0.25,
            controlled_repeats=15,
        ),
        precision=dict(
            config="4b",
            modes=["fp32", "bf16", "int8", "int4", "int4-bf16-head"],
            contexts=[4 * K, 64 * K, 256 * K],
            repeats=5,
            warmup=1,
            group_size=128,
            prefill_tokens=4 * K,
            prefill_chunk=2 * K,
            prefill_repeats=1,
            frame=448,
            vision_repeats=2,
            worker_timeout=3600,
            # about 10-12 minutes in all on a quiet 2-core machine, most of it the hybrid's two 4K prefills (the GGUF
            # files are written once into the cache: about 2 minutes more the first time)
            llamacpp=dict(
                types=["Q8_0", "Q4_0"],
                models=dict(
                    qwen2=dict(contexts=[4 * K, 64 * K], repeats=3, seconds=600),
                    qwen35=dict(contexts=[4 * K, 64 * K, 256 * K], repeats=3, prefill_tokens=4 * K, seconds=900),
                ),
            ),
        ),
        quality=dict(
            modes=["fp32", "bf16", "int8", "int4", "int4-bf16-head", "int8-products", "int8-products-all"],
            group_size=128,
            demo_seeds=[2026, 2027, 2028, 2029],
            demo_frames=400,
            kl_streams=6,
            kl_frames=200,
            kl_seed=11,
            fixture=str(FIXTURE),
            fixture_group_size=32,
        ),
        # the 4b configuration with the full tower, run alone (`--only stream4b`). With bf16 instructions: 23 minutes
        # (1,373 s) on a quiet 2-core Xeon for bf16 / int8 / int4 with more frames per stream than now (6 / 12 at 448,
        # 12 / 24 at 224; the int8 / int4 decoders' prefill took up to 10.8 s per 448 frame there), plus the int8+int8p
        # mode now (its load about 1.5 min, its streams about half of bf16's). Without bf16 instructions (an AVX2-only
        # CPU) the modes are fp32 (today's path there) and the int8 decoder with an fp32 tower, both through the int8
        # x int8 products: 24 minutes (1,461 s) on a 2-core AMD EPYC, peak about 18 GiB (the fp32 model). Plus about
        # 80 s (peak 9.2 GiB) to write the 8.8 GB checkpoint if the precision section has not (bench/precision.py)
        stream4b=dict(
            config="4b",
            modes=["bf16", "int8", "int4", "int8+int8p"],
            modes_without_bf16=["fp32", "int8-fp32+int8p"],
            group_size=128,
            fps=2.0,
            streams=[
                dict(size=448, paired=False, frames=4),
                dict(size=448, paired=True, frames=8),
                dict(size=224, paired=False, frames=8),
                dict(size=224, paired=True, frames=16),
                dict(size=224, paired=True, frames=16, frames_per_step=8),  # 256 tokens per prefill
            ],
            warmup_steps=1,
            floor_repeats=2,
            long=dict(mode="int4", size=224, paired=True, frames=200),
            probe=dict(size=448, repeats=2),
            decode=dict(context=4 * K, repeats=10),  # the quantized decoders
        ),
        # the bundled model; frames of 224x224 (64 tokens each), 4 sessions at once, 1 then 2 replicas
        ray=dict(sessions=4, frames=8, frame_size=224, requests=200, max_batch=8),
        # Offline against dense at the 4B layer's widths (the paper's sizes); Online with 256 sinks + 2048 window
        variants=dict(
            offline=dict(
                widths=dict(hidden=2048, heads=16, kv_heads=2, head_dim=128),
                tokens=[16 * K, 32 * K, 64 * K, 128 * K, 256 * K],
                dense_up_to=128 * K,  # Base's blockwise layer at 256K would take about half an hour alone
                budget_s=900,
            ),
            online=dict(
                num_sinks=256, window=2048, contexts=[1 * K, 4 * K, 16 * K, 64 * K], prefill_chunk=8 * K, steps=20
            ),
        ),
    )


def quick_plan() -> Plan:
    return Plan(
        name="quick",
        bandwidth_bytes=64 * M,
        matmul_size=256,
        probe_repeats=3,
        ops={
            "gdn": {"B": 1, "T": 256, "H": 2, "Dk": 16, "Dv": 32},
            "chunk_repeats": 3,
            "step_repeats": 10,
            "swa_prefill": [[256, 256], [512, 128]],
            "swa_repeats": 2,
            "swa_heads": {"H": 4, "KV": 2, "D": 16},
            "swa_window": 128,
        },
        decode_configs=["tiny"],
        decode={
            "tiny": dict(
                contexts=[64, 1 * K, 16 * K],
                baseline_contexts=[64, 1 * K, 16 * K],
                repeats=3,
                warmup=1,
                point_seconds=2,
                seconds=20,
                probe_longest=False,
            ),
        },
        prefill_configs=["tiny"],
        prefill={"tiny": dict(lengths=[64, 256], repeats=2, repeat_below=64, baseline_call_seconds=10, seconds=20)},
        memory_configs=["tiny"],
        memory={
            "tiny": dict(
                contexts=[1 * K],
                baseline_contexts=[1 * K],
                baseline_longest=False,
                steps=1,
                worker_timeout=120,
                seconds=60,
                curve_contexts=[K, 16 * K, 256 * K],
                parallel=True,
            ),
        },
        real_configs=["tiny"],
        real={"tiny": dict(context=1 * K, repeats=2, warmup=1, worker_timeout=120, parallel=True)},
        streaming=dict(
            config="tiny",
            frame_size=112,
            fps=2.0,
            frames=5,
            warmup_frames=1,
            fps_window=1,
            late_frame=3,
            infinitevl_seconds=30,
            baseline_seconds=30,
            baseline_stop_ratio=0.0,
            controlled_repeats=2,
        ),
        precision=dict(
            config="tiny",
            modes=["fp32", "bf16", "int8", "int4"],
            contexts=[64, 1 * K],
            repeats=3,
            warmup=1,
            group_size=32,
            prefill_tokens=256,
            prefill_chunk=128,
            prefill_repeats=1,
            frame=56,
            vision_repeats=1,
            worker_timeout=300,
            # tiny GGUF files, seconds; skipped with a note where llama-cpp-python is not installed (make peer)
            llamacpp=dict(
                tiny=True,
                types=["Q8_0", "Q4_0"],
                models=dict(
                    qwen2=dict(contexts=[64, 1 * K], repeats=2, seconds=120),
                    qwen35=dict(contexts=[64, 1 * K], repeats=2, prefill_tokens=256, seconds=120),
                ),
            ),
        ),
        quality=dict(
            modes=["fp32", "bf16", "int8", "int4", "int8-products"],
            group_size=128,
            demo_seeds=[2026],
            demo_frames=16,
            kl_streams=1,
            kl_frames=24,
            kl_seed=11,
            fixture=str(FIXTURE),
            fixture_group_size=32,
        ),
        variants=dict(
            offline=dict(
                widths=dict(hidden=64, heads=4, kv_heads=2, head_dim=16),
                pattern=dict(sparse_chunk_size=8, sparse_top_k=4, sparse_local_tokens=32, sparse_dense_threshold=64),
                tokens=[256, 512],
                budget_s=60,
            ),
            online=dict(num_sinks=8, window=32, contexts=[64, 256], prefill_chunk=128, steps=3),
        ),
        stream4b=dict(
            config="tiny",
            modes=["bf16", "int4+int8p"],
            modes_without_bf16=["fp32", "int4-fp32+int8p"],
            group_size=32,
            fps=2.0,
            streams=[
                dict(size=112, paired=False, frames=2),
                dict(size=112, paired=True, frames=4),
                dict(size=56, paired=False, frames=2),
                dict(size=56, paired=True, frames=4),
                dict(size=56, paired=True, frames=8, frames_per_step=4),
            ],
            warmup_steps=1,
            floor_repeats=2,
            long=dict(mode="int4", size=56, paired=True, frames=16),
            probe=dict(size=112, repeats=2),
            decode=dict(context=64, repeats=3),
        ),
        # no ray section: it starts a Ray cluster (test_serving_ray.py runs its measurements against one)
        notes=["quick run: tiny sizes that only check that the benchmark code works; its numbers mean nothing"],
        # one thread: tiny ops are dominated by thread wake-ups, ruinously so when another process holds a core
        threads=1,
    )


def _dtype(plan: Plan, section: str) -> str:
    """The precisions a section measures."""
    if section in ("precision", "quality"):
        return "float32, bfloat16, int8, int4"
    if section == "stream4b":
        from .stream4b import plan_modes

        names = {"bf16": "bfloat16", "fp32": "float32"}
        return ", ".join(names.get(m, m) for m in plan_modes(plan.stream4b))
    return "float32"


def _load(out: Path, section: str) -> dict | None:
    path = out / f"{section}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _bandwidth(plan: Plan, out: Path, progress) -> float:
    """The bandwidth decode floors use: this run's machine section, or a probe now."""
    probe = _load(out, "machine")
    if probe is None:
        progress("no machine.json: probing bandwidth first")
        return machine.probe_bandwidth(plan.bandwidth_bytes, plan.probe_repeats)["bandwidth"]
    return probe["result"]["bandwidth"]["bandwidth"]


def run_section(name: str, plan: Plan, out: Path, progress) -> dict[str, Any]:
    from . import decode, memory, ops, prefill, real, streaming

    if name == "machine":
        return machine.run(plan, progress)
    if name == "ops":
        return ops.run(plan, progress)
    if name == "decode":
        return decode.run(plan, progress, _bandwidth(plan, out, progress))
    if name == "prefill":
        return prefill.run(plan, progress)
    if name == "memory":
        previous = _load(out, "decode")
        longest = {}
        if previous is not None:
            longest = {n: c.get("baseline_longest_context") for n, c in previous["result"]["configs"].items()}
        return memory.run(plan, progress, longest)
    if name == "real":
        return real.run(plan, progress)
    if name == "streaming":
        return streaming.run(plan, progress)
    if name == "precision":
        from . import precision

        cache = out / "cache" if plan.name == "quick" else CACHE  # the full run's checkpoint is 8.8 GB: not in out
        return precision.run(plan, progress, _bandwidth(plan, out, progress), cache)
    if name == "quality":
        from . import quality

        return quality.run(plan, progress)
    if name == "ray":
        from . import ray

        return ray.run(plan, progress)
    if name == "variants":
        from . import variants

        return variants.run(plan, progress, _load(out, "variants"))
    if name == "stream4b":
        from . import stream4b

        return stream4b.run(plan, progress, out / "cache" if plan.name == "quick" else CACHE)
    raise ValueError(f"unknown section {name!r}; known: {list(SECTIONS)}")


def run(
    plan: Plan,
    out: Path,
    sections: list[str],
    command: str,
    markdown: Path,
    progress: Progress | None = None,
) -> Path:
    """Run `sections` in order, writing `out/<section>.json` after each, then the report."""
    from . import report

    progress = progress or Progress()
    out.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    threads = torch.get_num_threads()
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    try:
        _run_sections(plan, out, sections, command, progress)
    finally:
        torch.set_num_threads(threads)
    path = report.write(out, markdown)
    progress(f"report -> {path}")
    return path


def _run_sections(plan: Plan, out: Path, sections: list[str], command: str, progress) -> None:
    for name in [s for s in SECTIONS if s in sections]:
        skip = {"streaming": plan.streaming, "precision": plan.precision, "ray": plan.ray, "stream4b": plan.stream4b}
        skip = skip.get(name, {}).get("skip")
        if skip:
            continue
        progress(f"section {name} ({plan.name} plan)")
        facts = machine.describe()
        start = time.perf_counter()
        with torch.inference_mode(), OtherLoad() as others:
            result = run_section(name, plan, out, progress)
        record = {
            "section": name,
            "command": command,
            "plan": plan.name,
            "dtype": _dtype(plan, name),
            "machine": facts,
            "settings": plan.section(name),
            "notes": plan.notes,
            "elapsed_s": time.perf_counter() - start,
            "other_load": others.summary(),
            "result": result,
        }
        (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        progress(f"section {name} done in {record['elapsed_s']:.1f} s -> {out / (name + '.json')}")
