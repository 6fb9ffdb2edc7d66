"""The report: every section's JSON -> PNG plots -> markdown with tables, the exact commands, the machine and the
targets of the benchmark issue, each judged from the measurements (nothing here is typed in by hand).

`write(out, markdown)` reads whatever `<section>.json` files are in `out`, so a section rerun alone still yields the
whole report. The methodology paragraphs are the sections' own module docstrings: they cannot drift from the code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from . import SECTIONS, plots
from .llamacpp_report import llamacpp_md, llamacpp_targets
from .timing import fmt_bytes, fmt_tokens

K, M = 2**10, 2**20
FLAT_RANGE = (4 * K, 1 * M)
BUSY_CORES = 0.2  # cores used by other processes (on average) above which a section's timings are flagged


def load(out: Path) -> dict[str, dict]:
    return {s: json.loads((out / f"{s}.json").read_text()) for s in SECTIONS if (out / f"{s}.json").exists()}


# -- targets ------------------------------------------------------------------------------------------------------------
def _target(name: str, met: bool | None, measured: str, detail: str = "") -> dict[str, Any]:
    return {"target": name, "met": met, "measured": measured, "detail": detail, "section": _section_of(name)}


def _ok(points: list[dict]) -> list[dict]:
    return [p for p in points if p.get("status") == "measured"]


def ratios(ours: list[dict], base: list[dict], key: str) -> list[dict]:
    """baseline time / InfiniteVL time at every length both measured (> 1: InfiniteVL faster)."""
    mine = {p[key]: p["median_s"] for p in _ok(ours)}
    return [
        {key: p[key], "ours_s": mine[p[key]], "baseline_s": p["median_s"], "ratio": p["median_s"] / mine[p[key]]}
        for p in _ok(base)
        if p[key] in mine
    ]


def margin_verdict(rows: list[dict], key: str) -> tuple[bool | None, str]:
    """InfiniteVL faster at the longest common length, and the margin growing (each ratio >= 0.90 x the previous:
    10% of noise allowed, the run-to-run spread of single decode steps on this 2-core machine; the last above the
    first)."""
    if not rows:
        return None, "no length measured for both"
    rows = sorted(rows, key=lambda r: r[key])
    faster = rows[-1]["ratio"] > 1
    growing = all(b["ratio"] >= 0.90 * a["ratio"] for a, b in zip(rows, rows[1:])) and (
        len(rows) == 1 or rows[-1]["ratio"] > rows[0]["ratio"]
    )
    cross = next((r[key] for i, r in enumerate(rows) if all(x["ratio"] > 1 for x in rows[i:])), None)
    text = (
        f"{rows[-1]['ratio']:.2f}x at {fmt_tokens(rows[-1][key])} (longest both ran); crossover "
        + (f"at {fmt_tokens(cross)}" if cross is not None else "not reached")
        + f"; margin {'grows' if growing else 'does not grow'} with context"
    )
    return faster and growing, text


def targets(data: dict[str, dict]) -> list[dict]:
    """Every target of the issue, judged from the JSON; each tagged with its section (for the busy-machine note),
    and the ones a run did not measure listed as such."""
    out = _judge(data)
    names = " ".join(t["target"] for t in out)
    missing = [
        (
            "ops",
            "gated delta rule",
            "chunked gated delta rule >= 2x faster than transformers' torch_chunk_gated_delta_rule",
        ),
        ("decode", "4b decode step", "4b decode step within 1.5x of its bandwidth floor"),
        ("decode", "decode latency flat", "InfiniteVL decode latency flat within 10% from 4K to 1M"),
        ("prefill", "prefill faster", "prefill faster than the baseline, margin growing with length"),
        ("streaming", "streaming FPS", "streaming FPS at frame 1,000 within 10% of the first frames"),
        ("precision", "precision:", "precision: int4 / int8 decode, bf16 prefill and vision against fp32, int4 memory"),
        (
            "stream4b",
            "real-size streaming:",
            "real-size streaming: 448 / 224 frames/s >= 3x today's path, each part within 1.5x of its floor",
        ),
    ]
    for section, key, name in missing:
        if key not in names:
            out.append(_target(name, None, f"not measured (no {section} results for it in this run)"))
            out[-1]["section"] = section
    return out


def _section_of(name: str) -> str:
    if name.startswith("real-size streaming:"):
        return "stream4b"
    if "real tokens" in name:
        return "real"
    if name.startswith("precision:"):
        return "precision"
    if "gated delta rule" in name:
        return "ops"
    if "prefill" in name:
        return "prefill"
    if "streaming" in name:
        return "streaming"
    return "decode"


def _judge(data: dict[str, dict]) -> list[dict]:
    out = []
    ops = data.get("ops", {}).get("result", {}).get("results", [])
    chunk = next((r for r in ops if r["op"] == "gdn_chunked"), None)
    if chunk:
        shape = ",".join(f"{k}={v}" for k, v in chunk["shape"].items())
        out.append(
            _target(
                "chunked gated delta rule >= 2x faster than transformers' torch_chunk_gated_delta_rule",
                chunk["speedup"] >= 2,
                f"{chunk['speedup']:.2f}x ({shape})",
                f"medians {chunk['ours']['median_s'] * 1e3:.0f} ms vs {chunk['theirs']['median_s'] * 1e3:.0f} ms",
            )
        )
    decode = data.get("decode", {}).get("result", {}).get("configs", {})
    four = decode.get("4b")
    if four:
        at4k = next((p for p in _ok(four["infinitevl"]) if p["context"] == 4 * K), None)
        if at4k:
            out.append(
                _target(
                    "4b decode step within 1.5x of its bandwidth floor",
                    at4k["achieved_over_floor"] <= 1.5,
                    f"{at4k['achieved_over_floor']:.2f}x the floor at 4K",
                    f"{at4k['median_s'] * 1e3:.0f} ms vs floor {at4k['floor_s'] * 1e3:.0f} ms "
                    f"({fmt_bytes(at4k['floor_bytes'])} at {decode_bandwidth(data) / 1e9:.1f} GB/s)",
                )
            )
    for name, c in decode.items():
        pts = _ok(c["infinitevl"])
        inside = [p for p in pts if FLAT_RANGE[0] <= p["context"] <= FLAT_RANGE[1]]
        span = inside if len(inside) >= 2 else pts
        if len(span) >= 2:
            ref = span[0]["median_s"]
            worst = max(span, key=lambda p: abs(p["median_s"] / ref - 1))
            dev = worst["median_s"] / ref - 1
            rng = f"{fmt_tokens(span[0]['context'])}-{fmt_tokens(span[-1]['context'])}"
            out.append(
                _target(
                    f"{name}: InfiniteVL decode latency flat within 10% ({rng})",
                    abs(dev) <= 0.10,
                    f"largest deviation {dev:+.1%} (at {fmt_tokens(worst['context'])})",
                    "" if span is inside else "fewer than two points in 4K-1M: all measured contexts used",
                )
            )
        sizes = {p["state_bytes"] for p in pts}
        if pts:
            out.append(
                _target(
                    f"{name}: state bytes identical at every context",
                    len(sizes) == 1,
                    f"{fmt_bytes(min(sizes))} at {len(pts)} contexts up to {fmt_tokens(pts[-1]['context'])}"
                    if len(sizes) == 1
                    else f"{len(sizes)} different sizes",
                )
            )
        met, text = margin_verdict(ratios(c["infinitevl"], c["baseline"], "context"), "context")
        out.append(_target(f"{name}: decode faster than the baseline, margin growing with context", met, text))
    prefill = data.get("prefill", {}).get("result", {}).get("configs", {})
    for name, c in prefill.items():
        met, text = margin_verdict(ratios(c["infinitevl"], c["baseline"], "length"), "length")
        out.append(_target(f"{name}: prefill faster than the baseline, margin growing with length", met, text))
    out.extend(real_targets(data.get("real", {}).get("result", {})))
    stream = data.get("streaming", {}).get("result", {})
    if "infinitevl" in stream:
        out.extend(streaming_targets(stream))
    if data.get("precision", {}).get("result", {}).get("modes"):
        out.extend(precision_targets(data["precision"]))
    if data.get("stream4b", {}).get("result", {}).get("runs"):
        out.extend(stream4b_targets(data["stream4b"]))
    return out


def _measured(record: dict, mode: str) -> dict | None:
    m = record["result"]["modes"].get(mode)
    return m if m and m.get("status") == "measured" else None


def precision_targets(record: dict) -> list[dict]:
    """The precision issue's targets, as ratios within the run, each with the CPU and the kernel."""
    r, m = record["result"], record["machine"]
    cpu = f"{m['cpu']} ({' '.join(f for f in m['cpu_flags'] if 'bf16' in f or 'amx' in f) or 'no bf16 flags'})"
    name = r["config"]["name"]
    fp32 = _measured(record, "fp32")
    out = []

    def ratio(mode, key, label, goal, kernel):
        other = _measured(record, mode)
        if fp32 is None or other is None:
            out.append(_target(f"precision: {label} >= {goal}x fp32 ({name})", None, "not measured"))
            return
        a, b = key(fp32), key(other)
        out.append(
            _target(
                f"precision: {label} >= {goal}x fp32 ({name})",
                a / b >= goal,
                f"{a / b:.2f}x",
                f"{b * 1e3:.0f} vs {a * 1e3:.0f} ms; {cpu}; kernel: {kernel}",
            )
        )

    decode = lambda x: x["decode"][0]["median_s"]  # noqa: E731
    ratio(
        "int4",
        decode,
        f"int4 decode at {fmt_tokens(r['modes']['fp32']['decode'][0]['context'] if fp32 else 0)}",
        3.5,
        r["kernels"]["int4"],
    )
    ratio("int8", decode, "int8 decode", 2.0, r["kernels"]["int8"])
    ratio(
        "bf16",
        lambda x: x["prefill"]["median_s"],
        f"bf16 prefill of {fmt_tokens(r['modes']['fp32']['prefill']['tokens']) if fp32 else '?'} tokens",
        2.0,
        r["kernels"]["bf16"],
    )
    side = fp32["vision"]["frame"] if fp32 else "?"
    ratio(
        "bf16",
        lambda x: x["vision"]["median_s"],
        f"bf16 vision tower, one {side}x{side} frame",
        2.0,
        "bf16 (oneDNN / SDPA)",
    )
    int4 = _measured(record, "int4")
    if int4 is not None:
        peak = int4["peak_bytes"]
        out.append(
            _target(
                f"precision: {name} peak RSS with the int4 decoder < 5 GiB",
                peak < 5 * 2**30,
                fmt_bytes(peak),
                f"whole process: weights {fmt_bytes(int4['weight_bytes'])} incl. vision tower, state, prefill; "
                f"fp32 {fmt_bytes(fp32['peak_bytes']) if fp32 else '-'}",
            )
        )
        step, mm = _overhead_split(int4)
        over = (step - mm) / step
        state_s = int4["decode"][0]["state_bytes"] / r["bandwidth"]
        plain = int4.get("plain_step")
        out.append(
            _target(
                "precision: per-step overhead outside the matmuls <= 10% of the int4 step",
                over <= 0.10,
                f"{over:.0%} ({(step - mm) * 1e3:.1f} of {step * 1e3:.1f} ms)",
                "step minus the same step's linear layers called alone, timed alternately; reading the state once "
                f"takes {state_s * 1e3:.1f} ms of it at the measured bandwidth; "
                + (
                    f"on the plain PyTorch ops the same step takes {plain['median_s'] * 1e3:.1f} ms (rest "
                    f"{(plain['median_s'] - mm) / plain['median_s']:.0%}); "
                    if plain
                    else ""
                )
                + f"decode: {int4.get('decode_kernels', 'plain PyTorch ops')}",
            )
        )
    out += llamacpp_targets(r.get("llamacpp", {}), r["modes"], cpu, _target)
    return out


def real_targets(result: dict) -> list[dict]:
    """Decode after a real prefill against a filled context of the same length: the filled contexts of the decode
    and memory sections stand for real ones if the step costs the same (within 10%) and the state is as large."""
    out = []
    for name, c in result.get("configs", {}).items():
        for who in ("infinitevl", "baseline"):
            r = c.get(who, {})
            if r.get("status") != "measured":
                continue
            ratio, same = r["real_over_filled"], r["real_state_bytes"] == r["filled_state_bytes"]
            out.append(
                _target(
                    f"{name}: {who} decode after {fmt_tokens(r['context'])} real tokens within 10% of the filled "
                    "context's, same state bytes",
                    abs(ratio - 1) <= 0.10 and same,
                    f"{ratio:.2f}x ({r['real']['median_s'] * 1e3:.2f} vs {r['filled']['median_s'] * 1e3:.2f} ms)",
                    f"{'state' if who == 'infinitevl' else 'KV cache'} {fmt_bytes(r['real_state_bytes'])} real, "
                    f"{fmt_bytes(r['filled_state_bytes'])} filled",
                )
            )
    return out


def streaming_targets(stream: dict) -> list[dict]:
    out = []
    w = stream["infinitevl"]["windows"]
    late_name = f"frame {stream['late_frame']}"
    if "first" in w and "late" in w:
        for kind in ("end_to_end", "decoder"):
            first, late = w["first"][f"fps_{kind}"], w["late"][f"fps_{kind}"]
            change = late / first - 1
            detail = ""
            if "window_full" in w:
                full = w["window_full"][f"fps_{kind}"]
                detail = f"vs frames {w['window_full']['frames'][0]}+ (sliding window full): {late / full - 1:+.1%}"
            if kind == "decoder" and stream.get("controlled"):
                detail += "; " + controlled_change(stream["controlled"])
            out.append(
                _target(
                    f"streaming FPS at {late_name} within 10% of the first frames ({kind.replace('_', ' ')})",
                    abs(change) <= 0.10,
                    f"{first:.2f} -> {late:.2f} FPS ({change:+.1%})",
                    detail,
                )
            )
    else:
        out.append(_target(f"streaming FPS at {late_name} within 10% of the first frames", None, "stream too short"))
    b = stream.get("baseline", {}).get("windows", {})
    if "first" in b and "last" in b:
        first, last = b["first"]["fps_end_to_end"], b["last"]["fps_end_to_end"]
        out.append(
            _target(
                "baseline streaming FPS declines",
                last < first,
                f"{first:.2f} -> {last:.2f} FPS ({last / first - 1:+.1%}) by frame {b['last']['frames'][1]}",
                f"stopped: {stream['baseline']['stop'].replace('_', ' ')}",
            )
        )
    return out


def decode_bandwidth(data: dict) -> float:
    return data.get("decode", {}).get("result", {}).get("bandwidth", 0.0)


# -- markdown -----------------------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(p: dict | None) -> str:
    if p is None:
        return "-"
    if p.get("status") != "measured":
        return p.get("status", "-").replace("_", " ")
    return f"{p['median_s'] * 1e3:.2f}"


def _provenance(record: dict) -> str:
    m = record["machine"]
    line = (
        f"`{record['command']}` ({record['plan']} plan), {m['date']}, {record['elapsed_s']:.0f} s; "
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, {fmt_bytes(m['ram_bytes'])} RAM, "
        f"torch {m['torch']}, transformers {m['transformers']}; {record['dtype']}, "
        + {"quality": "the bundled trained model and the official fixture", "ray": "the bundled model"}.get(
            record["section"], "random weights"
        )
    )
    others = record.get("other_load", {})
    if others.get("samples"):
        line += f"; other processes used {others['mean_cores']:.2f} cores on average during the section"
    if others.get("mean_cores", 0) >= BUSY_CORES:
        line += (
            f"\n\n> **The machine was busy**: other processes kept {others['mean_cores']:.2f} of {m['cores']} cores "
            f"busy on average (at most {others['max_cores']:.2f}) while this section ran. With every core in torch's "
            "thread pool each parallel op then waits for a preempted thread: these timings are not representative."
        )
    return line


def _method(section: str) -> str:
    import importlib

    doc = importlib.import_module(f"infinitevl.bench.{section}").__doc__ or ""
    return "<details><summary>How this is measured</summary>\n\n```\n" + doc.strip() + "\n```\n</details>"


def machine_md(record: dict) -> str:
    r, m = record["result"], record["machine"]
    bw = r["bandwidth"]
    rows = [
        [k, f"{bw[k]['bandwidth'] / 1e9:.1f} GB/s", fmt_bytes(bw[k]["bytes_moved"]), f"{bw[k]['median_s'] * 1e3:.1f}"]
        for k in ("copy", "sum", "gemv", "gemv_1_thread", "gemv_input_major", "gemv_batched_halves")
        if k in bw
    ]
    mm = r["matmul"]
    rows += [
        [
            f"matmul {k} {'x'.join(map(str, mm[k]['shape']))}",
            f"{mm[k]['flops'] / 1e9:.0f} GFLOP/s",
            "-",
            f"{mm[k]['median_s'] * 1e3:.1f}",
        ]
        for k in ("square", "linear")
    ]
    facts = _table(
        ["CPU", "flags", "cores / torch threads", "RAM", "OS", "python", "torch", "transformers", "BLAS"],
        [
            [
                m["cpu"],
                " ".join(m["cpu_flags"]),
                f"{m['cores']} / {m['torch_threads']}",
                fmt_bytes(m["ram_bytes"]),
                m["os"],
                m["python"],
                m["torch"],
                m["transformers"],
                f"{m['blas']} ({m['cpu_capability']})",
            ]
        ],
    )
    return (
        f"{facts}\n\n{_table(['probe', 'result', 'bytes', 'median ms'], rows)}\n\n"
        f"Decode floors use **{bw['bandwidth'] / 1e9:.1f} GB/s** (the {bw['bandwidth_from']} probe, the highest).\n\n"
        f"{_method('machine')}"
    )


def _layers(counts: dict[str, int]) -> str:
    names = {"sliding_attention": "sliding-window attention", "linear_attention": "Gated DeltaNet"}
    return ", ".join(f"{n} {names.get(kind, kind)}" for kind, n in counts.items())


def _kv(b: dict | None) -> str:
    if b is None:
        return "-"
    if "kv_bytes" in b:
        return fmt_bytes(b["kv_bytes"])
    return f"needs {fmt_bytes(b['needed_bytes'])}" if "needed_bytes" in b else "-"


def decode_md(record: dict) -> str:
    parts = []
    for name, c in record["result"]["configs"].items():
        ours = {p["context"]: p for p in c["infinitevl"]}
        base = {p["context"]: p for p in c["baseline"]}
        rows = []
        for n in sorted(set(ours) | set(base)):
            o, b = ours.get(n), base.get(n)
            ratio = (b["median_s"] / o["median_s"]) if o and b and "median_s" in o and "median_s" in b else None
            rows.append(
                [
                    fmt_tokens(n),
                    _ms(o),
                    f"{o['floor_s'] * 1e3:.2f} ({o['achieved_over_floor']:.2f}x)" if o and "floor_s" in o else "-",
                    fmt_bytes(o.get("state_bytes")) if o else "-",
                    _ms(b),
                    f"{b['floor_s'] * 1e3:.2f} ({b['achieved_over_floor']:.2f}x)" if b and "floor_s" in b else "-",
                    _kv(b),
                    f"{ratio:.2f}x" if ratio else "-",
                    f"{b['floor_s'] / o['median_s']:.2f}x" if ratio else "-",
                ]
            )
        cfg = c["config"]
        t = cfg["infinitevl"]
        parts.append(
            f"### {name}\n\n{t['num_hidden_layers']} layers ({_layers(t['layers'])}), hidden {t['hidden_size']}, MLP "
            f"{t['intermediate_size']}, attention {t['num_attention_heads']}/{t['num_key_value_heads']} heads of "
            f"{t['head_dim']}, window {t['sliding_window']}, GDN {t['num_linear_heads']} heads Dk {t['linear_head_dim']}, "
            f"vocab {t['vocab_size']}: InfiniteVL {cfg['infinitevl_decoder_params'] / 1e6:.1f} M decoder parameters, "
            f"baseline {cfg['baseline_params'] / 1e6:.1f} M. Baseline stopped: "
            f"**{c['baseline_stop'].replace('_', ' ')}**"
            + (
                f"; longest context measured: {fmt_tokens(c['baseline_longest_context'])}."
                if c.get("baseline_longest_context")
                else "."
            )
            + "\n\n"
            + _table(
                [
                    "context",
                    "InfiniteVL ms",
                    "floor ms (achieved/floor)",
                    "state",
                    "baseline ms",
                    "baseline floor ms (achieved/floor)",
                    "KV cache",
                    "baseline / InfiniteVL",
                    "baseline floor / InfiniteVL",
                ],
                rows,
            )
        )
    note = (
        "Floors: bytes read per token / measured bandwidth. *baseline floor / InfiniteVL* compares InfiniteVL with a "
        "perfect baseline that would run at its own floor (no cache copies, no overheads): the part of the margin "
        "that comes from the architecture alone."
    )
    return (
        "\n\n".join(parts) + f"\n\n{note}\n\n![decode latency](benchmarks/decode_latency.png)\n\n" + _method("decode")
    )


def prefill_md(record: dict) -> str:
    parts = []
    for name, c in record["result"]["configs"].items():
        ours = {p["length"]: p for p in c["infinitevl"]}
        base = {p["length"]: p for p in c["baseline"]}
        rows = []
        for n in sorted(set(ours) | set(base)):
            o, b = ours.get(n), base.get(n)
            sec = lambda p: (
                f"{p['median_s']:.3f}" if p and "median_s" in p else (p or {}).get("status", "-").replace("_", " ")
            )  # noqa: E731
            tps = lambda p: f"{p['tokens_per_s']:.0f}" if p and "tokens_per_s" in p else "-"  # noqa: E731
            mem = lambda p: fmt_bytes(p.get("peak_rss_increase_bytes")) if p else "-"  # noqa: E731
            ratio = b["median_s"] / o["median_s"] if o and b and "median_s" in o and "median_s" in b else None
            note = f" (predicted {b['predicted_s']:.0f} s)" if b and "predicted_s" in b else ""
            rows.append(
                [
                    fmt_tokens(n),
                    sec(o),
                    tps(o),
                    mem(o),
                    sec(b) + note,
                    tps(b),
                    mem(b),
                    f"{ratio:.2f}x" if ratio else "-",
                ]
            )
        parts.append(
            f"### {name}\n\nInfiniteVL in chunks of {c['chunk_size']} tokens; baseline stopped: "
            f"**{c['baseline_stop'].replace('_', ' ')}**.\n\n"
            + _table(
                [
                    "prompt",
                    "InfiniteVL s",
                    "tok/s",
                    "working memory",
                    "baseline s",
                    "tok/s",
                    "working memory",
                    "baseline / InfiniteVL",
                ],
                rows,
            )
        )
    return "\n\n".join(parts) + "\n\n![prefill](benchmarks/prefill.png)\n\n" + _method("prefill")


def memory_md(record: dict) -> str:
    parts = []
    for name, c in record["result"]["configs"].items():
        rows = []
        for who in ("infinitevl", "baseline"):
            for p in c["points"][who]:
                if p["status"] == "measured":
                    rows.append(
                        [
                            who,
                            fmt_tokens(p["context"]),
                            fmt_bytes(p["peak_rss_bytes"]),
                            fmt_bytes(p["peak_rss_bytes"] - p["rss_start_bytes"]),
                            fmt_bytes(p["rss_model_bytes"]),
                            fmt_bytes(p["weight_bytes"]),
                            fmt_bytes(p["state_bytes"]),
                        ]
                    )
                else:
                    need = (
                        f" (needs {fmt_bytes(p['needed_bytes'])}, usable {fmt_bytes(p['usable_bytes'])})"
                        if "needed_bytes" in p
                        else ""
                    )
                    rows.append([who, fmt_tokens(p["context"]), p["status"].replace("_", " ") + need] + ["-"] * 4)
        parts.append(
            f"### {name}\n\n"
            + _table(
                [
                    "model",
                    "context",
                    "peak RSS",
                    "peak - RSS after imports",
                    "RSS after build",
                    "weights",
                    "state / KV cache",
                ],
                rows,
            )
        )
    return "\n\n".join(parts) + "\n\n![memory](benchmarks/memory.png)\n\n" + _method("memory")


def controlled_change(controlled: dict | None) -> str:
    """The controlled check's verdict in words: the decoder's time per frame, late history against window full."""
    if not controlled:
        return ""
    a, b = controlled["points"]
    change = b["median_s"] / a["median_s"] - 1
    return (
        f"controlled, interleaved: decoder per frame {a['median_s'] * 1e3:.0f} ms after {fmt_tokens(a['context'])} "
        f"tokens, {b['median_s'] * 1e3:.0f} ms after {fmt_tokens(b['context'])} ({change:+.1%})"
    )


def controlled_md(controlled: dict | None) -> str:
    if not controlled:
        return ""
    rows = [
        [fmt_tokens(p["context"]), f"{p['median_s'] * 1e3:.1f}", f"{1 / p['median_s']:.2f}", len(p["times_s"])]
        for p in controlled["points"]
    ]
    return (
        f"\n\nControlled check (InfiniteVL decoder, {controlled['tokens_per_frame']} tokens per frame, states filled "
        "to each history, timed in turn):\n\n"
        + _table(["history (tokens)", "median ms per frame", "decoder FPS", "repeats"], rows)
    )


def streaming_md(record: dict) -> str:
    r = record["result"]
    rows = []
    for who in ("infinitevl", "baseline"):
        for wname, wnd in r[who]["windows"].items():
            rows.append(
                [
                    who,
                    wname,
                    f"{wnd['frames'][0]}-{wnd['frames'][1] - 1}",
                    wnd["tokens"],
                    f"{wnd['fps_end_to_end']:.2f} ({wnd.get('fps_end_to_end_mean', 0):.2f})",
                    f"{wnd['fps_decoder']:.2f} ({wnd.get('fps_decoder_mean', 0):.2f})",
                ]
            )
    breakdown = []
    for who in ("infinitevl", "baseline"):
        f = r[who]["frames"]
        n = len(f["total_s"])
        mean = lambda k, f=f, n=n: sum(f[k][1:]) / max(1, n - 1) * 1e3  # noqa: E731
        breakdown.append(
            [
                who,
                n,
                r[who]["stop"].replace("_", " "),
                f"{mean('decode_s'):.1f}",
                f"{mean('preprocess_s'):.1f}",
                f"{mean('vision_s'):.1f}",
                f"{mean('decoder_s'):.1f}",
                fmt_bytes(max(f["rss_bytes"])),
                fmt_bytes(f["state_bytes"][-1]),
            ]
        )
    cfg = r["config"]
    v = cfg["vision"]
    return (
        f"`{cfg['name']}` decoder with a vision tower of depth {v['depth']}, width {v['hidden_size']} "
        f"(the real tower is depth 32, width 1280); {r['frame_size'][0]}x{r['frame_size'][1]} frames sampled at "
        f"{r['sample_fps']:g}/s from `{Path(r['video']).name}`, looped. FPS windows of {r['fps_window']} frames.\n\n"
        + _table(
            [
                "model",
                "window",
                "frames",
                "tokens at end",
                "FPS end to end: 1/median (frames/total time)",
                "FPS decoder only: 1/median (frames/total time)",
            ],
            rows,
        )
        + "\n\nMean per frame (ms, frame 0 excluded):\n\n"
        + _table(
            [
                "model",
                "frames",
                "stopped",
                "video decode",
                "preprocess",
                "vision",
                "decoder",
                "peak RSS",
                "state / KV at end",
            ],
            breakdown,
        )
        + controlled_md(r.get("controlled"))
        + "\n\n![streaming](benchmarks/streaming_fps.png)\n\n"
        + _method("streaming")
    )


def ops_md(record: dict) -> str:
    rows = []
    for r in record["result"]["results"]:
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        check = "; ".join(f"{k} max abs diff {v['max_abs_diff']:.1e}" for k, v in r["check"].items())
        rows.append(
            [
                r["op"],
                shape,
                f"{r['ours']['median_s'] * 1e3:.3f}",
                r["reference"],
                f"{r['theirs']['median_s'] * 1e3:.3f}",
                f"{r['speedup']:.2f}x",
                r["ours"]["repeats"],
                check,
            ]
        )
    return (
        _table(["op", "shape", "ours ms", "reference", "reference ms", "speedup", "repeats", "agreement"], rows)
        + "\n\n![ops](benchmarks/ops.png)\n\n"
        + _method("ops")
    )


def _real_rows(record: dict, row) -> list[list]:
    rows = []
    for name, c in record["result"]["configs"].items():
        for who in ("infinitevl", "baseline"):
            r = c.get(who)
            if r is None:
                continue
            if r.get("status") != "measured":
                rows.append([name, who, fmt_tokens(r["context"]), r["status"].replace("_", " ")])
            else:
                rows.append([name, who, fmt_tokens(r["context"])] + row(name, who, r))
    return rows


def real_decode_md(record: dict) -> str:
    """The decode section's check of its filled contexts against a real one (the `real` section)."""
    rows = _real_rows(
        record,
        lambda name, who, r: [
            f"{r['prefill_s']:.1f} ({r['context'] / r['prefill_s']:.0f} tok/s)",
            f"{r['real']['median_s'] * 1e3:.2f}",
            f"{r['filled']['median_s'] * 1e3:.2f}",
            f"{r['real_over_filled']:.2f}x",
            fmt_bytes(r["real_state_bytes"]),
            fmt_bytes(r["filled_state_bytes"]),
        ],
    )
    header = ["config", "model", "context", "real prefill s", "decode ms, real", "decode ms, filled", "real / filled"]
    return (
        "### Real tokens against filled contexts\n\n"
        "The contexts above are filled with random values, not processed (see below). Here one long context per "
        "model was built by a real prefill of random token ids and decode steps on it were timed in turn with steps "
        f"on a filled context of the same length: {_provenance(record)}\n\n"
        + _table(header + ["state / KV, real", "state / KV, filled"], rows)
    )


def real_memory_md(record: dict, memory: dict | None) -> str:
    """The memory section's check: a process holding a real context against the filled worker of this section."""
    filled = {}
    for name, c in ((memory or {}).get("result", {}).get("configs", {})).items():
        for who, points in c["points"].items():
            for p in points:
                if p.get("status") == "measured":
                    filled[name, who, p["context"]] = p
    rows = _real_rows(
        record,
        lambda name, who, r: [
            fmt_bytes(r["rss_real_bytes"]),
            fmt_bytes(r["peak_rss_real_bytes"]),
            fmt_bytes(filled.get((name, who, r["context"]), {}).get("rss_filled_bytes")),
            fmt_bytes(filled.get((name, who, r["context"]), {}).get("peak_rss_bytes")),
            fmt_bytes(r["real_state_bytes"]),
        ],
    )
    header = ["config", "model", "context", "RSS holding the real context", "peak RSS (the prefill included)"]
    return (
        "### Real tokens against filled contexts\n\n"
        "The same real contexts as in the decode section, in their own processes: the resident memory once the "
        "prefill is done, and the peak, which includes the prefill's working memory, beside this section's filled "
        f"worker at the same length (`-`: not measured at that length). {_provenance(record)}\n\n"
        + _table(header + ["RSS after filling", "peak RSS, filled", "state / KV bytes"], rows)
    )


def _overhead_split(m: dict) -> tuple[float, float]:
    """(step, its matmuls alone) in seconds: the pair timed alternately, or (older records) the decode point."""
    step = (m.get("overhead_step") or m["decode"][0])["median_s"]
    return step, m["matmuls"]["median_s"]


def precision_md(record: dict) -> str:
    r = record["result"]
    fp32 = _measured(record, "fp32")
    rows = []
    for mode, m in r["modes"].items():
        if m.get("status") != "measured":
            rows.append([mode, m.get("error", "failed")] + ["-"] * 10)
            continue
        cells = []
        for p in m["decode"]:
            cells.append(f"{p['median_s'] * 1e3:.1f} ({p['floor_s'] * 1e3:.1f}, {p['achieved_over_floor']:.2f}x)")
        step, mm = _overhead_split(m)
        speed = lambda key, mode_m=m: (  # noqa: E731
            f" ({key(fp32) / key(mode_m):.2f}x)" if fp32 is not None else ""
        )
        rows.append(
            [
                mode,
                f"{m['load_s']:.0f}",
                fmt_bytes(m["weight_bytes"]),
                fmt_bytes(m["peak_bytes"]),
                *cells,
                f"{fp32['decode'][0]['median_s'] / m['decode'][0]['median_s']:.2f}x" if fp32 else "-",
                f"{mm * 1e3:.1f}",
                f"{(step - mm) * 1e3:.1f} ({(step - mm) / step:.0%})"
                + (f"; plain ops {m['plain_step']['median_s'] * 1e3:.1f}" if m.get("plain_step") else ""),
                f"{m['prefill']['tokens_per_s']:.1f}" + speed(lambda x: x["prefill"]["median_s"])
                if "prefill" in m
                else "-",
                f"{m['vision']['median_s']:.2f}" + speed(lambda x: x["vision"]["median_s"]) if "vision" in m else "-",
            ]
        )
    contexts = [fmt_tokens(p["context"]) for p in next(iter(r["modes"].values())).get("decode", [])]
    first = next((m for m in r["modes"].values() if m.get("status") == "measured" and "prefill" in m), None)
    header = ["mode", "load s", "weights", "peak RSS"]
    header += [f"decode ms at {c} (floor ms, x floor)" for c in contexts]
    side = first["vision"]["frame"] if first else "?"
    header += ["decode vs fp32", "matmuls ms", f"rest of the step ms (at {contexts[0] if contexts else '-'})"]
    header += ["prefill tok/s", f"vision s, {side}x{side}"]
    kernels = "\n".join(
        f"- {mode}: {k}; between the matmuls of a decode step: {r['modes'].get(mode, {}).get('decode_kernels', '-')}"
        for mode, k in r["kernels"].items()
    )
    text = (
        f"Config `{r['config']['name']}` (random weights) loaded from a bf16 checkpoint of "
        f"{fmt_bytes(r['checkpoint_bytes'])}; decode floors at {r['bandwidth'] / 1e9:.1f} GB/s; prefill of "
        f"{fmt_tokens(first['prefill']['tokens']) if first else '-'} tokens in chunks of "
        f"{first['prefill']['chunk'] if first else '-'}.\n\n"
        + _table(header, rows)
        + f"\n\nKernels (CPU: {record['machine']['cpu']}, flags {' '.join(record['machine']['cpu_flags'])}):\n\n"
        + kernels
    )
    lcpp = r.get("llamacpp")
    if lcpp:
        text += "\n\n" + llamacpp_md(lcpp, r)
    return text + "\n\n" + _method("precision")


def quality_md(record: dict) -> str:
    r = record["result"]
    rows = []
    for mode, m in r["modes"].items():
        a, d = m["agreement"], m["demo"]
        rows.append(
            [
                mode,
                f"{d['correct']}/{d['questions']} ({d['accuracy']:.2f})",
                f"{a['kl_mean']:.2e}",
                f"{a['kl_p99']:.2e}",
                f"{a['top1_agreement']:.3f}",
                f"{a['top1_text_next']:.3f} ({a['text_next_tokens']})" if "top1_text_next" in a else "-",
                a["tokens"],
            ]
        )
    head = ["mode", "demo questions right", "KL mean", "KL p99", "top-1 agreement", "top-1 where text follows"]
    text = f"Model: `{r['model']}`.\n\n" + _table(head + ["tokens"], rows)
    if r.get("fixture"):
        cases = [row["case"] for row in next(iter(r["fixture"].values()))]
        frows = [
            [mode] + [f"{x['relative_error']:.3f} / {x['max_abs_error']:.2f} / {x['top1_agreement']:.2f}" for x in errs]
            for mode, errs in r["fixture"].items()
        ]
        text += (
            "\n\nThe official-tiny fixture, logits against the recorded official fp32 logits "
            "(relative error / max |error| / greedy agreement; random weights, see below):\n\n"
            + _table(["mode", *cases], frows)
        )
    return text + "\n\n" + _method("quality")


def ray_md(record: dict) -> str:
    r = record["result"]
    rows = []
    for replicas, t in sorted(r["throughput"].items()):
        rows.append([replicas, f"{t['sessions']} x {t['frames_per_session']} ({t['frame_size']}px)",
                     f"{t['frames_per_s']:.2f}", f"{t['tokens_per_s']:.0f}", f"{t['wall_s']:.1f}",
                     t["replicas_used"]])  # fmt: skip
    text = (
        "Ray's replicas, proxy and controller are processes of their own: the load of other processes above "
        "includes them.\n\nSessions appending frames at once (one frame per request), one CPU and one torch "
        "thread per replica:\n\n"
    )
    text += _table(["replicas", "sessions x frames", "frames/s", "tokens/s", "wall s", "replicas used"], rows)
    m = r.get("move")
    if m:
        tries = f"{m['attempts']} {'try' if m['attempts'] == 1 else 'tries'}"
        text += (
            f"\n\nA session moves after `kill -9` of its replica in **{m['seconds']:.2f} s** (until an append to it "
            f"is acknowledged again through the same URL, {tries}): its state is "
            f"{fmt_bytes(m['state_bytes'])} in memory, read back from a {fmt_bytes(m['state_file_bytes'])} state file "
            f"and a {fmt_bytes(m['journal_bytes'])} journal; it had {m['tokens_before']} tokens and "
            f"{m['frames_before']} frames before the kill and all of them after it (then {m['tokens_after']} with the "
            "new append)."
        )
    proxy = r["proxy"]
    rows = [
        [
            name,
            f"{proxy['plain'][name]['median_s'] * 1e3:.2f} ms",
            f"{proxy['ray'][name]['median_s'] * 1e3:.2f} ms",
            f"{proxy['added_s'][name] * 1e3:+.2f} ms",
        ]
        for name in proxy["plain"]
    ]
    text += "\n\nWhat Ray's proxy adds per request (medians of requests sent one at a time):\n\n"
    text += _table(["request", "plain `infinitevl serve`", "through Ray's proxy", "added"], rows)
    return text + "\n\n" + _method("ray")


def variants_md(record: dict) -> str:
    """Offline's prefill against dense attention on the same layer; Online's decode against context."""
    r = record["result"]
    rows = []
    for p in r["offline_prefill"]:
        if p["status"] != "measured":
            rows.append([fmt_tokens(p["tokens"]), p["status"].replace("_", " "), "-", "-", "-", "-", "-"])
            continue
        timed = "base_s" in p
        rows.append(
            [
                fmt_tokens(p["tokens"]),
                f"{p['offline_s']:.2f}",
                f"{p['base_s']:.2f}" if timed else "not timed",
                f"{p['sdpa_s']:.2f}",
                (f"{p['base_s'] / p['offline_s']:.2f}x" if timed else "-") + f" / {p['sdpa_s'] / p['offline_s']:.2f}x",
                fmt_bytes(p["offline_cache_bytes"]),
                p.get("measured_at", "this run"),
            ]
        )
    header = [
        "tokens",
        "Offline s",
        "Base s",
        "causal SDPA s",
        "Base / Offline, SDPA / Offline",
        "Offline cache",
        "measured",
    ]
    w = record["settings"]["offline"]["widths"]
    text = (
        f"Offline (block-sparse) against dense full attention, one softmax layer (hidden {w['hidden']}, "
        f"{w['heads']} heads, {w['kv_heads']} key/value heads, head dim {w['head_dim']}):\n\n"
    )
    text += _table(header, rows)
    rows = [
        [fmt_tokens(p["context"]), f"{p['median_s'] * 1e3:.2f}", fmt_bytes(p["state_bytes"])]
        for p in r["online_decode"]
    ]
    text += "\n\nOnline (sinks + window), one decode step after a context (tiny model):\n\n"
    text += _table(["context", "decode ms (median)", "state"], rows)
    return text + "\n\n" + _method("variants")


def _per_step(run: dict) -> int:
    """The frames of one prefill step of a stream4b run (runs before frames_per_step: one temporal step's)."""
    return run.get("frames_per_step") or (2 if run["paired"] else 1)


def _floor_ratio(run: dict, part: str) -> tuple[float, float]:
    """(seconds per frame, the floor per frame) of a part of a stream4b run (a step's floor over its frames)."""
    floor = run["floors"][part]["median_s"] / _per_step(run)
    return run["per_frame_s"][part + "_s"], floor


def _path(run: dict) -> str:
    per_step = _per_step(run)
    steps = f", {per_step} frames per prefill" if per_step > (2 if run["paired"] else 1) else ""
    return f"{run['mode']}, {'pairs' if run['paired'] else 'single frames'}{steps}"


def stream4b_targets(record: dict) -> list[dict]:
    """The real-size streaming targets, judged within the run: for each frame size the best path's end-to-end
    frames/s against today's path (the first mode's single frames: bf16, or fp32 on a CPU without bf16 instructions),
    the best path's tower and prefill against their
    floors, its prefill's overhead; the long stream's state and pace; the decode steps' overhead."""
    r, out = record["result"], []
    for size in sorted({run["size"] for run in r["runs"]}, reverse=True):
        runs = [run for run in r["runs"] if run["size"] == size and run["fps"]]
        mode = r.get("today", "bf16")
        today = next((run for run in runs if run["mode"] == mode and _per_step(run) == 1), None)
        best = max(runs, key=lambda run: run["fps"])
        name = f"real-size streaming: {size}px end-to-end frames/s >= 3x today's path ({mode}, single frames)"
        if today is None:
            out.append(_target(name, None, f"not measured (no {mode} single-frame stream in this run)"))
        else:
            gain = best["fps"] / today["fps"]
            measured = f"{gain:.2f}x ({best['fps']:.3g} vs {today['fps']:.3g} frames/s)"
            out.append(_target(name, gain >= 3, measured, f"best path: {_path(best)}"))
        for part, goal in (("tower", 1.5), ("prefill", 1.5)):
            seconds, floor = _floor_ratio(best, part)
            out.append(
                _target(
                    f"real-size streaming: {size}px {part} within {goal}x of its matrix products ({_path(best)})",
                    seconds / floor <= goal,
                    f"{seconds / floor:.2f}x",
                    f"{seconds * 1e3:.1f} vs {floor * 1e3:.1f} ms per frame",
                )
            )
        seconds, floor = _floor_ratio(best, "prefill")
        out.append(
            _target(
                f"real-size streaming: {size}px prefill overhead: prefill / its products' floor <= 1.3x",
                seconds / floor <= 1.3,
                f"{seconds / floor:.2f}x",
                f"{best['tokens_per_frame'] * _per_step(best):g} tokens per step; {_path(best)}",
            )
        )
    long = r.get("long")
    if long:
        what = f"{long['frames']} frames of {long['size']}px, {_path(long)}"
        out.append(
            _target(
                "real-size streaming: the long stream's state bytes constant",
                len(long["state_bytes"]) == 1,
                f"{fmt_bytes(long['state_bytes'][0])}" if len(long["state_bytes"]) == 1 else "sizes changed",
                what,
            )
        )
        out.append(
            _target(
                "real-size streaming: the long stream's time per frame, last quarter within 10% of the first",
                abs(long["change"]) <= 0.10,
                f"{long['change']:+.1%}",
                f"{long['first_quarter_s'] * 1e3:.1f} -> {long['last_quarter_s'] * 1e3:.1f} ms; {what}",
            )
        )
    for mode, d in r.get("decode", {}).items():
        step, mm = d["step"]["median_s"], d["products"]["median_s"]
        out.append(
            _target(
                f"real-size streaming: {mode} decode step overhead outside the matrix products <= 10%",
                d["overhead"] <= 0.10,
                f"{d['overhead']:.0%} ({(step - mm) * 1e3:.1f} of {step * 1e3:.1f} ms)",
                f"at {fmt_tokens(d['context'])}; {d['decode_kernels']}",
            )
        )
    return out


def _probe_md(r: dict) -> str:
    probe, agree = r.get("probe"), r.get("tower_agreement")
    text = ""
    if probe:
        kinds = [k for k in ("fp32", "bf16", "int8") if k in probe["tower"]]
        best_float = "bf16" if "bf16" in kinds else "fp32"
        rows, wins = [], []
        for part in ("tower", "prefill"):
            t = {k: probe[part][k]["median_s"] for k in kinds}
            winner = min(t, key=t.get)
            wins.append(f"{part}: {winner}")
            ratios = [f"{t['fp32'] / t['bf16']:.2f}x"] if "bf16" in t else []
            rows.append(
                [part, str(probe[part]["fp32"]["calls"]), *(f"{t[k] * 1e3:.1f}" for k in kinds), *ratios]
                + [f"{t[best_float] / t['int8']:.2f}x", winner]
            )
        names = {"fp32": "fp32 ms", "bf16": "bf16 ms", "int8": "int8 x int8 ms"}
        header = ["one step's products", "calls", *(names[k] for k in kinds)]
        header += (["bf16 over fp32"] if "bf16" in kinds else []) + [f"int8 over {best_float}", "fastest"]
        # runs before the int8 products existed timed torch._int_mm
        kernel = probe.get("int8_kernel", "`torch._int_mm`")
        absent = "" if "bf16" in kinds else " (bf16 not timed: this CPU has no bf16 instructions)"
        text += (
            f"\n\nThe matrix products of one {probe['size']}px single-frame step ({probe['mode']} run), each timed alone "
            f"as fp32, bf16 and int8 x int8{absent}; int8 x int8: {kernel}, activations quantized per row at run "
            "time, weights per channel, quantize and dequantize included; summed per step:\n\n" + _table(header, rows)
        )
        gains = [
            f"{part} ({probe[part][best_float]['median_s'] / probe[part]['int8']['median_s']:.2f}x)"
            for part in ("tower", "prefill")
            if probe[part][best_float]["median_s"] > 1.2 * probe[part]["int8"]["median_s"]
        ]
        text += "\n\nFastest on this CPU: " + "; ".join(wins) + ". "
        text += (
            f"int8 x int8 products beat {best_float} by more than 1.2x on " + ", ".join(gains) + "."
            if gains
            else f"int8 x int8 does not beat {best_float} by more than 1.2x on either part's products here."
        )
    if agree:
        own = agree.get("own") or agree["bf16"]
        dtype = agree.get("dtype", "bf16")
        b = agree["int8"]
        text += (
            f"\n\nThe tower's features on one real {agree['size']}px frame, cosine similarity per token against "
            f"fp32 ({own['tokens']} tokens): {dtype} min {own['min']:.5f}, mean {own['mean']:.5f}; int8 x int8 "
            f"linear layers ({b['linears']}, the patch embedding in {dtype}) min {b['min']:.5f}, mean {b['mean']:.5f}."
        )
    return text


def stream4b_md(record: dict) -> str:
    """Live frames at real size: frames/s and each part per frame, the tower and the prefill beside their floors;
    the long stream, the product probe, the tower's agreement across precisions and the decode overhead."""
    r = record["result"]
    c = r["cpu"]
    rows = []
    for run in r["runs"]:
        per = run["per_frame_s"]
        cells = []
        for part in ("tower", "prefill"):
            seconds, floor = _floor_ratio(run, part)
            ratio = f"{seconds / floor:.2f}x" if floor > 0 else "-"
            cells.append(f"{seconds * 1e3:.1f} ({floor * 1e3:.1f}, {ratio})")
        constant = "constant" if len(run["state_bytes"]) == 1 else "CHANGED"
        rows.append(
            [
                run["mode"],
                f"{run['size']}",
                "pairs" if run["paired"] else "single",
                f"{_per_step(run)}",
                f"{run['frames']}",
                f"{run['tokens_per_frame']:g}",
                f"{run['fps']:.3g}" if run["fps"] else "-",
                f"{per['decode_s'] * 1e3:.1f}",
                f"{per['preprocess_s'] * 1e3:.1f}",
                *cells,
                f"{fmt_bytes(run['state_bytes'][-1])}, {constant}" if run["state_bytes"] else "-",
            ]
        )
    header = [
        "decoder",
        "frame px",
        "pairing",
        "frames per prefill",
        "frames timed",
        "tokens / frame",
        "frames/s end to end",
        "decode ms",
        "preprocess ms",
        "tower ms (floor ms, ratio)",
        "prefill ms (floor ms, ratio)",
        "state",
    ]
    loads = ", ".join(f"{m} {s:.1f} s" for m, s in r.get("load_s", {}).items())
    text = (
        f"{r['config'].get('name', '')} configuration, full vision tower, frames from {Path(r['video']).name}; "
        f"CPU {c['cpu']} ({', '.join(c['flags']) or 'no AVX-512 / AMX flags'}; torch CPU capability "
        f"{c['torch_cpu_capability']}, oneDNN bf16 {'native' if c['mkldnn_bf16_native'] else 'emulated'}, "
        f"{c['threads']} threads). Kernels: "
        + "; ".join(f"{m}: {k}" for m, k in r["kernels"].items())
        + (f". Checkpoint load: {loads}" if loads else "")
        + ". Per frame (a step's time over its frames); the floor is the step's matrix products alone, in the same "
        f"run; the targets (judged in the table at the top) compare the best path at each size with today's path "
        f"({r.get('today', 'bf16')}, single frames) and with its floors.\n\n"
    )
    text += _table(header, rows)
    long = r.get("long")
    if long:
        text += (
            f"\n\nThe long stream ({long['mode']}, {long['size']}px, {'pairs' if long['paired'] else 'single'}): "
            f"{long['frames']} frames at {long['fps']:.3g} frames/s end to end; {long['first_quarter_s'] * 1e3:.1f} ms "
            f"per frame over its first quarter, {long['last_quarter_s'] * 1e3:.1f} ms over its last "
            f"({long['change']:+.1%}); state "
            + (
                f"{fmt_bytes(long['state_bytes'][0])} after every step"
                if len(long["state_bytes"]) == 1
                else "sizes " + ", ".join(fmt_bytes(b) for b in long["state_bytes"])
            )
            + "."
        )
    text += _probe_md(r)
    rows = [
        [
            mode,
            fmt_tokens(d["context"]),
            f"{d['step']['median_s'] * 1e3:.2f}",
            f"{d['products']['median_s'] * 1e3:.2f}",
            f"{d['calls']} + {d['inside_kernels']}",
            f"{d['overhead']:.0%}",
        ]
        for mode, d in r.get("decode", {}).items()
    ]
    if rows:
        header = ["decoder", "context", "step ms", "products alone ms", "calls (+ inside fused kernels)", "overhead"]
        text += "\n\nDecode: one step against its matrix products alone (target: overhead <= 10%):\n\n"
        text += _table(header, rows)
    return text + "\n\n" + _method("stream4b")


SECTION_MD = {
    "machine": ("The limit: this machine", machine_md),
    "decode": ("Decode latency against context", decode_md),
    "prefill": ("Prefill", prefill_md),
    "memory": ("Memory against context", memory_md),
    "streaming": ("Streaming", streaming_md),
    "ops": ("Ops", ops_md),
    "precision": ("Precision: fp32, bf16, int8, int4 at real size", precision_md),
    "quality": ("Precision: quality against fp32", quality_md),
    "ray": ("Ray Serve", ray_md),
    "variants": ("Variants: Online and Offline", variants_md),
    "stream4b": ("Streaming at real size", stream4b_md),
}


GPU_JSON = "gpu.json"  # written by `python -m infinitevl.bench.gpu` (docs/gpu.md), not by a section of the run


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def gpu_md(record: dict | None) -> str:
    """The GPU section, from `gpu.json`; without one (or with a CPU run's) it says that no GPU figures exist."""
    command = "`python -m infinitevl.bench.gpu --json docs/benchmarks/gpu.json` ([docs/gpu.md](gpu.md))"
    if record is None or record["machine"]["device"] != "cuda":
        what = "No GPU run is recorded yet" if record is None else "The recorded run is the CPU form (`--quick`)"
        return f"{what}: there are no GPU figures. {command} checks and measures the CUDA path on one GPU."
    m, f = record["machine"], record["figures"]
    lines = [
        f"`{record['command']}` ({record['plan']} plan), {m['date']}, {record['elapsed_s']:.0f} s; "
        f"**{m['card']}** ({_gib(m['memory_bytes'])}), driver {m['driver']}, CUDA {m['cuda']}, torch {m['torch']}, "
        f"Triton {m['triton']}, flash-linear-attention {m['flash_linear_attention']}, transformers "
        f"{m['transformers']}; {f['config']} widths, {f['dtype']}, random weights, gated delta rule on "
        f"{f.get('gdn_backend', 'fla')}.",
        "",
    ]
    groups: dict[str, list[dict]] = {}
    for c in record["checks"]:
        groups.setdefault(c["check"].split("/")[0], []).append(c)
    rows = []
    for name, checks in groups.items():
        counts = {s: sum(c["status"] == s for c in checks) for s in ("passed", "failed", "error", "skipped")}
        errs = [c["rel_err"] for c in checks if c.get("rel_err") is not None]
        worst = f"{max(errs):.1e}" if errs else "-"
        reasons = sorted({c["reason"] for c in checks if c["status"] == "skipped"})
        rows.append([name, *counts.values(), worst, "; ".join(reasons)])
    lines += [
        "Correctness:",
        "",
        _table(["check", "passed", "failed", "error", "skipped", "worst rel. error", "why skipped"], rows),
    ]
    bad = [c for c in record["checks"] if c["status"] in ("failed", "error")]
    if bad:
        lines += ["", "**Failed:** " + "; ".join(f"`{c['check']}` ({c.get('rel_err', c.get('error'))})" for c in bad)]
    for name, text in record.get("errors", {}).items():
        lines += ["", f"**{name} did not complete:** `{text.splitlines()[0]}`"]
    base = {b["context"]: b for b in f.get("baseline", {}).get("decode", [])}
    rows = []
    for r in f.get("decode", []):
        b = base.get(r["context"], {})
        measured = r["status"] == "measured"
        graph = r.get("graph_s")
        rows.append(
            [
                fmt_tokens(r["context"]),
                f"{r['eager_s'] * 1e3:.2f}" if measured else r["status"],
                f"{graph * 1e3:.2f} ({r['eager_s'] / graph:.1f}x)" if graph else "-",
                f"{b['eager_s'] * 1e3:.2f}"
                if b.get("status") == "measured"
                else b.get("status", "-").replace("_", " "),
                f"{b['eager_s'] / r['eager_s']:.1f}x" if measured and b.get("status") == "measured" else "-",
                _gib(r["peak_bytes"]) if measured else "-",
            ]
        )
    header = ["context", "InfiniteVL eager ms", "CUDA graph ms (speedup)", "Qwen2.5-VL ms", "ratio", "peak memory"]
    lines += ["", "Decode, one token:", "", _table(header, rows)]
    graph_errors = sorted({r["graph_error"] for r in f.get("decode", []) if r.get("graph_error")})
    if graph_errors:
        lines += ["", "**CUDA graph failed:** " + "; ".join(f"`{e}`" for e in graph_errors)]
    rows = [
        [
            who,
            fmt_tokens(r["tokens"]),
            f"{r['tokens_per_s']:,.0f}" if r["status"] == "measured" else r["status"],
            _gib(r["peak_bytes"]) if r["status"] == "measured" else "-",
        ]
        for who, pts in (("InfiniteVL", f.get("prefill", [])), ("Qwen2.5-VL", f.get("baseline", {}).get("prefill", [])))
        for r in pts
    ]
    lines += ["", "Prefill:", "", _table(["model", "tokens", "tokens/s", "peak memory"], rows)]
    st = f.get("streaming")
    if st:
        lines += [
            "",
            f"Live streaming, {st['frame_size'][0]}x{st['frame_size'][1]} frames ({st['tokens_per_frame']} tokens "
            f"each) with the full vision tower, {st['frames']} frames: **{st['fps_end_to_end']:.1f} frames/s** end to "
            f"end ({st['fps_device']:.1f} without the CPU resize and patchify); peak memory {_gib(st['peak_bytes'])}.",
        ]
    rows = [[r["figure"], r["paper"], r["this_run"]] for r in record["paper"]]
    lines += ["", f"Against the paper ({record['paper'][0]['paper_card'] if record['paper'] else 'RTX 4090'}):", ""]
    lines += [_table(["figure", "paper", f"this run ({m['card']})"], rows)] if rows else ["No figures to compare."]
    return "\n".join(lines)


def render(data: dict[str, dict], gpu: dict | None = None) -> str:
    """The markdown; images are linked as `benchmarks/<name>.png` (rewritten by `write` to the real folder)."""
    lines = [
        "# Benchmarks",
        "",
        "<!-- generated by `infinitevl bench` (infinitevl/bench/report.py): edit the code, not this file -->",
        "",
        "InfiniteVL against the Transformer it replaces (transformers' Qwen2.5-VL text model of the same widths, "
        "depth, heads and vocabulary, SDPA attention, its own `DynamicCache`) and against this machine's limits, "
        "on CPU in fp32 with random weights. Regenerate with `make bench` (the whole run) or "
        "`infinitevl bench --only SECTIONS` (the report is rebuilt from every section's JSON in "
        "`docs/benchmarks/`).",
        "",
    ]
    if any(r["plan"] == "quick" for r in data.values()):
        lines += [
            "> **Quick run**: tiny sizes that only check that the benchmark code works; the numbers mean nothing.",
            "",
        ]
    rows = []
    for t in targets(data):
        verdict = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        if t["met"] is not None and data.get(t["section"], {}).get("plan") == "quick":
            verdict = "not judged (quick run)"  # tiny sizes: a verdict would claim something the numbers cannot show
        others = data.get(t["section"], {}).get("other_load", {}).get("mean_cores", 0.0)
        detail = t["detail"]
        if others >= BUSY_CORES and t["met"] is not None:
            detail = (detail + "; " if detail else "") + f"measured on a busy machine ({others:.2f} cores taken)"
        rows.append([t["target"], t["measured"], verdict, detail])
    lines += [
        "## Targets",
        "",
        _table(["target", "measured", "verdict", "detail"], rows) if rows else "No sections yet.",
        "",
    ]
    for section, (title, fn) in SECTION_MD.items():
        if section not in data:
            continue
        record = data[section]
        body = fn(record)
        if "real" in data and section in ("decode", "memory"):
            real = real_decode_md(data["real"]) if section == "decode" else real_memory_md(data["real"], record)
            body = body.replace("<details>", real + "\n\n<details>", 1) if "<details>" in body else body + real
        lines += [f"## {title}", "", _provenance(record), "", body, ""]
    if "real" in data and "decode" not in data and "memory" not in data:
        lines += ["## Real tokens against filled contexts", "", real_decode_md(data["real"]), ""]
    lines += ["## On a GPU", "", gpu_md(gpu), ""]
    return "\n".join(lines)


def write(out: Path, markdown: Path) -> Path:
    out = Path(out)
    data = load(out)
    gpu = json.loads((out / GPU_JSON).read_text()) if (out / GPU_JSON).exists() else None
    text = render(data, gpu)
    for section, (filename, draw) in plots.PLOTS.items():
        drawn = section in data and draw(data[section]["result"], out / filename) is not None
        if not drawn:  # nothing measured to draw: no image link (and no stale image)
            text = re.sub(rf"!\[[^\]]*\]\(benchmarks/{re.escape(filename)}\)\n*", "", text)
            (out / filename).unlink(missing_ok=True)
    markdown = Path(markdown)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    image_dir = Path(os.path.relpath(out.resolve(), markdown.parent.resolve())).as_posix()
    markdown.write_text(text.replace("](benchmarks/", f"]({image_dir}/") + "\n")
    return markdown
