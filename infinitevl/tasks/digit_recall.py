"""The miniature task: remember what was shown, far back in a stream of frames.

Each 28x28 frame (one token) shows a handwritten digit (scikit-learn's `load_digits`: real 8x8 scans, upscaled) and a
tag letter A-H (Pillow's bundled TrueType font) on a crop of a real photograph. Frames arrive one per second. A
question asks which digit was last shown with a tag; the frame that answers it lies `distance` frames back, with
other tags (never that one) in between, so answering needs both fine detail (reading the digit) and long memory
(the tag may have been seen hundreds of tokens ago, far beyond a sliding window).

Everything is a deterministic function of a seed. Training and held-out streams use disjoint digit scans and
different photographs, so a held-out answer can only be right if the digit was actually read.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TAGS = "ABCDEFGH"
FRAME = 28
INTERVAL = 1.0  # seconds between frames
QUESTION = "Which digit was last shown with tag {tag}?"
CAPTION = "Which digits and tags were shown?"


def caption(frames) -> str:
    """The reading task's answer: every frame's digit and tag, in order ("7 C, 3 A")."""
    return ", ".join(f"{f[1]} {f[0]}" for f in frames)


@dataclass
class Frame:
    digit: int
    tag: str
    image: Image.Image

    @property
    def digits(self) -> list[int]:  # every digit shown, in reading order (here the only one)
        return [self.digit]


@dataclass
class Stream:
    frames: list[Frame]
    tag: str  # the tag asked about
    answer: str  # the digit last shown with it
    distance: int  # frames between the answering frame and the end of the stream (0: the last frame)

    @property
    def question(self) -> str:
        return QUESTION.format(tag=self.tag)


def task_tokenizer(config, extra_text: list[str] = ()):
    """A byte-level BPE whose merges are learned from the task's own phrases (and `extra_text`), with the
    special tokens at `config`'s ids: questions become ~10 tokens instead of ~40 bytes."""
    from ..processing.tokenizer import tokenizer_for

    phrases = ["system\nYou are a helpful assistant.\n", "user\n", "assistant\n"] * 50
    phrases += [QUESTION.format(tag=t) + f"\n{d}\n" for t in TAGS for d in range(10)] * 5
    phrases += [CAPTION + "\n" + ", ".join(f"{d} {t}" for d in range(10)) + "\n" for t in TAGS] * 5
    return tokenizer_for(config, corpus=phrases + list(extra_text))


def _photos(media: Path | None) -> list[Image.Image]:
    """The background photographs: the package's own unless a folder is given. A folder without photographs is an
    error naming it: other backgrounds would make other streams, and the demo's verdicts would silently change."""
    from ..defaults import PHOTOS

    folder = Path(media) if media is not None else PHOTOS
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of photographs")
    found = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))]
    if not found:
        raise FileNotFoundError(f"{folder}: no photographs (*.jpg) in it")
    return found


class FrameMaker:
    """Renders frames from one split of the digit scans and the photographs."""

    def __init__(self, split: str, seed: int = 0, media: Path | None = None):
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(1234).permutation(len(digits.target))
        cut = int(0.75 * len(order))
        idx = order[:cut] if split == "train" else order[cut:]
        self.images, self.targets = digits.images[idx], digits.target[idx]
        photos = _photos(media)
        # photographs split too: held-out frames use the last one (when there are several)
        self.photos = photos[:-1] if split == "train" and len(photos) > 1 else photos[-1:]
        self.rng = random.Random(f"{split}-{seed}")
        self.font = ImageFont.load_default(size=14)

    def frame(self, digit: int, tag: str) -> Frame:
        """The digit scan in the left half, the tag in the right half: one merged 28x28 token holds both."""
        return Frame(digit, tag, self.render([digit], tag, rows=1, cols=1))

    def render(self, digits: list[int], tag: str, rows: int, cols: int) -> Image.Image:
        """A (rows x 28) x (cols x 28) frame on one dimmed photograph crop: one digit scan per 28x28 cell (one
        merged token each), in reading order, in the cell's left half; the tag in the first cell's right half."""
        rng = self.rng
        scans = []
        for digit in digits:
            choices = np.flatnonzero(self.targets == digit)
            scans.append(self.images[choices[rng.randrange(len(choices))]])
        height, width = rows * FRAME, cols * FRAME
        photo = self.photos[rng.randrange(len(self.photos))]
        scale = rng.uniform(0.15, 0.4)
        w, h = max(width, int(photo.width * scale)), max(height, int(photo.height * scale))
        bg = photo.resize((w, h), Image.Resampling.BILINEAR)
        x, y = rng.randrange(w - width + 1), rng.randrange(h - height + 1)
        frame = Image.eval(bg.crop((x, y, x + width, y + height)), lambda v: v // 3)  # dimmed photograph
        for k, scan in enumerate(scans):
            top, left = FRAME * (k // cols), FRAME * (k % cols)
            glyph = Image.fromarray((scan / 16 * 255).astype(np.uint8)).resize((14, 14), Image.Resampling.BILINEAR)
            frame.paste((255, 255, 255), (left + rng.randint(0, 1), top + rng.randint(5, 13)), glyph)
        draw = ImageDraw.Draw(frame)
        draw.text((rng.randint(15, 17), rng.randint(3, 9)), tag, font=self.font, fill=(255, 215, 0))
        return frame

    def stream(self, n_frames: int, distance: int) -> Stream:
        """`n_frames` frames; the asked tag's last appearance is `distance` frames from the end."""
        if not 0 <= distance < n_frames:
            raise ValueError(f"distance {distance} outside a stream of {n_frames} frames")
        rng = self.rng
        tag = rng.choice(TAGS)
        others = [t for t in TAGS if t != tag]
        answer_at = n_frames - 1 - distance
        tags = [rng.choice(TAGS) if i < answer_at else rng.choice(others) for i in range(n_frames)]
        tags[answer_at] = tag
        frames = [self.frame(rng.randrange(10), t) for t in tags]
        return Stream(frames, tag, str(frames[answer_at].digit), distance)


def stream_frames(stream: Stream) -> list[tuple[Image.Image, float]]:
    """(frame, timestamp) pairs, as a live source would deliver them."""
    return [(f.image, i * INTERVAL) for i, f in enumerate(stream.frames)]


def write_bank(maker: FrameMaker, out: Path, split: str, per_tag: int, make) -> dict[str, list[tuple[str, list]]]:
    """Render `per_tag` frames for every tag with `make(tag)` into `out/<split>-frames/`; returns
    {tag: [(path relative to out, the frame's digits), ...]}: streams are drawn from this bank."""
    bank_dir = out / f"{split}-frames"
    bank_dir.mkdir(parents=True, exist_ok=True)
    bank: dict[str, list[tuple[str, list]]] = {}
    for tag in TAGS:
        for k in range(per_tag):
            f = make(tag)
            rel = f"{bank_dir.name}/{tag}{k:04d}.png"
            f.image.save(out / rel)
            bank.setdefault(tag, []).append((rel, f.digits))
    return bank


def recall_tags(rng: random.Random, n: int) -> tuple[list[str], str, int]:
    """The tags of an `n`-frame training stream and its first question: (tags, asked tag, distance), the distance
    uniform over the stream and the asked tag absent after its answering frame."""
    distance = rng.randrange(n)
    tag = rng.choice(TAGS)
    others = [t for t in TAGS if t != tag]
    answer_at = n - 1 - distance
    return [tag if i == answer_at else rng.choice(TAGS if i < answer_at else others) for i in range(n)], tag, distance


def write_dataset(
    out: str | Path,
    n_streams: int,
    frames: tuple[int, int],
    split: str = "train",
    seed: int = 0,
    media: Path | None = None,
    bank_per_tag: int = 200,
    questions: int = 1,
    task: str = "recall",
) -> Path:
    """A JSONL file of ShareGPT records (the live frames as a `{"frames": [...], "interval": 1}` video) over a bank
    of rendered frames written once under `out/<split>-frames/`. Stream lengths are uniform in `frames`; the first
    question's distance is uniform over the stream. With `questions` > 1, further turns ask about other tags present
    (denser supervision for training; a session asks each question from its own branch instead). `task="caption"`
    asks instead for every frame's digit and tag in order: the reading warm-up of the teacher."""
    out = Path(out)
    maker = FrameMaker(split, seed, media)
    bank = write_bank(maker, out, split, bank_per_tag, lambda tag: maker.frame(maker.rng.randrange(10), tag))
    rng = random.Random(f"streams-{split}-{seed}")
    lines = []
    for _ in range(n_streams):
        n = rng.randint(*frames)
        tags, tag, distance = recall_tags(rng, n)
        picks = [rng.choice(bank[t]) for t in tags]
        last = {t: i for i, t in enumerate(tags)}
        asked = [tag] + rng.sample([t for t in last if t != tag], min(questions - 1, len(last) - 1))
        messages = []
        if task == "caption":  # the reading warm-up: name every frame
            asked = []
            messages = [
                {"role": "user", "content": "<video>" + CAPTION},
                {"role": "assistant", "content": caption([(t, d[0]) for (_, d), t in zip(picks, tags)])},
            ]
        for k, t in enumerate(asked):
            messages += [
                {"role": "user", "content": ("<video>" if k == 0 else "") + QUESTION.format(tag=t)},
                {"role": "assistant", "content": str(picks[last[t]][1][0])},
            ]
        lines.append(
            json.dumps(
                {
                    "messages": messages,
                    "videos": [{"frames": [p for p, _ in picks], "interval": INTERVAL, "size": [FRAME, FRAME]}],
                    "meta": {
                        "distance": distance,
                        "frames": n,
                        "tag": tag,
                        "distances": [n - 1 - last[t] for t in asked],
                        "task": task,
                    },
                }
            )
        )
    path = out / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def probe_tags(length: int, distances: list[int], rng: random.Random) -> tuple[list[str], list[str]]:
    """The tags of a held-out stream in which some tags ("probes") last appear exactly `distances` frames before
    the end and the remaining tags fill everything else: (tags, probes)."""
    probes = rng.sample(TAGS, len(distances))
    fillers = [t for t in TAGS if t not in probes]
    tags = [rng.choice(fillers) for _ in range(length)]
    for tag, d in zip(probes, distances):
        tags[length - 1 - d] = tag
    return tags, probes


def last_shown(frames: list[Frame]) -> dict[str, tuple[int, int]]:
    """{tag: (digit, distance)} for every tag in a stream: the digit of its last frame and how far back it lies."""
    last = {f.tag: i for i, f in enumerate(frames)}
    return {t: (frames[i].digit, len(frames) - 1 - i) for t, i in last.items()}


def probe_stream(maker: FrameMaker, length: int, distances: list[int], rng: random.Random) -> tuple[Stream, dict]:
    """A held-out stream laid out by `probe_tags`; returns the stream and {tag: (digit, distance)} for every tag
    that appears (the probes and the recent ones)."""
    tags, probes = probe_tags(length, distances, rng)
    frames = [maker.frame(maker.rng.randrange(10), t) for t in tags]
    truth = last_shown(frames)
    first = probes[0]
    return Stream(frames, first, str(truth[first][0]), truth[first][1]), truth


def demo_stream(frames: int, seed: int, media: Path | None) -> tuple[Stream, dict]:
    """The held-out stream and questions of `infinitevl demo` for a seed: far probes at a random distance near the
    start, half and a quarter of the stream and 40 frames back, and one a frame back."""
    rng = random.Random(seed)
    far = sorted({frames - 1 - rng.randrange(frames // 8), frames // 2, frames // 4, 40})
    return probe_stream(FrameMaker("eval", seed, media), frames, [d for d in far if d < frames] + [1], rng)


@dataclass
class Results:
    """Answers to held-out streams, grouped for the report."""

    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)

    def accuracy(self, **where) -> float:
        hits = [r["correct"] for r in self.rows if all(r[k] == v for k, v in where.items())]
        return sum(hits) / len(hits) if hits else float("nan")
