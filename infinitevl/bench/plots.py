"""PNG plots of the benchmark JSON (matplotlib, no display needed). Each function takes a section's `result` and a
path, draws one figure and returns the path, or None when there is nothing to draw."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OURS, BASE, FLOOR = "#1f77b4", "#d62728", "#7f7f7f"


def _measured(points: list[dict], x: str) -> tuple[list, list]:
    good = [p for p in points if p.get("status") == "measured"]
    return [p[x] for p in good], good


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _stops(ax, points: list[dict], x: str, label: str) -> None:
    for p in points:
        if p.get("status") not in ("measured", None):
            ax.axvline(p[x], color=BASE, ls=":", lw=1)
            ax.annotate(
                f"{label}: {p['status'].replace('_', ' ')}",
                (p[x], 0.5),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize=7,
                color=BASE,
                ha="right",
            )


def decode_latency(result: dict, path: Path) -> Path | None:
    configs = result.get("configs", {})
    if not configs:
        return None
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, (name, c) in zip(axes[0], configs.items()):
        xs, ours = _measured(c["infinitevl"], "context")
        ax.plot(xs, [p["median_s"] * 1e3 for p in ours], "o-", color=OURS, label="InfiniteVL")
        ax.plot(xs, [p["floor_s"] * 1e3 for p in ours], "--", color=OURS, alpha=0.5, label="InfiniteVL floor")
        xs, base = _measured(c["baseline"], "context")
        ax.plot(xs, [p["median_s"] * 1e3 for p in base], "s-", color=BASE, label="Transformer baseline")
        ax.plot(xs, [p["floor_s"] * 1e3 for p in base], "--", color=BASE, alpha=0.5, label="baseline floor")
        _stops(ax, c["baseline"], "context", "baseline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode latency per token (ms)")
        ax.set_title(f"{name}: decode, fp32")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def prefill(result: dict, path: Path) -> Path | None:
    configs = result.get("configs", {})
    if not configs:
        return None
    fig, axes = plt.subplots(2, len(configs), figsize=(5 * len(configs), 7), squeeze=False)
    for col, (name, c) in enumerate(configs.items()):
        for who, color, marker, label in (
            ("infinitevl", OURS, "o-", "InfiniteVL"),
            ("baseline", BASE, "s-", "baseline"),
        ):
            xs, pts = _measured(c[who], "length")
            axes[0][col].plot(xs, [p["median_s"] for p in pts], marker, color=color, label=label)
            axes[1][col].plot(xs, [p["tokens_per_s"] for p in pts], marker, color=color, label=label)
        _stops(axes[0][col], c["baseline"], "length", "baseline")
        for ax, ylabel, log in ((axes[0][col], "prefill time (s)", True), (axes[1][col], "tokens / s", False)):
            ax.set_xscale("log", base=2)
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][col].set_title(f"{name}: prefill, fp32")
    return _save(fig, path)


def memory(result: dict, path: Path) -> Path | None:
    configs = result.get("configs", {})
    if not configs:
        return None
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    gib = 2**30
    for ax, (name, c) in zip(axes[0], configs.items()):
        curve = c["curves"]
        ax.plot(
            curve["contexts"],
            [b / gib for b in curve["infinitevl_state_bytes"]],
            "--",
            color=OURS,
            label="InfiniteVL state",
        )
        ax.plot(
            curve["contexts"],
            [b / gib for b in curve["baseline_kv_bytes"]],
            "--",
            color=BASE,
            label="baseline KV cache",
        )
        for who, color, marker, label in (
            ("infinitevl", OURS, "o-", "InfiniteVL"),
            ("baseline", BASE, "s-", "baseline"),
        ):
            xs, pts = _measured(c["points"][who], "context")
            ax.plot(xs, [p["peak_rss_bytes"] / gib for p in pts], marker, color=color, label=f"{label} peak RSS")
        _stops(ax, c["points"]["baseline"], "context", "baseline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("GiB")
        ax.set_title(f"{name}: memory, fp32")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _rolling_fps(seconds: list[float], window: int) -> list[float]:
    """1 / the median frame time over the last `window` frames (as the report's FPS)."""
    out = []
    for i in range(len(seconds)):
        median = statistics.median(seconds[max(0, i - window + 1) : i + 1])
        out.append(1.0 / median if median > 0 else 0.0)
    return out


def streaming(result: dict, path: Path) -> Path | None:
    if "infinitevl" not in result:
        return None
    w = result["fps_window"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for who, color, label in (("infinitevl", OURS, "InfiniteVL"), ("baseline", BASE, "baseline")):
        frames = result[who]["frames"]
        x = list(range(1, len(frames["total_s"]) + 1))
        axes[0].plot(x, _rolling_fps(frames["total_s"], w), "-", color=color, label=f"{label}, end to end")
        axes[0].plot(x, _rolling_fps(frames["decoder_s"], w), ":", color=color, label=f"{label}, decoder only")
        axes[1].plot(x, [b / 2**20 for b in frames["rss_bytes"]], "-", color=color, label=f"{label} RSS")
        axes[1].plot(x, [b / 2**20 for b in frames["state_bytes"]], ":", color=color, label=f"{label} state / KV")
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"frames / s (1 / median of the last {w} frames)")
    axes[1].set_ylabel("MiB")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("frame")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    size = result["frame_size"]
    axes[0].set_title(f"{result['config']['name']}: stream of {size[0]}x{size[1]} frames")
    axes[1].set_title("memory over the stream")
    return _save(fig, path)


def ops(result: dict, path: Path) -> Path | None:
    rows = result.get("results", [])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [
        f"{r['op']}\n" + ",".join(f"{k}={v}" for k, v in r["shape"].items() if k in ("T", "window", "keys"))
        for r in rows
    ]
    xs = range(len(rows))
    ours = [r["ours"]["median_s"] * 1e3 for r in rows]
    theirs = [r["theirs"]["median_s"] * 1e3 for r in rows]
    ax.bar([x - 0.2 for x in xs], ours, 0.4, color=OURS, label="ours")
    ax.bar([x + 0.2 for x in xs], theirs, 0.4, color=BASE, label="reference")
    for x, r, top in zip(xs, rows, theirs):
        ax.annotate(f"{r['speedup']:.2f}x", (x, max(top, ours[x])), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms)")
    ax.set_title("ops: ours vs reference (fp32, same run, interleaved)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return _save(fig, path)


PLOTS = {
    "decode": ("decode_latency.png", decode_latency),
    "prefill": ("prefill.png", prefill),
    "memory": ("memory.png", memory),
    "streaming": ("streaming_fps.png", streaming),
    "ops": ("ops.png", ops),
}
