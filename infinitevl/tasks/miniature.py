"""The paper's central result in miniature, with the project's own pipeline end to end, on a CPU.

1. Data: `digit_recall` streams (real digit scans and photographs, a real font), seeded.
2. Teacher: a small Qwen2.5-VL (transformers architecture, all layers full softmax attention). Its vision tower
   first learns to read frames (linear read-outs of digit and tag), then the whole model learns by curriculum:
   name the frames of short streams, then answer recall questions on longer ones. It is trained in this
   package's loop (as an all-full-attention InfiniteVL, the identical architecture) and exported to the
   transformers format, where its logits are checked against transformers' own implementation.
3. Students, same data and step budget: `infinitevl convert` from the teacher, then distill-layer (GDN layers),
   distill-e2e, sft and sft-long (LoRA, longer streams) + merge. Variants: the InfiniteVL hybrid (layer 0
   sliding-window attention, layers 1-3 Gated DeltaNet), SWA-only and GDN-only.
4. Comparison: held-out streams of 16 to 1024 frames, questions whose answer lies 0 to 1000 frames back, asked
   through streaming sessions from branches of the state; accuracy by distance and by stream length, state memory
   and time per frame. A table and plots go into the README; the hybrid becomes the package's default model.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import FULL, LINEAR, SLIDING, tiny_config
from .digit_recall import FRAME, INTERVAL, TAGS, FrameMaker, probe_stream, task_tokenizer, write_dataset

MEDIA = Path(__file__).resolve().parents[3] / "shared" / "media" / "mllm_demo" / "mllm_demo_data"
WINDOW = 24  # tokens a sliding-window layer sees: the question plus the last ~10 frames
VARIANTS = {
    "hybrid": lambda n: [SLIDING if i % 4 == 0 else LINEAR for i in range(n)],
    "swa-only": lambda n: [SLIDING] * n,
    "gdn-only": lambda n: [LINEAR] * n,
}


@dataclass
class Budget:
    """Optimizer steps per phase (batch `batch`) and data sizes; `quick()` shrinks everything for tests."""

    batch: int = 32
    streams: int = 3000
    read_steps: int = 400
    teacher: list = field(
        default_factory=lambda: [
            ("caption", (1, 1), 150),
            ("caption", (1, 6), 200),
            ("recall", (2, 12), 300),
            ("recall", (4, 24), 500),
        ]
    )
    distill_layer: int = 200
    distill_e2e: int = 300
    sft: int = 300
    sft_long: int = 150
    long_frames: tuple = (24, 64)
    lr: float = 1e-3
    eval_lengths: tuple = (16, 64, 256, 1024)
    eval_streams: int = 8

    @classmethod
    def quick(cls) -> Budget:
        return cls(
            batch=4,
            streams=40,
            read_steps=5,
            teacher=[("caption", (1, 2), 3), ("recall", (2, 6), 3)],
            distill_layer=2,
            distill_e2e=2,
            sft=2,
            sft_long=2,
            long_frames=(6, 10),
            eval_lengths=(8, 24),
            eval_streams=2,
        )


def log(msg: str) -> None:
    print(f"[miniature {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data -------------------------------------------------------------------------------------------------------------
def datasets(root: Path, budget: Budget, media: Path | None) -> dict:
    """Every training file, keyed by (task, frames range); written once."""
    out = {}
    wanted = {(task, tuple(frames)) for task, frames, _ in budget.teacher} | {
        ("recall", (4, 24)),
        ("recall", tuple(budget.long_frames)),
    }
    for k, (task, frames) in enumerate(sorted(wanted)):
        folder = root / "data" / f"{task}-{frames[0]}-{frames[1]}"
        if not (folder / "train.jsonl").exists():
            write_dataset(folder, budget.streams, frames, "train", seed=k, media=media, questions=4, task=task)
            write_dataset(
                folder,
                max(8, budget.streams // 40),
                frames,
                "eval",
                seed=k,
                media=media,
                bank_per_tag=20,
                questions=4,
                task=task,
            )
        out[(task, frames)] = folder
    return out


# -- training ---------------------------------------------------------------------------------------------------------
def run_stage(
    stage: str, student: Path, out: Path, data: Path, steps: int, budget: Budget, teacher: Path | None = None, **sets
) -> Path:
    from ..training.config import load_config
    from ..training.loop import Trainer

    overrides = {
        "data.train": data / "train.jsonl",
        "data.eval": data / "eval.jsonl",
        "data.max_length": 1024,
        "batch_size": budget.batch,
        "optim.lr": budget.lr,
        "optim.warmup_ratio": 0.05,
        "log_every": 25,
        "resume": False,
        **sets,
    }
    cfg = load_config(
        None,
        [f"{k}={v}" for k, v in overrides.items()],
        stage=stage,
        student=str(student),
        teacher=str(teacher) if teacher else None,
        out=str(out),
        max_steps=steps,
    )
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    last = trainer.fit()
    log(f"{stage} -> {out.name}: {steps} steps in {time.perf_counter() - t0:.0f} s, loss {last.get('loss', 0):.4f}")
    return trainer.out / ("adapters" if stage == "sft-long" else "final")


@torch.no_grad()
def _frames_tensor(processor, frames) -> torch.Tensor:
    return torch.stack([processor.encode_frame(f.image, size=(FRAME, FRAME)).pixel_values for f in frames])


def pretrain_reading(folder: Path, budget: Budget, media: Path | None, seed: int = 0) -> dict:
    """Teach the vision tower to read frames: linear read-outs of digit and tag from each frame's token, trained
    with the tower (the read-out heads are then dropped). Returns held-out read-out accuracies."""
    from ..model import InfiniteVLForConditionalGeneration
    from ..model.vision import encode
    from ..processing.processor import Processor

    model = InfiniteVLForConditionalGeneration.from_pretrained(folder)
    processor = Processor.from_pretrained(folder, model.config)
    maker = FrameMaker("train", seed + 77, media)
    frames = [maker.frame(maker.rng.randrange(10), maker.rng.choice(TAGS)) for _ in range(max(64, budget.streams))]
    held = FrameMaker("eval", seed + 78, media)
    held_frames = [held.frame(held.rng.randrange(10), held.rng.choice(TAGS)) for _ in range(400)]
    X, Xh = _frames_tensor(processor, frames), _frames_tensor(processor, held_frames)
    digits = torch.tensor([f.digit for f in frames])
    tags = torch.tensor([TAGS.index(f.tag) for f in frames])
    tower = model.model.visual
    heads = torch.nn.Linear(model.config.vision.out_hidden_size, 10 + len(TAGS))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, FRAME // 14, FRAME // 14]])
    tower.train()
    for _ in range(budget.read_steps):
        idx = torch.randint(0, len(frames), (min(128, len(frames)),), generator=gen)
        out = heads(encode(tower, X[idx].reshape(-1, X.shape[-1]), grid.repeat(len(idx), 1)))
        loss = torch.nn.functional.cross_entropy(out[:, :10], digits[idx]) + torch.nn.functional.cross_entropy(
            out[:, 10:], tags[idx]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.eval()
    with torch.no_grad():
        out = heads(encode(tower, Xh.reshape(-1, Xh.shape[-1]), grid.repeat(len(held_frames), 1)))
    result = {
        "digit": float((out[:, :10].argmax(-1) == torch.tensor([f.digit for f in held_frames])).float().mean()),
        "tag": float((out[:, 10:].argmax(-1) == torch.tensor([TAGS.index(f.tag) for f in held_frames])).float().mean()),
    }
    model.save_pretrained(folder)
    return result


def train_teacher(root: Path, budget: Budget, data: dict, media: Path | None) -> Path:
    """A Qwen2.5-VL teacher trained on the task; returns its transformers-format folder."""
    from ..training.convert import convert
    from ..training.teacher import new_qwen_teacher

    final = root / "teacher"
    if (final / "DONE").exists():
        return final
    init = new_qwen_teacher(
        root / "teacher-init",
        seed=0,
        layers=4,
        hidden=128,
        intermediate=256,
        heads=4,
        kv_heads=2,
        vision_depth=2,
        vision_hidden=64,
        spread=False,
        tokenizer=task_tokenizer(tiny_config()),
        max_pixels=FRAME * FRAME,
    )
    work = convert(init, root / "teacher-train" / "start", layer_types=[FULL] * 4, window=None)
    t0 = time.perf_counter()
    reading = pretrain_reading(work, budget, media)
    log(f"vision read-out after pre-training: {reading} ({time.perf_counter() - t0:.0f} s)")
    current = work
    for k, (task, frames, steps) in enumerate(budget.teacher):
        current = run_stage(
            "sft",
            current,
            root / "teacher-train" / f"phase{k}-{task}",
            data[(task, tuple(frames))],
            steps,
            budget,
            trainable="all",
        )
    export_qwen(current, init, final)
    (final / "DONE").write_text(json.dumps({"reading": reading}))
    return final


def export_qwen(trained: Path, init: Path, out: Path) -> Path:
    """Our all-full-attention model -> a transformers Qwen2.5-VL folder (same tensor names), checked against
    transformers' own forward."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..model import InfiniteVLForConditionalGeneration

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(init, out)
    ours = InfiniteVLForConditionalGeneration.from_pretrained(trained)
    ours.save_pretrained(out / "tmp")
    (out / "tmp" / "model.safetensors").replace(out / "model.safetensors")
    shutil.rmtree(out / "tmp")
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), attn_implementation="sdpa").eval()
    ids = torch.randint(0, 370, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"exported teacher differs from the trained one by {diff:.2e}")
    return out


def train_student(root: Path, variant: str, teacher: Path, budget: Budget, data: dict) -> Path:
    """convert -> distill-layer -> distill-e2e -> sft -> sft-long (LoRA) -> merge; returns the final folder."""
    from ..training.convert import convert
    from ..training.lora import merge

    base = root / variant
    final = base / "final"
    if (final / "config.json").exists():
        return final
    layers = VARIANTS[variant](4)
    current = convert(teacher, base / "start", layer_types=layers, window=WINDOW)
    main = data[("recall", (4, 24))]
    e2e_steps = budget.distill_e2e
    if LINEAR in layers:
        current = run_stage(
            "distill-layer", current, base / "distill-layer", main, budget.distill_layer, budget, teacher=teacher
        )
    else:  # no new layer to distill layer-wise: the same number of steps goes to the end-to-end stage
        e2e_steps += budget.distill_layer
    mixers = "[gdn,swa,mlp]"
    current = run_stage(
        "distill-e2e", current, base / "distill-e2e", main, e2e_steps, budget, teacher=teacher, trainable=mixers
    )
    current = run_stage("sft", current, base / "sft", main, budget.sft, budget, trainable=mixers)
    adapters = run_stage(
        "sft-long",
        current,
        base / "sft-long",
        data[("recall", tuple(budget.long_frames))],
        budget.sft_long,
        budget,
        **{"lora.r": 8, "lora.alpha": 16},
    )
    merge(current, adapters, final)
    _set_frame_size(final)
    return final


def _set_frame_size(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["infinitevl_frame_size"] = [FRAME, FRAME]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# -- comparison -------------------------------------------------------------------------------------------------------
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
    folder: Path, lengths, streams_per_length: int, media: Path | None, seed: int = 0, full_attention: bool = False
) -> list[dict]:
    """Answer held-out probe questions through streaming sessions; one row per question."""
    from ..engine.generation import SamplingParams
    from ..engine.session import StreamSession
    from ..model import InfiniteVLForConditionalGeneration
    from ..processing.processor import Processor

    model = InfiniteVLForConditionalGeneration.from_pretrained(folder)
    processor = Processor.from_pretrained(folder, model.config)
    rows = []
    greedy = SamplingParams(max_new_tokens=3)
    for length in lengths:
        maker = FrameMaker("eval", seed + length, media)
        rng = random.Random(f"probe-{seed}-{length}")
        for s in range(streams_per_length):
            stream, truth = probe_stream(maker, length, probe_distances(length, rng), rng)
            session = StreamSession(
                model, processor, frame_size=(FRAME, FRAME), max_context=length + 64 if full_attention else None
            )
            times = []
            for i, frame in enumerate(stream.frames):
                t0 = time.perf_counter()
                session.append_frame(frame.image, i * INTERVAL)
                times.append(time.perf_counter() - t0)
            for tag, (digit, distance) in sorted(truth.items(), key=lambda kv: kv[1][1]):
                answer = session.ask(f"Which digit was last shown with tag {tag}?", greedy).strip()
                rows.append(
                    {
                        "length": length,
                        "stream": s,
                        "tag": tag,
                        "distance": distance,
                        "truth": str(digit),
                        "answer": answer,
                        "correct": answer == str(digit),
                        "state_bytes": _state_bytes(session.state, full_attention),
                        "ms_per_frame_first": 1e3 * sum(times[:8]) / min(8, len(times)),
                        "ms_per_frame_last": 1e3 * sum(times[-8:]) / min(8, len(times)),
                    }
                )
    return rows


def _state_bytes(state, full_attention: bool) -> int:
    """InfiniteVL: the state's fixed size. Full attention: the bytes of the cache actually filled (it grows)."""
    if not full_attention:
        return state.nbytes
    total = 0
    for layer in state.layers:
        for name, t in layer.tensors().items():
            if name in ("keys", "values"):
                filled = int((layer.positions[0] >= 0).sum())
                total += t[:, :, :filled].numel() * t.element_size()
    return total


DISTANCE_BINS = [(0, 7), (8, 31), (32, 127), (128, 511), (512, 100000)]


def summarise(results: dict[str, list[dict]]) -> dict:
    def acc(rows):
        return sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")

    out = {}
    for name, rows in results.items():
        by_dist = {
            f"{lo}-{hi if hi < 100000 else ''}": acc([r for r in rows if lo <= r["distance"] <= hi])
            for lo, hi in DISTANCE_BINS
        }
        lengths = sorted({r["length"] for r in rows})
        by_len = {L: acc([r for r in rows if r["length"] == L]) for L in lengths}
        mem = {L: max(r["state_bytes"] for r in rows if r["length"] == L) for L in lengths}
        ms = {
            L: sum(r["ms_per_frame_last"] for r in rows if r["length"] == L) / sum(1 for r in rows if r["length"] == L)
            for L in lengths
        }
        out[name] = {
            "overall": acc(rows),
            "by_distance": by_dist,
            "questions_by_distance": {
                f"{lo}-{hi if hi < 100000 else ''}": sum(lo <= r["distance"] <= hi for r in rows)
                for lo, hi in DISTANCE_BINS
            },
            "by_length": by_len,
            "state_bytes": mem,
            "ms_per_frame_last": ms,
            "questions": len(rows),
        }
    return out


def plot(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, s in summary.items():
        bins = list(s["by_distance"])
        axes[0].plot(range(len(bins)), [s["by_distance"][b] for b in bins], marker="o", label=name)
        lengths = list(s["state_bytes"])
        axes[1].plot(lengths, [s["state_bytes"][L] / 1024 for L in lengths], marker="o", label=name)
        axes[2].plot(lengths, [s["ms_per_frame_last"][L] for L in lengths], marker="o", label=name)
    axes[0].set_xticks(range(len(bins)), bins)
    axes[0].set(title="accuracy vs distance (frames back)", xlabel="distance", ylabel="accuracy", ylim=(0, 1.02))
    axes[1].set(title="state / cache memory vs stream length", xlabel="frames", ylabel="KiB", xscale="log")
    axes[2].set(title="time per frame at the end of the stream", xlabel="frames", ylabel="ms", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "miniature.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def markdown(summary: dict, meta: dict) -> str:
    names = list(summary)
    bins = list(summary[names[0]]["by_distance"])
    lengths = list(summary[names[0]]["by_length"])
    lines = [
        "| model | " + " | ".join(f"acc @ {b} back" for b in bins) + " | overall | questions |",
        "|---" * (len(bins) + 3) + "|",
    ]
    for n in names:
        s = summary[n]
        cells = [f"{s['by_distance'][b]:.2f}" if s["by_distance"][b] == s["by_distance"][b] else "-" for b in bins]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {s['overall']:.2f} | {s['questions']} |")
    counts = summary[names[0]]["questions_by_distance"]  # the same held-out questions for every model
    lines.append("| (questions) | " + " | ".join(str(counts[b]) for b in bins) + " | | |")
    lines += [
        "",
        "| model | "
        + " | ".join(f"acc @ {L} frames" for L in lengths)
        + " | "
        + " | ".join(f"state @ {L}" for L in lengths)
        + " | "
        + " | ".join(f"ms/frame @ {L}" for L in lengths)
        + " |",
        "|---" * (1 + 3 * len(lengths)) + "|",
    ]
    for n in names:
        s = summary[n]
        lines.append(
            f"| {n} | "
            + " | ".join(f"{s['by_length'][L]:.2f}" for L in lengths)
            + " | "
            + " | ".join(_kib(s["state_bytes"][L]) for L in lengths)
            + " | "
            + " | ".join(f"{s['ms_per_frame_last'][L]:.1f}" for L in lengths)
            + " |"
        )
    lines += [
        "",
        f"Command: `{meta['command']}`; {meta['date']}; {meta['machine']}; training and evaluation "
        f"{meta['minutes']:.0f} min in all. Accuracy is exact match of the answered digit (chance 0.10).",
    ]
    return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB"


def write_readme(readme: Path, text: str) -> None:
    start, end = "<!-- miniature:start -->", "<!-- miniature:end -->"
    content = readme.read_text()
    if start not in content:
        raise ValueError(f"{readme} has no {start} ... {end} block")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n" + text + "\n" + end + tail)


def install_default(folder: Path, target: Path) -> Path:
    """Copy a trained student into the package as the default model, with the note that says what it knows."""
    from ..defaults import BUNDLED_NOTE, NOTE_KEY

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy(f, target / f.name)
    cfg = json.loads((target / "config.json").read_text())
    cfg[NOTE_KEY] = BUNDLED_NOTE
    (target / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return target


@dataclass
class Report:
    summary: dict
    meta: dict
    rows: dict

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1, default=str))


def run(
    root: str | Path,
    budget: Budget | None = None,
    media: Path | None = MEDIA,
    readme: Path | None = None,
    install: Path | None = None,
    command: str = "infinitevl miniature",
) -> Report:
    import platform

    budget = budget or Budget()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    media = media if media is not None and media.exists() else None
    data = datasets(root, budget, media)
    log(f"data ready ({time.perf_counter() - t0:.0f} s)")
    teacher = train_teacher(root, budget, data, media)
    log(f"teacher ready ({time.perf_counter() - t0:.0f} s)")
    students = {v: train_student(root, v, teacher, budget, data) for v in VARIANTS}
    log(f"students ready ({time.perf_counter() - t0:.0f} s)")
    from ..training.convert import convert

    teacher_ivl = convert(teacher, root / "teacher-eval", layer_types=[FULL] * 4, window=None)
    _set_frame_size(teacher_ivl)
    rows = {
        "teacher (full attention)": evaluate_model(
            teacher_ivl, budget.eval_lengths, budget.eval_streams, media, full_attention=True
        )
    }
    for v, folder in students.items():
        name = "InfiniteVL hybrid" if v == "hybrid" else v
        rows[name] = evaluate_model(folder, budget.eval_lengths, budget.eval_streams, media)
        log(f"evaluated {name}")
    summary = summarise(rows)
    import os

    meta = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "minutes": (time.perf_counter() - t0) / 60,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "budget": asdict(budget),
    }
    report = Report(summary, meta, rows)
    report.save(root / "report.json")
    plot(summary, root / "plots")
    if readme is not None:
        figure_dir = readme.parent / "docs" / "miniature"
        figure_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "plots" / "miniature.png", figure_dir / "miniature.png")
        write_readme(readme, markdown(summary, meta) + "\n\n![miniature](docs/miniature/miniature.png)")
    if install is not None:
        install_default(students["hybrid"], install)
        log(f"installed the hybrid as the default model at {install}")
    return report
