"""The paper's central result in miniature, with the project's own pipeline end to end, on a CPU.

1. Data, seeded, from real digit scans, photographs and a real font: `digit_recall` (one token per frame: which
   digit was last shown with a tag, up to 1,000 frames back) and `digit_copy` (four tokens per frame: read back
   every digit of the last 1-4 frames exactly, and the same recall question far back). `off_task` pairs general
   prompts with a fixed reply that says what the model knows.
2. Teacher: a small Qwen2.5-VL (transformers architecture, all layers full softmax attention). Its vision tower
   first learns to read frames (linear read-outs of every token's digit and tag), then the whole model learns by
   curriculum on both tasks at once: name or read back the frames of short streams, then answer recall and
   read-back questions on longer ones. It is trained in this package's loop (as an all-full-attention InfiniteVL,
   the identical architecture) and exported to the transformers format, where its logits are checked against
   transformers' own implementation.
3. Students, same data and step budget each: `infinitevl convert` from the teacher, then distill-layer (GDN
   layers), distill-e2e, sft and sft-long (LoRA, longer streams) + merge. Variants: the InfiniteVL hybrid (layer 0
   sliding-window attention, layers 1-3 Gated DeltaNet: the official rule), the hybrid with its attention layer
   last (layers 0-2 GDN, layer 3 SWA: Qwen3-Next's order), SWA-only and GDN-only.
4. Comparison (`comparison.py`): held-out streams through streaming sessions, every question from a branch of the
   state. A table and plots go into the README; the hybrid becomes the package's default model and SWA-only is
   shipped beside it for the demo's contrast.

The task design and the budget below were fixed before the final run and are stated in the README; nothing here
is tuned on held-out results.
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
from . import comparison, digit_copy, digit_recall, off_task
from .digit_recall import FRAME, TAGS, FrameMaker, task_tokenizer

# Tokens a sliding-window layer sees: a read-back question (12 tokens with the chat markup) and the 16 digits of the
# last 4 frames fit with room to spare; on the recall task, the question (15 tokens) and the last ~16 frames.
WINDOW = 32
VARIANTS = {
    "hybrid": lambda n: [SLIDING if i % 4 == 0 else LINEAR for i in range(n)],
    "hybrid-swa-last": lambda n: [SLIDING if i % 4 == 3 else LINEAR for i in range(n)],
    "swa-only": lambda n: [SLIDING] * n,
    "gdn-only": lambda n: [LINEAR] * n,
}
NAMES = {"hybrid": "InfiniteVL hybrid", "hybrid-swa-last": "hybrid, SWA last"}
TASKS = ("recall", "copy")
KINDS = {"recall": ("caption", "recall"), "copy": ("copy",)}  # the training data kinds of each task
LAYERS = 4


@dataclass
class Budget:
    """Optimizer steps per phase (batch `batch`) and data sizes; `quick()` shrinks everything for tests. A teacher
    phase is (data kinds, frames per stream, steps); its kinds of the tasks not run are left out."""

    batch: int = 32
    streams: int = 3000  # training streams per data kind and length range
    read_steps: int = 400
    teacher: list = field(
        default_factory=lambda: [
            (("caption", "copy"), (1, 1), 150),
            (("caption", "copy"), (1, 6), 200),
            (("recall", "copy"), (2, 12), 450),
            (("recall", "copy"), (4, 24), 750),
        ]
    )
    frames: tuple = (4, 24)  # the students' streams
    distill_layer: int = 200
    distill_e2e: int = 300
    sft: int = 300
    sft_long: int = 150
    long_frames: tuple = (24, 64)
    off_task: int = 400  # fixed-reply records mixed into the students' supervised stages (0: none)
    lr: float = 1e-3
    eval_lengths: tuple = (16, 64, 256, 1024)
    eval_streams: int = 8
    copy_eval_lengths: tuple = (16, 64, 256)
    copy_eval_streams: int = 12

    @classmethod
    def quick(cls) -> Budget:
        return cls(
            batch=4,
            streams=40,
            read_steps=5,
            teacher=[(("caption", "copy"), (1, 2), 3), (("recall", "copy"), (2, 6), 3)],
            frames=(4, 8),
            distill_layer=2,
            distill_e2e=2,
            sft=2,
            sft_long=2,
            long_frames=(6, 10),
            off_task=16,
            eval_lengths=(8, 24),
            eval_streams=2,
            copy_eval_lengths=(8,),
            copy_eval_streams=2,
        )


def log(msg: str) -> None:
    print(f"[miniature {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data -------------------------------------------------------------------------------------------------------------
def _kinds(kinds, tasks) -> tuple:
    wanted = {k for t in tasks for k in KINDS[t]}
    return tuple(k for k in kinds if k in wanted)


def datasets(root: Path, budget: Budget, media: Path | None, tasks=TASKS) -> dict:
    """Every training file, written once: one folder per (kind, frames range), and for each stage a mixed folder
    whose records point into them. Returns {"teacher": [folder per phase], "main", "sft", "long"}."""
    phases = [(_kinds(kinds, tasks), tuple(frames), steps) for kinds, frames, steps in budget.teacher]
    student = _kinds(("recall", "copy"), tasks)
    wanted = {(k, frames) for kinds, frames, _ in phases for k in kinds}
    wanted |= {(k, tuple(budget.frames)) for k in student} | {(k, tuple(budget.long_frames)) for k in student}
    parts = {}
    for seed, (kind, frames) in enumerate(sorted(wanted)):
        folder = root / "data" / f"{kind}-{frames[0]}-{frames[1]}"
        if not (folder / "train.jsonl").exists():
            for split, n, bank in (("train", budget.streams, 200), ("eval", max(8, budget.streams // 40), 20)):
                opts = dict(seed=seed, media=media, bank_per_tag=bank, questions=4)
                if kind == "copy":
                    digit_copy.write_dataset(folder, n, frames, split, **opts)
                else:
                    digit_recall.write_dataset(folder, n, frames, split, task=kind, **opts)
        parts[(kind, frames)] = folder
    off = root / "data" / "off-task"
    if budget.off_task and not (off / "train.jsonl").exists():
        off_task.write_dataset(off, budget.off_task, "train", media)
        off_task.write_dataset(off, max(8, budget.off_task // 8), "eval", media)
    extra = [off] if budget.off_task else []

    def mixed(kinds, frames, more=()):
        return _mix(root / "data", [parts[(k, frames)] for k in kinds] + list(more))

    return {
        "teacher": [(mixed(kinds, frames), steps) for kinds, frames, steps in phases if kinds],
        "main": mixed(student, tuple(budget.frames)),
        "sft": mixed(student, tuple(budget.frames), extra),
        "long": mixed(student, tuple(budget.long_frames), extra),
    }


def _mix(data: Path, parts: list[Path]) -> Path:
    """A folder whose train/eval files hold the records of every part, shuffled (seeded), with media paths
    rewritten to point into the parts' folders."""
    if len(parts) == 1:
        return parts[0]
    out = data / ("mix-" + "+".join(p.name for p in parts))
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        records = []
        for part in parts:
            for line in (part / f"{split}.jsonl").read_text().splitlines():
                r = json.loads(line)
                for v in r.get("videos", []):
                    v["frames"] = [f"../{part.name}/{f}" for f in v["frames"]]
                r["images"] = [f"../{part.name}/{f}" for f in r.get("images", [])]
                records.append(json.dumps(r, ensure_ascii=False))
        random.Random(f"mix-{out.name}-{split}").shuffle(records)
        (out / f"{split}.jsonl").write_text("\n".join(records) + "\n")
    return out


# -- training ---------------------------------------------------------------------------------------------------------
def run_stage(
    stage: str, student: Path, out: Path, data: Path, steps: int, budget: Budget, teacher: Path | None = None, **sets
) -> Path:
    from ..training.config import load_config
    from ..training.loop import Trainer

    result = out / ("adapters" if stage == "sft-long" else "final")
    done = out / "DONE"
    if done.exists() and json.loads(done.read_text()).get("steps") == steps:  # an interrupted run resumes here
        return result
    overrides = {
        "data.train": data / "train.jsonl",
        "data.eval": data / "eval.jsonl",
        "data.max_length": 1024,
        "data.image_max_pixels": FRAME * FRAME,  # photographs as the bundled processor sees them (one token)
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
    seconds = time.perf_counter() - t0
    log(f"{stage} -> {out.name}: {steps} steps in {seconds:.0f} s, loss {last.get('loss', 0):.4f}")
    done.write_text(json.dumps({"steps": steps, "seconds": round(seconds), "loss": last.get("loss")}))
    return result


@torch.no_grad()
def _pixels(processor, frames, size) -> torch.Tensor:
    return torch.stack([processor.encode_frame(f.image, size=size).pixel_values for f in frames])


def _reading_sets(split: str, seed: int, n: int, media: Path | None, tasks) -> list[tuple[list, tuple]]:
    """(frames, size) per frame kind of the tasks run: one-token recall frames and four-token read-back frames."""
    maker = FrameMaker(split, seed, media)
    sets = []
    if "recall" in tasks:
        sets.append(([maker.frame(maker.rng.randrange(10), maker.rng.choice(TAGS)) for _ in range(n)], (FRAME, FRAME)))
    if "copy" in tasks:
        sets.append(([digit_copy.grid_frame(maker, maker.rng.choice(TAGS)) for _ in range(n)], digit_copy.SIZE))
    return sets


def _targets(frames) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, in reading order: its digit, and its tag (the first cell of a frame) or `len(TAGS)` (none)."""
    digits = torch.tensor([d for f in frames for d in f.digits])
    tags = torch.tensor([TAGS.index(f.tag) if c == 0 else len(TAGS) for f in frames for c in range(len(f.digits))])
    return digits, tags


def pretrain_reading(folder: Path, budget: Budget, media: Path | None, seed: int = 0, tasks=TASKS) -> dict:
    """Teach the vision tower to read frames: linear read-outs of every token's digit and tag, trained with the
    tower (the read-out heads are then dropped). Returns held-out read-out accuracies."""
    from ..model import InfiniteVLForConditionalGeneration
    from ..model.vision import encode
    from ..processing.processor import Processor

    model = InfiniteVLForConditionalGeneration.from_pretrained(folder)
    processor = Processor.from_pretrained(folder, model.config)
    tower = model.model.visual
    heads = torch.nn.Linear(model.config.vision.out_hidden_size, 10 + len(TAGS) + 1)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    train = _reading_sets("train", seed + 77, max(64, budget.streams), media, tasks)
    held = _reading_sets("eval", seed + 78, 400, media, tasks)

    def read(size, X):  # X: [frames, patches, dim] -> read-out logits per token, in reading order
        grid = torch.tensor([[1, size[0] // 14, size[1] // 14]]).repeat(len(X), 1)
        return heads(encode(tower, X.reshape(-1, X.shape[-1]), grid))

    data = []
    for frames, size in train:
        digits, tags = _targets(frames)
        data.append((size, _pixels(processor, frames, size), digits.view(len(frames), -1), tags.view(len(frames), -1)))
    tower.train()
    for _ in range(budget.read_steps):
        loss = torch.zeros(())
        for size, X, digits, tags in data:
            idx = torch.randint(0, len(X), (min(128, len(X)),), generator=gen)
            out = read(size, X[idx])
            loss = loss + torch.nn.functional.cross_entropy(out[:, :10], digits[idx].reshape(-1))
            loss = loss + torch.nn.functional.cross_entropy(out[:, 10:], tags[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.eval()
    result = {}
    with torch.no_grad():
        for frames, size in held:
            out = read(size, _pixels(processor, frames, size))
            digits, tags = _targets(frames)
            name = "recall frames" if size == (FRAME, FRAME) else "read-back frames"
            result[f"{name}: digit"] = round(float((out[:, :10].argmax(-1) == digits).float().mean()), 3)
            result[f"{name}: tag"] = round(float((out[:, 10:].argmax(-1) == tags).float().mean()), 3)
    model.save_pretrained(folder)
    return result


def train_teacher(root: Path, budget: Budget, data: dict, media: Path | None, tasks=TASKS) -> Path:
    """A Qwen2.5-VL teacher trained on the tasks; returns its transformers-format folder."""
    from ..training.convert import convert
    from ..training.teacher import new_qwen_teacher

    final = root / "teacher"
    if (final / "DONE").exists():
        return final
    init = new_qwen_teacher(
        root / "teacher-init",
        seed=0,
        layers=LAYERS,
        hidden=128,
        intermediate=256,
        heads=4,
        kv_heads=2,
        vision_depth=2,
        vision_hidden=64,
        spread=False,
        tokenizer=tokenizer(),
        max_pixels=FRAME * FRAME,
    )
    work = convert(init, root / "teacher-train" / "start", layer_types=[FULL] * LAYERS, window=None)
    t0 = time.perf_counter()
    reading = pretrain_reading(work, budget, media, tasks=tasks)
    log(f"vision read-out after pre-training: {reading} ({time.perf_counter() - t0:.0f} s)")
    current = work
    for k, (mix, steps) in enumerate(data["teacher"]):
        out = root / "teacher-train" / f"phase{k}-{mix.name}"
        current = run_stage("sft", current, out, mix, steps, budget, trainable="all")
    export_qwen(current, init, final)
    (final / "DONE").write_text(json.dumps({"reading": reading}))
    return final


def tokenizer():
    """The task tokenizer: merges from both tasks' phrases and the off-task reply (digits stay one token each)."""
    return task_tokenizer(tiny_config(), digit_copy.phrases() * 5 + [off_task.REPLY + "\n"] * 20)


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


def train_student(root: Path, variant: str, teacher: Path, budget: Budget, data: dict, tasks=TASKS) -> Path:
    """convert -> distill-layer -> distill-e2e -> sft -> sft-long (LoRA) -> merge; returns the final folder."""
    from ..training.convert import convert
    from ..training.lora import merge

    base = root / variant
    final = base / "final"
    if (final / "config.json").exists():
        return final
    layers = VARIANTS[variant](LAYERS)
    current = convert(teacher, base / "start", layer_types=layers, window=WINDOW)
    e2e_steps = budget.distill_e2e
    if LINEAR in layers:
        current = run_stage(
            "distill-layer",
            current,
            base / "distill-layer",
            data["main"],
            budget.distill_layer,
            budget,
            teacher=teacher,
        )
    else:  # no new layer to distill layer-wise: the same number of steps goes to the end-to-end stage
        e2e_steps += budget.distill_layer
    mixers = "[gdn,swa,mlp]"
    current = run_stage(
        "distill-e2e", current, base / "distill-e2e", data["main"], e2e_steps, budget, teacher=teacher, trainable=mixers
    )
    current = run_stage("sft", current, base / "sft", data["sft"], budget.sft, budget, trainable=mixers)
    adapters = run_stage(
        "sft-long", current, base / "sft-long", data["long"], budget.sft_long, budget, **{"lora.r": 8, "lora.alpha": 16}
    )
    merge(current, adapters, final)
    mark_tasks(final, tasks)
    return final


def mark_tasks(folder: Path, tasks) -> None:
    """Write the tasks the model was trained on, and the frame size of each, into its config.json (the engine gives
    its fixed reply to any prompt that is none of their questions; the demo reads the frame sizes)."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg[off_task.TASKS_KEY] = sorted(tasks)
    if "recall" in tasks:
        cfg["infinitevl_frame_size"] = [FRAME, FRAME]
    if "copy" in tasks:
        cfg["infinitevl_read_frame_size"] = list(digit_copy.SIZE)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# -- installing and reporting -----------------------------------------------------------------------------------------
def install_model(folder: Path, target: Path, note: str) -> Path:
    """Copy a trained student into the package, with the note that says what it knows."""
    from ..defaults import NOTE_KEY

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy(f, target / f.name)
    cfg = json.loads((target / "config.json").read_text())
    cfg[NOTE_KEY] = note
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
    media: Path | None = None,
    readme: Path | None = None,
    install: Path | None = None,
    command: str = "infinitevl miniature",
    tasks=TASKS,
) -> Report:
    """Train and compare every model on `tasks`; write the report (and the README block, and install the models,
    when asked). `install` is the default model's folder; SWA-only goes beside it as `swa-only-model`."""
    import os
    import platform

    tasks = tuple(t for t in TASKS if t in tasks)
    if not tasks:
        raise ValueError(f"no task to run (choose among {', '.join(TASKS)})")
    if readme is not None and "<!-- miniature:start -->" not in (readme.read_text() if readme.exists() else ""):
        raise ValueError(f"{readme}: no README with a <!-- miniature:start --> ... <!-- miniature:end --> block")
    budget = budget or Budget()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    resumed = (root / "teacher" / "DONE").exists()  # finished stages of an interrupted run are reused
    data = datasets(root, budget, media, tasks)
    log(f"data ready ({time.perf_counter() - t0:.0f} s)")
    teacher = train_teacher(root, budget, data, media, tasks)
    log(f"teacher ready ({time.perf_counter() - t0:.0f} s)")
    students = {v: train_student(root, v, teacher, budget, data, tasks) for v in VARIANTS}
    train_minutes = (time.perf_counter() - t0) / 60
    log(f"students ready ({time.perf_counter() - t0:.0f} s)")
    from ..training.convert import convert

    teacher_ivl = convert(teacher, root / "teacher-eval", layer_types=[FULL] * LAYERS, window=None)
    mark_tasks(teacher_ivl, tasks)
    models = {"teacher (full attention)": (teacher_ivl, True)}
    models |= {NAMES.get(v, v): (folder, False) for v, folder in students.items()}
    rows = {}
    for name, (folder, full) in models.items():
        rows[name] = []
        if "recall" in tasks:
            rows[name] += comparison.evaluate_model(
                folder, budget.eval_lengths, budget.eval_streams, media, full_attention=full
            )
        if "copy" in tasks:
            rows[name] += comparison.evaluate_model(
                folder, budget.copy_eval_lengths, budget.copy_eval_streams, media, full_attention=full, task="copy"
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
    }
    report = Report(summary, meta, rows)
    report.save(root / "report.json")
    comparison.plot(summary, root / "plots")
    if readme is not None:
        figure_dir = readme.parent / "miniature"  # the page is docs/miniature.md, its figure docs/miniature/
        figure_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "plots" / "miniature.png", figure_dir / "miniature.png")
        table = comparison.markdown(summary, meta)
        comparison.write_readme(readme, table + "\n\n![miniature](miniature/miniature.png)")
        (figure_dir / "results.md").write_text(comparison.results_page(summary, meta, table))
    if install is not None:
        from ..defaults import BUNDLED_NOTE, SWA_ONLY_NOTE

        install_model(students["hybrid"], install, BUNDLED_NOTE)
        install_model(students["swa-only"], install.parent / "swa-only-model", SWA_ONLY_NOTE)
        log(f"installed the hybrid as the default model at {install}, SWA-only beside it")
    return report
