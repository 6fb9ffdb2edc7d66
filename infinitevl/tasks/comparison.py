"""The miniature's comparison: held-out questions asked through streaming sessions, grouped into the README's tables.

`evaluate_model` plays held-out streams of either task into a `StreamSession` frame by frame and asks every question
from a branch of the state (one row per question); `summarise` groups the rows per model into accuracies with the
number of questions behind each, and `markdown` / `plot` turn the summary into the README's tables and figure. It
trains nothing and chooses nothing: the lengths, streams and seeds come from the caller.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from ..config import FULL, SPARSE
from . import digit_copy
from .digit_recall import FRAME, INTERVAL, QUESTION, FrameMaker, probe_stream

# distance bins, in frames back. Recall task: one token per frame. Read-back task: four tokens per frame, so its
# bins are four times narrower in frames for the same reach in tokens.
DISTANCE_BINS = [(0, 7), (8, 31), (32, 127), (128, 511), (512, 100000)]
COPY_DISTANCE_BINS = [(0, 3), (4, 15), (16, 63), (64, 255), (256, 100000)]


def probe_distances(length: int, rng: random.Random) -> list[int]:
    """Two far probes (log-uniform over the stream, distinct) and one near one."""
    far_range = list(range(min(8, length - 1), length))
    weights = [1.0 / (d + 1) for d in far_range]  # log-uniform
    far: set[int] = set()
    while len(far) < min(2, len(far_range)):
        far.add(rng.choices(far_range, weights)[0])
    near = rng.randrange(0, min(4, length))
    return sorted(far | {near})


def evaluate_model(
    folder: Path,
    lengths,
    streams_per_length: int,
    media: Path | None,
    seed: int = 0,
    full_attention: bool = False,
    task: str = "recall",
) -> list[dict]:
    """Answer held-out questions of `task` ("recall" or "copy") through streaming sessions; one row per question.
    Every row has `task`, `kind` ("recall" or "read"), `length`, `distance` (frames back; for a read-back, of the
    oldest frame read), `truth`, `answer`, `correct`, the state's bytes and the time per frame."""
    from ..engine.generation import SamplingParams
    from ..engine.session import StreamSession
    from ..model import InfiniteVLForConditionalGeneration
    from ..processing.processor import Processor

    if task not in ("recall", "copy"):
        raise ValueError(f"unknown task {task!r} (recall, copy)")
    model = InfiniteVLForConditionalGeneration.from_pretrained(folder)
    processor = Processor.from_pretrained(folder, model.config)
    size, per_frame = ((FRAME, FRAME), 1) if task == "recall" else (digit_copy.SIZE, digit_copy.CELLS)
    # full-attention and block-sparse layers keep every key: their cache is sized for the stream up front
    grows = full_attention or any(t in (FULL, SPARSE) for t in model.config.text.layer_types)
    rows = []
    for length in lengths:
        if task == "recall":
            maker = FrameMaker("eval", seed + length, media)
            rng = random.Random(f"probe-{seed}-{length}")
        else:
            maker = FrameMaker("eval", f"copy-{seed + length}", media)
            rng = random.Random(f"copy-probe-{seed}-{length}")
        for s in range(streams_per_length):
            if task == "recall":
                stream, truth = probe_stream(maker, length, probe_distances(length, rng), rng)
                frames, reads = stream.frames, {}
            else:
                frames, truth, reads = digit_copy.probe_stream(maker, length, probe_distances(length, rng), rng)
            session = StreamSession(
                model, processor, frame_size=size, max_context=per_frame * length + 64 if grows else None
            )
            times = []
            for i, frame in enumerate(frames):
                t0 = time.perf_counter()
                session.append_frame(frame.image, i * INTERVAL)
                times.append(time.perf_counter() - t0)
            common = {
                "task": task,
                "length": length,
                "stream": s,
                "state_bytes": state_bytes_used(session.state),
                "ms_per_frame_first": 1e3 * sum(times[:8]) / min(8, len(times)),
                "ms_per_frame_last": 1e3 * sum(times[-8:]) / min(8, len(times)),
            }
            for k, want in reads.items():
                answer = session.ask(
                    digit_copy.copy_question(k), SamplingParams(max_new_tokens=digit_copy.CELLS * k + 2)
                ).strip()
                exact, right = digit_copy.copy_score(answer, want)
                rows.append(
                    {
                        **common,
                        "kind": "read",
                        "frames_read": k,
                        "digits": len(want.split()),
                        "distance": k - 1,
                        "truth": want,
                        "answer": answer,
                        "correct": exact,
                        "digits_right": right,
                    }
                )
            for tag, (digit, distance) in sorted(truth.items(), key=lambda kv: kv[1][1]):
                answer = session.ask(QUESTION.format(tag=tag), SamplingParams(max_new_tokens=3)).strip()
                rows.append(
                    {
                        **common,
                        "kind": "recall",
                        "tag": tag,
                        "distance": distance,
                        "truth": str(digit),
                        "answer": answer,
                        "correct": answer == str(digit),
                    }
                )
    return rows


def state_bytes_used(state) -> int:
    """The bytes the stream so far occupies: fixed-size layers (Gated DeltaNet, windows, sinks) whole; caches that
    keep every key (full attention, block-sparse) only as far as they are filled, since they are allocated up front
    for the longest stream and grow with the input."""
    from ..state import AttentionLayerState, BlockSparseLayerState

    total = 0
    for layer in state.layers:
        if isinstance(layer, BlockSparseLayerState):
            total += layer.bytes_used(int(state.num_tokens.max()))
        elif isinstance(layer, AttentionLayerState) and layer.window is None:
            filled = int((layer.positions[0] >= 0).sum())
            total += sum(t[:, :, :filled].numel() * t.element_size() for t in (layer.keys, layer.values))
        else:
            total += sum(t.numel() * t.element_size() for t in layer.tensors().values())
    return total


def _acc(rows) -> float:
    return sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")


def _bin_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi if hi < 100000 else ''}"


def _by_distance(rows, bins) -> tuple[dict, dict]:
    acc = {_bin_name(lo, hi): _acc([r for r in rows if lo <= r["distance"] <= hi]) for lo, hi in bins}
    counts = {_bin_name(lo, hi): sum(lo <= r["distance"] <= hi for r in rows) for lo, hi in bins}
    return acc, counts


def _by_length(rows) -> dict:
    lengths = sorted({r["length"] for r in rows})
    return {
        "by_length": {L: _acc([r for r in rows if r["length"] == L]) for L in lengths},
        "state_bytes": {L: max(r["state_bytes"] for r in rows if r["length"] == L) for L in lengths},
        "ms_per_frame_last": {
            L: sum(r["ms_per_frame_last"] for r in rows if r["length"] == L) / sum(1 for r in rows if r["length"] == L)
            for L in lengths
        },
    }


def summarise(results: dict[str, list[dict]]) -> dict:
    """Per model: the recall task's accuracy by distance and stream length (top level, as before the second task),
    and under "copy" the read-back task's exact and per-digit accuracy by sequence length and its recall accuracy
    by distance, each with the number of questions behind it."""
    out = {}
    for name, rows in results.items():
        recall = [r for r in rows if r.get("task", "recall") == "recall"]
        copy_rows = [r for r in rows if r.get("task") == "copy"]
        s: dict = {}
        if recall:
            by_dist, counts = _by_distance(recall, DISTANCE_BINS)
            s.update(
                overall=_acc(recall),
                by_distance=by_dist,
                questions_by_distance=counts,
                questions=len(recall),
                **_by_length(recall),
            )
        if copy_rows:
            reads = [r for r in copy_rows if r["kind"] == "read"]
            far = [r for r in copy_rows if r["kind"] == "recall"]
            sizes = sorted({r["digits"] for r in reads})
            by_dist, counts = _by_distance(far, COPY_DISTANCE_BINS)
            s["copy"] = {
                "read": {n: _acc([r for r in reads if r["digits"] == n]) for n in sizes},
                "read_questions": {n: sum(r["digits"] == n for r in reads) for n in sizes},
                "read_digits_right": {
                    n: sum(r["digits_right"] for r in reads if r["digits"] == n)
                    / max(1, sum(r["digits"] == n for r in reads))
                    for n in sizes
                },
                "read_overall": _acc(reads),
                "recall": by_dist,
                "recall_questions": counts,
                "recall_overall": _acc(far),
                "questions": len(copy_rows),
                **_by_length(copy_rows),
            }
        out[name] = s
    return out


def _cell(x: float) -> str:
    return f"{x:.2f}" if x == x else "-"


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB"


def _row(*cells) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def recall_markdown(summary: dict) -> list[str]:
    names = [n for n in summary if "by_distance" in summary[n]]
    if not names:
        return []
    bins = list(summary[names[0]]["by_distance"])
    lengths = list(summary[names[0]]["by_length"])
    lines = [
        "| model | " + " | ".join(f"acc @ {b} back" for b in bins) + " | overall | questions |",
        "|---" * (len(bins) + 3) + "|",
    ]
    for n in names:
        s = summary[n]
        cells = [_cell(s["by_distance"][b]) for b in bins]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {s['overall']:.2f} | {s['questions']} |")
    counts = summary[names[0]]["questions_by_distance"]  # the same held-out questions for every model
    lines.append("| (questions) | " + " | ".join(str(counts[b]) for b in bins) + " | | |")
    lines += [
        "",
        _row(
            "model",
            *(f"acc @ {L} frames" for L in lengths),
            *(f"state @ {L}" for L in lengths),
            *(f"ms/frame @ {L}" for L in lengths),
        ),
        "|---" * (1 + 3 * len(lengths)) + "|",
    ]
    for n in names:
        s = summary[n]
        lines.append(
            _row(
                n,
                *(_cell(s["by_length"][L]) for L in lengths),
                *(_kib(s["state_bytes"][L]) for L in lengths),
                *(f"{s['ms_per_frame_last'][L]:.1f}" for L in lengths),
            )
        )
    return lines


def copy_markdown(summary: dict) -> list[str]:
    names = [n for n in summary if "copy" in summary[n]]
    if not names:
        return []
    first = summary[names[0]]["copy"]
    sizes, bins, lengths = list(first["read"]), list(first["recall"]), list(first["state_bytes"])
    lines = [
        _row("model", *(f"read {n} digits" for n in sizes), *(f"recall @ {b} back" for b in bins)),
        "|---" * (1 + len(sizes) + len(bins)) + "|",
    ]
    for n in names:
        c = summary[n]["copy"]
        lines.append(_row(n, *(_cell(c["read"][k]) for k in sizes), *(_cell(c["recall"][b]) for b in bins)))
    lines.append(
        _row(
            "(questions)",
            *(first["read_questions"][k] for k in sizes),
            *(first["recall_questions"][b] for b in bins),
        )
    )
    lines += [
        "",
        _row(
            "model",
            *(f"digits right, read {n}" for n in sizes),
            *(f"state @ {L}" for L in lengths),
            *(f"ms/frame @ {L}" for L in lengths),
        ),
        "|---" * (1 + len(sizes) + 2 * len(lengths)) + "|",
    ]
    for n in names:
        c = summary[n]["copy"]
        lines.append(
            _row(
                n,
                *(_cell(c["read_digits_right"][k]) for k in sizes),
                *(_kib(c["state_bytes"][L]) for L in lengths),
                *(f"{c['ms_per_frame_last'][L]:.1f}" for L in lengths),
            )
        )
    return lines


def markdown(summary: dict, meta: dict) -> str:
    """The README's tables: the recall task, then the read-back task, then how they were measured."""
    lines = []
    recall, copy_lines = recall_markdown(summary), copy_markdown(summary)
    if recall:
        lines += ["**Recall task** (one token per frame; accuracy by frames back, then by stream length):", ""]
        lines += recall + [""]
    if copy_lines:
        lines += [
            "**Read-back task** (four tokens per frame; exact read-back of the last 1-4 frames by number of digits, "
            "recall of a tagged frame's digit by frames back; then the fraction of digits read right, by position):",
            "",
        ]
        lines += copy_lines + [""]
    took = (
        f"this run resumed an interrupted one, reusing its finished stages, and took {meta['minutes']:.0f} min"
        if meta.get("resumed")
        else f"training and evaluation {meta['minutes']:.0f} min in all"
    )
    lines.append(
        f"Command: `{meta['command']}`; {meta['date']}; {meta['machine']}; {took}. Accuracy is exact match of the answer: chance is 0.10 for a recalled "
        "digit and 10^-n for a read-back of n digits."
    )
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    has_copy = any("copy" in s for s in summary.values())
    has_recall = any("by_distance" in s for s in summary.values())
    rows = has_recall + has_copy  # a row per task: recall (3 panels) above read-back (2 panels)
    fig, grid = plt.subplots(rows, 3, figsize=(15, 4 * rows), squeeze=False)
    axes = list(grid[0]) if has_recall else []
    if has_copy:
        axes += list(grid[-1][:2])
        grid[-1][2].axis("off")
    for name, s in summary.items():
        ax = iter(axes)
        if has_recall and "by_distance" in s:
            a0, a1, a2 = next(ax), next(ax), next(ax)
            bins = list(s["by_distance"])
            a0.plot(range(len(bins)), [s["by_distance"][b] for b in bins], marker="o", label=name)
            a0.set_xticks(range(len(bins)), bins)
            lengths = list(s["state_bytes"])
            a1.plot(lengths, [s["state_bytes"][L] / 1024 for L in lengths], marker="o", label=name)
            a2.plot(lengths, [s["ms_per_frame_last"][L] for L in lengths], marker="o", label=name)
        if has_copy and "copy" in s:
            c = s["copy"]
            a3, a4 = next(ax), next(ax)
            sizes = list(c["read"])
            a3.plot(sizes, [c["read"][n] for n in sizes], marker="o", label=name)
            a3.set_xticks(sizes)
            bins = list(c["recall"])
            a4.plot(range(len(bins)), [c["recall"][b] for b in bins], marker="o", label=name)
            a4.set_xticks(range(len(bins)), bins)
    titles = []
    if has_recall:
        titles += [
            ("recall task: accuracy vs distance", "frames back", "accuracy"),
            ("state / cache memory vs stream length", "frames", "KiB"),
            ("time per frame at the end of the stream", "frames", "ms"),
        ]
    if has_copy:
        titles += [
            ("read-back task: exact read-back (within the window)", "digits read back", "accuracy"),
            ("read-back task: recall vs distance", "frames back", "accuracy"),
        ]
    for a, (title, xlabel, ylabel) in zip(axes, titles):
        a.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if ylabel == "accuracy":
            a.set_ylim(0, 1.02)
        if xlabel == "frames":
            a.set_xscale("log")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    path = out / "miniature.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_readme(readme: Path, text: str, block: str = "miniature") -> None:
    """Replace the `<!-- {block}:start -->` ... `<!-- {block}:end -->` block of `readme` by `text`."""
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    content = readme.read_text()
    if start not in content:
        raise ValueError(f"{readme} has no {start} ... {end} block")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n" + text + "\n" + end + tail)


def results_page(summary: dict, meta: dict, table: str) -> str:
    """docs/miniature/results.md: the README's tables, the read-back task by stream length, and the budget."""
    lines = ["# The miniature: results", "", table, ""]
    names = [n for n in summary if "copy" in summary[n]]
    if names:
        lengths = list(summary[names[0]]["copy"]["by_length"])
        lines += [
            "Read-back task, all questions (read-backs and recalls) by stream length:",
            "",
            "| model | " + " | ".join(f"acc @ {L} frames" for L in lengths) + " |",
            "|---" * (1 + len(lengths)) + "|",
        ]
        lines += [
            f"| {n} | " + " | ".join(_cell(summary[n]["copy"]["by_length"][L]) for L in lengths) + " |" for n in names
        ]
        lines.append("")
    b = meta.get("budget", {})
    if b:
        lines += [
            f"Budget (fixed before the run; tasks {', '.join(meta.get('tasks', []))}, sliding window "
            f"{meta.get('window')} tokens, batch {b['batch']}, learning rate {b['lr']}):",
            "",
            f"- vision read-out pre-training: {b['read_steps']} steps",
        ]
        lines += [f"- teacher phase: {'+'.join(k)} on {f[0]}-{f[1]} frames, {s} steps" for k, f, s in b["teacher"]]
        lines += [
            f"- each student: distill-layer {b['distill_layer']} steps (added to distill-e2e when there is no GDN "
            f"layer), distill-e2e {b['distill_e2e']}, sft {b['sft']} on {b['frames'][0]}-{b['frames'][1]} frames, "
            f"sft-long {b['sft_long']} (LoRA) on {b['long_frames'][0]}-{b['long_frames'][1]} frames; "
            f"{b['off_task']} off-task prompts in the supervised stages",
            f"- {b['streams']} training streams per data kind and length range",
            f"- held out: recall task {b['eval_streams']} streams at each of {list(b['eval_lengths'])} frames, "
            f"read-back task {b['copy_eval_streams']} streams at each of {list(b['copy_eval_lengths'])} frames",
            "",
            f"Training took {meta.get('train_minutes', 0):.0f} min of the {meta['minutes']:.0f}.",
        ]
    return "\n".join(lines) + "\n"
