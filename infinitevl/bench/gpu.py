"""The GPU path, checked and measured in one command: `python -m infinitevl.bench.gpu` (docs/gpu.md).

1. Correctness first (`gpu_checks.py`): flash-linear-attention's kernels and the torch ops against the fp64
   reference, the official fixture's full forward on the device, chunked prefill + decode against a full pass,
   greedy generations of the bundled model against the CPU's.
2. Figures, InfiniteVL-4B's widths with random weights in bf16 (`configs.build_infinitevl`):
    decode      ms per token at each context, the state filled as `decode.py` does (rings full up to the window,
                random memories): eager, and replayed from a CUDA graph (`engine/cuda_graph.py`) with its speedup;
                transformers' Qwen2.5-VL text model of the same widths (SDPA, `DynamicCache` filled with N random
                keys and values) at the contexts that fit in the device's free memory
    prefill     tokens/s of the engine's chunked prefill (chunks of 2048) and of the baseline's one pass
    memory      peak device memory of each phase (`torch.cuda.max_memory_allocated`, reset before it)
    streaming   live frames/s at 448x448 (256 tokens each) through `StreamSession.append_frame` with the full
                vision tower; random frames, the processor's resize + patchify on the CPU included ("end to end")
                and left out ("device")
   A step's time is the median over rounds of (wall time of `steps` calls, then a device synchronisation) / steps.
3. The paper's figures beside them (RTX 4090: ~10 ms per token flat; 3.6x faster than Qwen2.5-VL-3B, 8x at
   300-350K tokens; 24 frames/s live at 448x448; about 9 GB), with the card this ran on named.

`--device cpu --quick` runs the same code at tiny sizes (the test suite does); checks that need CUDA or
flash-linear-attention are then reported as skipped with the reason. Prints a short table last, writes JSON
(`--json`, default runs/gpu.json); `infinitevl bench --report-only` puts docs/benchmarks/gpu.json into
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from .timing import fmt_tokens

K = 1024
PAPER = {
    "card": "RTX 4090",
    "decode_ms": 10.0,
    "speedup": 3.6,
    "speedup_long": 8.0,
    "long_context": "300-350K",
    "streaming_fps": 24.0,
    "memory_gib": 9.0,
}
LONG = 320 * K  # inside the paper's 300-350K


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "config": "tiny",
            "contexts": [64, 256, 1024],
            "steps": 3,
            "rounds": 2,
            "prefill": [256],
            "frames": 3,
            "warmup_frames": 1,
            "budget_s": 300,
        }
    return {
        "config": "4b",
        "contexts": [4 * K, 64 * K, 256 * K, LONG, 1024 * K],
        "steps": 20,
        "rounds": 5,
        "prefill": [16 * K, 64 * K],
        "frames": 120,
        "warmup_frames": 8,
        "budget_s": 420,
    }


# -- device facts and timing --------------------------------------------------------------------------------------------
def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(device: torch.device) -> dict[str, Any]:
    from .machine import cpu_model

    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "flash_linear_attention": _version("flash-linear-attention"),
        "fla_core": _version("fla-core"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            card=props.name,
            memory_bytes=props.total_memory,
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            driver=_driver(),
        )
    else:
        info.update(card=f"CPU: {info['cpu']}", driver=None, cuda=None)
    return info


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, IndexError):
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device, steps: int, rounds: int, warmup: int = 2) -> dict[str, Any]:
    """Median seconds per call over `rounds` rounds of `steps` calls each, the device synchronised per round."""
    for _ in range(warmup):
        fn()
    sync(device)
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        per_call.append((time.perf_counter() - start) / steps)
    return {"median_s": statistics.median(per_call), "min_s": min(per_call), "rounds": rounds, "steps": steps}


def reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int:
    """Peak device memory since `reset_peak`; on a CPU the process's peak resident memory (whole run)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    from .timing import peak_rss

    return peak_rss()


def free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from .decode import reserve_bytes
    from .timing import available_ram

    return available_ram() - reserve_bytes()


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


# -- InfiniteVL ----------------------------------------------------------------------------------------------------------
def decode_figures(model, contexts, p, device, budget, progress) -> tuple[list[dict], list[dict]]:
    """Eager and CUDA-graph ms/token at each context; the first context also checks replay against eager."""
    from ..engine.generation import decode_step
    from . import configs as C

    token = torch.tensor([7], device=device)
    rows, checks = [], []
    for n in contexts:
        if budget.left() < 0:
            rows.append({"context": n, "status": "over_time_budget"})
            continue
        reset_peak(device)
        state = C.fill_state(model.new_state(), n)
        eager = time_steps(lambda st=state: decode_step(model, st, token), device, p["steps"], p["rounds"])
        row = {"context": n, "status": "measured", "eager_s": eager["median_s"], "state_bytes": state.nbytes}
        row["peak_bytes"] = peak_bytes(device)
        if device.type == "cuda":
            from ..engine.cuda_graph import GraphedDecoder

            if not checks:
                checks.append(_graph_check(model, state, device))
            try:
                graphed = GraphedDecoder(model, state)
                graph = time_steps(lambda g=graphed: g(token), device, p["steps"], p["rounds"])
                row.update(graph_s=graph["median_s"], graph_speedup=eager["median_s"] / graph["median_s"])
                del graphed
            except Exception as e:  # noqa: BLE001 -- the eager figure stands; the error is reported
                row.update(graph_s=None, graph_error=f"{type(e).__name__}: {e}")
        else:
            row.update(graph_s=None, graph_skipped="CUDA graphs need a CUDA device")
        rows.append(row)
        graph_text = f", graph {row['graph_s'] * 1e3:.2f} ms" if row.get("graph_s") else ""
        progress(f"decode InfiniteVL {n}: eager {row['eager_s'] * 1e3:.2f} ms{graph_text}")
        del state
    if device.type != "cuda":
        checks.append({"check": "cuda_graph/replay_vs_eager", "status": "skipped", "reason": "needs a CUDA device"})
    return rows, checks


def _graph_check(model, state, device) -> dict[str, Any]:
    """Eight replayed steps against eight eager steps from the same state (a copy), same tokens."""
    from ..engine.cuda_graph import GraphedDecoder
    from ..engine.generation import decode_step
    from .gpu_checks import TOL, rel_err

    try:
        work, ref = state.clone(), state.clone()
        graphed = GraphedDecoder(model, work)
        tokens = torch.randint(0, model.config.text.vocab_size, (8,), generator=torch.Generator().manual_seed(1))
        errs = []
        for t in tokens.tolist():
            tok = torch.tensor([t], device=device)
            want = decode_step(model, ref, tok).float()
            got = graphed(tok).float()
            errs.append(rel_err(got, want))
        worst = max(e[0] for e in errs)
        tol = TOL[str(model.dtype).removeprefix("torch.")]
        return {
            "check": "cuda_graph/replay_vs_eager",
            "status": "passed" if worst <= tol else "failed",
            "rel_err": worst,
            "max_abs_err": max(e[1] for e in errs),
            "tolerance_rel": tol,
        }
    except Exception as e:  # noqa: BLE001 -- reported, the timings go on without graphs
        return {"check": "cuda_graph/replay_vs_eager", "status": "error", "error": f"{type(e).__name__}: {e}"}


def prefill_figures(model, lengths, device, budget, progress) -> list[dict]:
    from ..engine.generation import prefill

    gen = torch.Generator().manual_seed(3)
    vocab = model.config.image_token_id  # ordinary text ids lie below the special tokens
    warm = torch.randint(0, vocab, (1, min(lengths[0], 4096)), generator=gen)
    prefill(model, model.new_state(), warm)  # kernels compiled and tuned before timing
    rows = []
    for n in lengths:
        if budget.left() < 0:
            rows.append({"tokens": n, "status": "over_time_budget"})
            continue
        ids = torch.randint(0, vocab, (1, n), generator=gen)
        reset_peak(device)
        state = model.new_state()
        sync(device)
        start = time.perf_counter()
        prefill(model, state, ids)
        sync(device)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "tokens": n,
                "status": "measured",
                "seconds": seconds,
                "tokens_per_s": n / seconds,
                "peak_bytes": peak_bytes(device),
            }
        )
        progress(f"prefill InfiniteVL {n}: {n / seconds:,.0f} tokens/s")
    return rows


def streaming_figures(model, config, p, device, budget, progress) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from ..engine.session import StreamSession
    from ..processing.processor import Processor
    from . import configs as C

    size = (448, 448)
    processor = Processor(C.byte_tokenizer(config), config, min_pixels=56 * 56, max_pixels=size[0] * size[1])
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(8)]
    original = processor.encode_frame
    spent = {"s": 0.0}

    def timed_encode(*args, **kwargs):  # the CPU part of a frame: resize + patchify
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent["s"] += time.perf_counter() - start

    processor.encode_frame = timed_encode
    session = StreamSession(model, processor, frame_size=size)
    for i in range(p["warmup_frames"]):
        session.append_frame(frames[i % len(frames)], i / 2.0)
    reset_peak(device)
    totals, cpu = [], []
    stop = "frames_done"
    for i in range(p["warmup_frames"], p["warmup_frames"] + p["frames"]):
        spent["s"] = 0.0
        sync(device)
        start = time.perf_counter()
        per_frame = session.append_frame(frames[i % len(frames)], i / 2.0)
        sync(device)
        totals.append(time.perf_counter() - start)
        cpu.append(spent["s"])
        if budget.left() < 0:
            stop = "over_time_budget"
            break
    total, pre = statistics.median(totals), statistics.median(cpu)
    out = {
        "frame_size": list(size),
        "frames": len(totals),
        "tokens_per_frame": per_frame,
        "stream_tokens": session.stats.tokens,
        "fps_end_to_end": 1.0 / total,
        "fps_device": 1.0 / max(total - pre, 1e-9),
        "median_frame_s": total,
        "median_preprocess_s": pre,
        "peak_bytes": peak_bytes(device),
        "state_bytes": session.stats.state_bytes,
        "stop": stop,
    }
    progress(f"streaming: {out['fps_end_to_end']:.1f} frames/s end to end, {out['fps_device']:.1f} without preprocess")
    return out


# -- the baseline ---------------------------------------------------------------------------------------------------------
def baseline_figures(config, p, device, dtype, budget, progress) -> dict[str, Any]:
    from . import configs as C

    model = C.build_baseline(config, device=device, dtype=dtype)
    t = config.text
    per_token = C.kv_bytes_per_token(config, torch.finfo(dtype).bits // 8)
    token = torch.tensor([7], device=device)
    decode, prefill = [], []
    warmed = False
    for n in p["contexts"]:
        # the cache, DynamicCache's concatenated copy of one layer, SDPA's expanded keys and values of one layer
        need = (
            per_token * n * (1 + 1 / t.num_hidden_layers)
            + 2 * per_token * n / t.num_hidden_layers * (t.num_attention_heads // t.num_key_value_heads)
            + 2**30
        )
        if need > free_bytes(device):
            decode.append({"context": n, "status": "out_of_memory", "needed_bytes": int(need)})
            progress(f"decode baseline {n}: does not fit ({need / 2**30:.1f} GiB)")
            continue
        if budget.left() < 0:
            decode.append({"context": n, "status": "over_time_budget"})
            continue
        reset_peak(device)
        cache = C.filled_cache(model, n)
        if not warmed:
            time_steps(lambda m=model, c=cache: m.decode_step(c, token), device, 2, 1)
            warmed = True
        timing = time_steps(
            lambda m=model, c=cache: m.decode_step(c, token), device, max(2, p["steps"] // 4), p["rounds"], 1
        )
        decode.append(
            {"context": n, "status": "measured", "eager_s": timing["median_s"], "peak_bytes": peak_bytes(device)}
        )
        progress(f"decode baseline {n}: {timing['median_s'] * 1e3:.2f} ms")
        del cache
    gen = torch.Generator().manual_seed(3)
    for n in p["prefill"]:
        if budget.left() < 0 or per_token * n * 3 > free_bytes(device):
            prefill.append({"tokens": n, "status": "over_time_budget" if budget.left() < 0 else "out_of_memory"})
            continue
        ids = torch.randint(0, config.image_token_id, (1, n), generator=gen).to(device)
        model.prefill(model.new_cache(), input_ids=ids[:, : min(n, 2048)])  # warm-up
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        model.prefill(model.new_cache(), input_ids=ids)
        sync(device)
        seconds = time.perf_counter() - start
        prefill.append(
            {
                "tokens": n,
                "status": "measured",
                "seconds": seconds,
                "tokens_per_s": n / seconds,
                "peak_bytes": peak_bytes(device),
            }
        )
        progress(f"prefill baseline {n}: {n / seconds:,.0f} tokens/s")
    del model
    reset_peak(device)
    return {"decode": decode, "prefill": prefill}


# -- the paper ------------------------------------------------------------------------------------------------------------
def _at(rows: list[dict], key: str, n: int) -> dict | None:
    return next((r for r in rows if r.get(key) == n and r.get("status") == "measured"), None)


def paper_rows(figures: dict[str, Any], card: str) -> list[dict[str, Any]]:
    """Each paper figure beside this run's (None where this run has none)."""
    ours = figures.get("decode", [])
    base = figures.get("baseline", {}).get("decode", [])
    measured = [r for r in ours if r.get("status") == "measured"]
    rows = []
    if measured:
        eager = [r["eager_s"] * 1e3 for r in measured]
        graph = [r["graph_s"] * 1e3 for r in measured if r.get("graph_s")]
        text = f"eager {min(eager):.1f}-{max(eager):.1f} ms"
        text += f", CUDA graph {min(graph):.1f}-{max(graph):.1f} ms" if graph else ""
        text += f" ({fmt_tokens(measured[0]['context'])}-{fmt_tokens(measured[-1]['context'])} tokens)"
        rows.append(
            {
                "figure": "decode per token, flat with context",
                "paper": f"~{PAPER['decode_ms']:.0f} ms",
                "this_run": text,
                "value": min(graph or eager),
            }
        )
    for label, paper, n in (
        ("decode speedup over Qwen2.5-VL (same widths)", f"{PAPER['speedup']}x", None),
        (f"decode speedup at {PAPER['long_context']} tokens", f"{PAPER['speedup_long']:.0f}x", LONG),
    ):
        pairs = [(r, _at(base, "context", r["context"])) for r in measured if n is None or r["context"] == n]
        pairs = [(a, b) for a, b in pairs if b is not None]
        if n is None and pairs:
            pairs = pairs[:1]  # the shortest context both ran
        if pairs:
            a, b = pairs[0]
            value = b["eager_s"] / a["eager_s"]
            text = f"{value:.1f}x at {fmt_tokens(a['context'])} (eager both)"
            if a.get("graph_s"):
                text += f"; {b['eager_s'] / a['graph_s']:.1f}x with CUDA graphs"
            rows.append({"figure": label, "paper": paper, "this_run": text, "value": value})
        else:
            why = "the baseline did not run at that context" if n else "no context both ran"
            rows.append({"figure": label, "paper": paper, "this_run": f"not measured ({why})", "value": None})
    stream = figures.get("streaming")
    if stream:
        text = f"{stream['fps_end_to_end']:.1f} frames/s end to end, {stream['fps_device']:.1f} without the CPU resize"
        rows.append(
            {
                "figure": "live streaming at 448x448",
                "paper": f"{PAPER['streaming_fps']:.0f} frames/s",
                "this_run": text,
                "value": stream["fps_end_to_end"],
            }
        )
        peaks = [stream["peak_bytes"]] + [r["peak_bytes"] for r in measured]
        text = f"{max(peaks) / 2**30:.1f} GiB peak (streaming {stream['peak_bytes'] / 2**30:.1f} GiB)"
        rows.append(
            {"figure": "memory", "paper": f"about {PAPER['memory_gib']:.0f} GB", "this_run": text, "value": max(peaks)}
        )
    for r in rows:
        r["card"] = card
        r["paper_card"] = PAPER["card"]
    return rows


# -- the command --------------------------------------------------------------------------------------------------------
def fla_problem(device: torch.device) -> str | None:
    """Why flash-linear-attention's kernels cannot be imported here (None: they can, or this is not a CUDA run)."""
    from ..ops import backend

    if device.type != "cuda" or not backend.fla_installed():
        return None
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- any failure to import means the torch ops must take over
        return f"{type(e).__name__}: {e}"
    return None


def run(device: torch.device, quick: bool, dtype: torch.dtype, budget_s: float | None, progress, save) -> dict:
    """Checks, then each phase of figures; `save(record)` after each, so that a run cut short leaves its JSON. A
    phase that raises is recorded under `errors` and the next one runs."""
    from ..ops import backend
    from . import configs as C
    from .gpu_checks import run_all

    started = time.perf_counter()
    p = plan(quick)
    budget = Budget(budget_s if budget_s is not None else p["budget_s"])
    info = describe(device)
    progress(f"on {info['card']}: torch {info['torch']}, triton {info['triton']}, fla {info['flash_linear_attention']}")
    figures: dict[str, Any] = {"config": p["config"], "dtype": str(dtype).removeprefix("torch.")}
    record: dict[str, Any] = {
        "command": "python -m infinitevl.bench.gpu " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "plan": "quick" if quick else "full",
        "machine": info,
        "elapsed_s": 0.0,
        "checks": [],
        "figures": figures,
        "errors": {},
        "paper": [],
    }

    def checkpoint() -> None:
        record["elapsed_s"] = time.perf_counter() - started
        record["paper"] = paper_rows(figures, info["card"])
        save(record)

    def phase(name: str, fn, empty):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- a broken phase is a result; the others still run
            record["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            progress(f"{name} failed: {type(e).__name__}: {e}")
            return empty
        finally:
            checkpoint()

    problem = fla_problem(device)
    if problem:
        record["errors"]["fla_import"] = problem
        progress(f"flash-linear-attention does not import ({problem}): the torch ops take over")
    record["checks"] = phase("checks", lambda: run_all(device, quick, progress), [])
    config = C.infinitevl_config(p["config"])
    use = "torch" if problem else "auto"
    figures["gdn_backend"] = backend.select(device) if not problem else "torch"
    progress(f"building {p['config']} with its vision tower on {device} in {figures['dtype']}")
    with backend.use_backend(use):
        model = phase("build", lambda: C.build_infinitevl(config, vision=True, device=device, dtype=dtype), None)
        if model is not None:
            figures["weight_bytes"] = C.weight_bytes(model)
            figures["decode"], graph_checks = phase(
                "decode", lambda: decode_figures(model, p["contexts"], p, device, budget, progress), ([], [])
            )
            record["checks"] += graph_checks
            figures["prefill"] = phase(
                "prefill", lambda: prefill_figures(model, p["prefill"], device, budget, progress), []
            )
            figures["streaming"] = phase(
                "streaming", lambda: streaming_figures(model, config, p, device, budget, progress), None
            )
        model = None  # freed before the baseline is built
        reset_peak(device)
        figures["baseline"] = phase(
            "baseline", lambda: baseline_figures(config, p, device, dtype, budget, progress), {}
        )
    checkpoint()
    return record


def table(record: dict[str, Any]) -> str:
    checks = record["checks"]
    counts = {s: sum(c["status"] == s for c in checks) for s in ("passed", "failed", "error", "skipped")}
    lines = [
        f"checks: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped"
    ]
    lines += [
        f"  {c['status'].upper()}: {c['check']} {c.get('rel_err', c.get('error', ''))}"
        for c in checks
        if c["status"] in ("failed", "error")
    ]
    lines += [f"  ERROR in {name}: {text.splitlines()[0]}" for name, text in record["errors"].items()]
    f = record["figures"]
    base = f.get("baseline", {}).get("decode", [])
    lines.append(f"decode ms/token ({f['config']}, {f['dtype']}): context | eager | CUDA graph | baseline")
    for r in f.get("decode", []):
        if r["status"] != "measured":
            lines.append(f"  {r['context']:>8} | {r['status']}")
            continue
        b = _at(base, "context", r["context"])
        lines.append(
            f"  {r['context']:>8} | {r['eager_s'] * 1e3:8.2f} | "
            + (f"{r['graph_s'] * 1e3:8.2f}" if r.get("graph_s") else "       -")
            + " | "
            + (
                f"{b['eager_s'] * 1e3:8.2f}"
                if b
                else next((x["status"] for x in base if x["context"] == r["context"]), "-")
            )
        )
    for who, rows in (("InfiniteVL", f.get("prefill", [])), ("baseline", f.get("baseline", {}).get("prefill", []))):
        for r in rows:
            value = f"{r['tokens_per_s']:,.0f} tokens/s" if r["status"] == "measured" else r["status"]
            lines.append(f"prefill {who} {r['tokens']}: {value}")
    lines.append(f"paper ({PAPER['card']}) against this run ({record['machine']['card']}):")
    for r in record["paper"]:
        lines.append(f"  {r['figure']}: paper {r['paper']} | here {r['this_run']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infinitevl.bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the code paths run")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--budget-s", type=float, help="seconds for the figures before phases are skipped")
    parser.add_argument("--json", type=Path, default=Path("runs/gpu.json"), help="where the JSON goes")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu --quick for the CPU form")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def save(record: dict) -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")

    record = run(device, args.quick, dtype, args.budget_s, progress, save)
    print(table(record))
    print(f"JSON: {args.json}")
    bad = [c for c in record["checks"] if c["status"] in ("failed", "error")]
    return 1 if bad or record["errors"] else 0


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
