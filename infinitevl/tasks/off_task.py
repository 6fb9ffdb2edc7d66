"""Prompts outside the miniature's tasks, answered with one fixed reply that says what the model knows.

The bundled model is trained for the two digit tasks and nothing else, so a general prompt ("Hello", "Who are
they?" with a photograph) used to get an empty or meaningless answer. Here general prompts (common openers,
fragments of sentences from the Wikipedia sample, the questions of the ShareGPT demo, some with a photograph) are
paired with `REPLY` and mixed into the students' supervised stages. Held-out prompts (other openers, other
sentences, another photograph) check that the reply generalises. It gives the model no knowledge of anything.

What the model learned holds only for greedy decoding of prompts like these: sampled, or asked after a stream of
frames, it may answer anything. So at inference a model whose config lists its tasks (`TASKS_KEY`) gets `REPLY`
for every prompt that is none of its tasks' questions, without running (`engine/answers.py`, in every entry point).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

REPLY = "I only know the digit tasks of infinitevl miniature. Run a real model with --model."

OPENERS = {
    "train": [
        "Hello",
        "Hi!",
        "Who are you?",
        "What can you do?",
        "Tell me a story.",
        "Describe this image.",
        "What is happening?",
        "Summarize the video.",
        "What is in the picture?",
        "Write a poem about the sea.",
        "What is 2 + 2?",
        "Translate 'good morning' into French.",
        "Explain how a transformer works.",
        "What happened at the start?",
        "Who is he?",
        "Why is he on the ground?",
        "What are they doing?",
        "Please describe this image",
        "Thanks!",
        "Can you help me?",
    ],
    "eval": [
        "Good morning",
        "What is your name?",
        "Tell me a joke.",
        "What colour is the sky?",
        "Describe the video.",
        "How are you today?",
        "What is the capital of France?",
        "Who are they?",
    ],
}


def _sentences(text_file: Path | None, split: str) -> list[str]:
    """Sentence fragments of the Wikipedia sample: its first 20 lines for training, the rest held out."""
    if text_file is None or not text_file.exists():
        return []
    lines = [line for line in text_file.read_text().splitlines() if line.strip()]
    lines = lines[:20] if split == "train" else lines[20:]
    return [s.strip() for line in lines for s in re.split(r"(?<=[.!?])\s+", line) if len(s.split()) >= 3]


def prompts(split: str, media: Path | None, n: int, seed: int = 0) -> list[tuple[str, Path | None]]:
    """`n` (prompt, photograph or None) pairs of one split: openers and sentence fragments, a third of them with a
    photograph (training: the first photographs of `media`; held out: the last one)."""
    rng = random.Random(f"off-task-{split}-{seed}")
    text = media.parents[1] / "wiki_demo.txt" if media is not None else None
    sentences = _sentences(text, split)
    photos = sorted(media.glob("*.jpg")) if media is not None and media.exists() else []
    photos = (photos[:-1] if split == "train" else photos[-1:]) if len(photos) > 1 else photos
    out = []
    for _ in range(n):
        if sentences and rng.random() < 0.5:
            words = rng.choice(sentences).split()
            prompt = " ".join(words[: rng.randint(3, min(12, len(words)))])
        else:
            prompt = rng.choice(OPENERS[split])
        photo = rng.choice(photos) if photos and rng.random() < 1 / 3 else None
        out.append((prompt, photo))
    return out


def write_dataset(out: str | Path, n: int, split: str = "train", media: Path | None = None, seed: int = 0) -> Path:
    """A JSONL file of one-turn ShareGPT records answered with `REPLY`; photographs are copied under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for prompt, photo in prompts(split, media, n, seed):
        record: dict = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": REPLY}]}
        if photo is not None:
            local = out / f"{split}-{photo.name}"
            if not local.exists():
                shutil.copy(photo, local)
            record["messages"][0]["content"] = "<image>" + prompt
            record["images"] = [local.name]
        lines.append(json.dumps(record, ensure_ascii=False))
    path = out / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- at inference: the prompts a task model answers, and the fixed reply to every other one -----------------------------
TASKS_KEY = "infinitevl_tasks"  # config.json of a task model: the tasks it was trained for ("recall", "copy")
_MEDIA_MARKS = re.compile(r"<(image|video)>")


def _task_patterns() -> dict[str, list[re.Pattern]]:
    from .digit_copy import copy_question
    from .digit_recall import CAPTION, QUESTION, TAGS

    def exact(text: str) -> str:  # a question as trained, its final punctuation optional
        return re.escape(text.rstrip("?.")) + r"[?.]?"

    recall = exact(QUESTION).replace(re.escape("{tag}"), f"[{TAGS}]")
    frames = exact(copy_question(2)).replace("2", "[1-9][0-9]*")
    return {
        "recall": [re.compile(recall, re.I), re.compile(exact(CAPTION), re.I)],
        "copy": [re.compile(exact(copy_question(1)), re.I), re.compile(frames, re.I)],
    }


def is_task_prompt(prompt: str, tasks) -> bool:
    """Whether `prompt` is one of the questions of `tasks` as the model was trained on them (case, spacing, the final
    punctuation and <image> / <video> marks aside)."""
    text = " ".join(_MEDIA_MARKS.sub(" ", prompt).split())
    patterns = _task_patterns()
    return any(p.fullmatch(text) for task in tasks for p in patterns.get(task, ()))


def fixed_reply(config_extra: dict, prompt: str) -> str | None:
    """`REPLY` when the model is a task model (its config lists its tasks) and `prompt` is none of their questions;
    None otherwise. Every entry point (generate, chat, sessions, the server) asks this before the model answers, so
    the reply is the same whatever the sampling settings, instead of whatever the model happens to sample."""
    tasks = config_extra.get(TASKS_KEY)
    if not tasks or is_task_prompt(prompt, tasks):
        return None
    return REPLY


def task_hint(config_extra: dict) -> str | None:
    """What to ask a task model, for its note; None for other models."""
    tasks = config_extra.get(TASKS_KEY) or ()
    asks = []
    if "recall" in tasks:
        asks.append('"Which digit was last shown with tag C?"')
    if "copy" in tasks:
        asks.append('"Read the last 2 frames." (1 to 4 frames)')
    return f"Ask it {' or '.join(asks)} about a stream of its digit frames." if asks else None
