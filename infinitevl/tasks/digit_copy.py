"""The second miniature task: read back exact detail from the last frames, and recall one digit from far back.

Each 56x56 frame is four merged tokens: 2x2 cells of 28x28 pixels on one crop of a real photograph, each cell
showing a handwritten digit scan (the scans, photographs, font and renderer of `digit_recall`), the first cell also
the frame's tag letter A-H. Frames arrive one per second. Two kinds of question follow a stream, and each half of
the paper's claim is scored on its own questions:

- exact detail, "Read the last 3 frames." -> "5 0 3 8 1 1 7 2 9 9 0 4": every digit of the last k frames (k = 1 to
  4), oldest frame first, each frame in reading order. The answer is 4k digits held in 4k different tokens, all of
  them within the sliding window, and only an exact read-back of the whole sequence counts (chance 10^-4k).
- far recall, "Which digit was last shown with tag C?" -> the first cell's digit of the last frame with that tag,
  which may lie hundreds of frames back, far beyond the window (chance 0.10), the question of `digit_recall`.

Everything is a deterministic function of a seed. Training and held-out streams use disjoint digit scans and
different photographs, so a held-out answer can only be right if the digits were read from the frames.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .digit_recall import FRAME, INTERVAL, QUESTION, FrameMaker, probe_tags, recall_tags, write_bank

GRID = (2, 2)  # cells (tokens) per frame: rows, columns
CELLS = GRID[0] * GRID[1]
SIZE = (GRID[0] * FRAME, GRID[1] * FRAME)  # frame size in pixels (h, w)
MAX_COPY = 4  # frames a read-back question asks for at most (16 digits)


def copy_question(k: int) -> str:
    return "Read the last frame." if k == 1 else f"Read the last {k} frames."


def copy_answer(digits: list[list[int]]) -> str:
    """The read-back of some frames' digits: one digit per token, space-separated ("5 0 3 8 1 1 7 2")."""
    return " ".join(str(d) for frame in digits for d in frame)


def copy_score(answer: str, truth: str) -> tuple[bool, float]:
    """(exact, fraction of digits right by position) for a read-back answer. Exact means the answer holds exactly
    the truth's digits, in order, and nothing but digits and spaces."""
    want = truth.split()
    got = re.findall(r"\d", answer)
    exact = got == want and not re.sub(r"[\d\s]", "", answer)
    return exact, sum(a == b for a, b in zip(got, want)) / len(want)


def phrases() -> list[str]:
    """The task's questions and answers, for the tokenizer's merges (digits stay one token each)."""
    return [
        copy_question(k) + "\n" + " ".join(str((d + i) % 10) for i in range(CELLS * k)) + "\n"
        for k in range(1, MAX_COPY + 1)
        for d in range(10)
    ]


@dataclass
class GridFrame:
    digits: list[int]  # in reading order, one per cell (token)
    tag: str
    image: Image.Image

    @property
    def digit(self) -> int:  # the digit a recall question asks for: the one sharing the tag's cell
        return self.digits[0]


def grid_frame(maker: FrameMaker, tag: str) -> GridFrame:
    """A frame with random digits and the given tag, from `maker`'s split and seed."""
    digits = [maker.rng.randrange(10) for _ in range(CELLS)]
    return GridFrame(digits, tag, maker.render(digits, tag, *GRID))


def write_dataset(
    out: str | Path,
    n_streams: int,
    frames: tuple[int, int],
    split: str = "train",
    seed: int = 0,
    media: Path | None = None,
    bank_per_tag: int = 200,
    questions: int = 1,
) -> Path:
    """A JSONL file of ShareGPT records over a bank of rendered frames under `out/<split>-frames/`, in the format of
    `digit_recall.write_dataset`. The first question of a stream is, with equal odds, a read-back of its last k
    frames (k uniform in 1..min(4, frames)) or a recall question with its distance uniform over the stream; further
    turns (`questions` > 1) ask recall questions about other tags present. A read-back is only ever the first turn,
    as in a session, where it directly follows the frames."""
    out = Path(out)
    maker = FrameMaker(split, seed, media)
    bank = write_bank(maker, out, split, bank_per_tag, lambda tag: grid_frame(maker, tag))
    rng = random.Random(f"copy-streams-{split}-{seed}")
    lines = []
    for _ in range(n_streams):
        n = rng.randint(*frames)
        tags, tag, _ = recall_tags(rng, n)
        picks = [rng.choice(bank[t]) for t in tags]
        last = {t: i for i, t in enumerate(tags)}
        k = rng.randint(1, min(MAX_COPY, n)) if rng.random() < 0.5 else 0
        if k:  # a read-back first, then recall questions about any tags present
            asked = rng.sample(sorted(last), min(questions - 1, len(last)))
        else:
            asked = [tag] + rng.sample([t for t in sorted(last) if t != tag], min(questions - 1, len(last) - 1))
        messages = []
        if k:
            messages += [
                {"role": "user", "content": "<video>" + copy_question(k)},
                {"role": "assistant", "content": copy_answer([d for _, d in picks[n - k :]])},
            ]
        for t in asked:
            messages += [
                {"role": "user", "content": ("<video>" if not messages else "") + QUESTION.format(tag=t)},
                {"role": "assistant", "content": str(picks[last[t]][1][0])},
            ]
        lines.append(
            json.dumps(
                {
                    "messages": messages,
                    "videos": [{"frames": [p for p, _ in picks], "interval": INTERVAL, "size": list(SIZE)}],
                    "meta": {"frames": n, "copy": k, "distances": [n - 1 - last[t] for t in asked], "task": "copy"},
                }
            )
        )
    path = out / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def probe_stream(
    maker: FrameMaker, length: int, distances: list[int], rng: random.Random
) -> tuple[list[GridFrame], dict[str, tuple[int, int]], dict[int, str]]:
    """A held-out stream laid out by `digit_recall.probe_tags`; returns its frames, the recall truths
    {tag: (digit, distance)} for every tag that appears, and the read-back truths {k: answer} for k = 1..4."""
    from .digit_recall import last_shown

    tags, _ = probe_tags(length, distances, rng)
    frames = [grid_frame(maker, t) for t in tags]
    reads = {k: copy_answer([f.digits for f in frames[length - k :]]) for k in range(1, min(MAX_COPY, length) + 1)}
    return frames, last_shown(frames), reads
