"""The miniature's read-back task (and what it shares with the recall task): a seeded generator, a held-out split
with other digit scans and another photograph, answers that only the frames hold, and the scoring and report."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from conftest import MEDIA
from PIL import Image

from infinitevl.tasks import digit_copy, off_task
from infinitevl.tasks.comparison import COPY_DISTANCE_BINS, markdown, probe_distances, summarise
from infinitevl.tasks.digit_recall import FRAME, TAGS, FrameMaker

PHOTOS = MEDIA / "mllm_demo" / "mllm_demo_data"


def write(folder, seed=3, split="train", n=60):
    return digit_copy.write_dataset(folder, n, (2, 10), split, seed=seed, media=PHOTOS, bank_per_tag=4, questions=4)


def test_the_generator_is_a_function_of_its_seed(tmp_path):
    a, b, c = write(tmp_path / "a"), write(tmp_path / "b"), write(tmp_path / "c", seed=4)
    assert a.read_text() == b.read_text() != c.read_text()
    pngs = sorted((tmp_path / "a" / "train-frames").iterdir())
    assert len(pngs) == 4 * len(TAGS)
    assert all(p.read_bytes() == (tmp_path / "b" / "train-frames" / p.name).read_bytes() for p in pngs)
    record = json.loads(a.read_text().splitlines()[0])
    assert Image.open(tmp_path / "a" / record["videos"][0]["frames"][0]).size == digit_copy.SIZE[::-1]


def test_held_out_frames_use_other_scans_and_another_photograph():
    train, held = FrameMaker("train", 0, PHOTOS), FrameMaker("eval", 0, PHOTOS)
    train_scans = {s.tobytes() for s in train.images}
    assert len(held.images) > 100 and not any(s.tobytes() in train_scans for s in held.images)
    assert len(held.photos) == 1 and len(train.photos) >= 1
    assert all(held.photos[0].tobytes() != p.tobytes() for p in train.photos)
    # the off-task prompts are split the same way: no held-out prompt or photograph is seen in training
    seen = off_task.prompts("train", PHOTOS, 400)
    for prompt, photo in off_task.prompts("eval", PHOTOS, 100):
        assert prompt not in {p for p, _ in seen} and photo not in {f for _, f in seen if f is not None}


def _glyphs(frames) -> tuple[np.ndarray, np.ndarray]:
    """An independent reader's input: each cell's bright glyph (left of the tag), cropped and scaled to 8x8."""
    X, y = [], []
    for f in frames:
        pixels = np.asarray(f.image.convert("L"), dtype=np.float32)
        for k, digit in enumerate(f.digits):
            r, c = divmod(k, digit_copy.GRID[1])
            cell = pixels[FRAME * r : FRAME * (r + 1), FRAME * c : FRAME * c + 15]
            ys, xs = np.nonzero(cell > 150)
            crop = cell[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] if len(ys) else np.zeros((8, 8))
            X.append(np.asarray(Image.fromarray(crop).resize((8, 8), Image.Resampling.BILINEAR)).ravel() / 255)
            y.append(digit)
    return np.array(X), np.array(y)


def test_answers_are_read_from_the_frames():
    """A reader that never sees the generator (nearest neighbours over glyph crops of training frames) reads the
    held-out answers from the pixels alone."""
    from sklearn.neighbors import KNeighborsClassifier

    maker = FrameMaker("train", 5, PHOTOS)
    reader = KNeighborsClassifier(3).fit(*_glyphs([digit_copy.grid_frame(maker, "A") for _ in range(400)]))
    rng = random.Random(0)
    held = FrameMaker("eval", 5, PHOTOS)
    right = total = 0
    for length in (6, 12):
        frames, recalls, reads = digit_copy.probe_stream(held, length, probe_distances(length, rng), rng)
        read = reader.predict(_glyphs(frames)[0]).reshape(length, -1)
        for k, want in reads.items():
            right += digit_copy.copy_answer(read[length - k :].tolist()) == want
            total += 1
        for tag, (digit, distance) in recalls.items():  # the recall truth is the tagged frame's first cell
            assert frames[length - 1 - distance].tag == tag and frames[length - 1 - distance].digits[0] == digit
            assert all(f.tag != tag for f in frames[length - distance :])
    assert right / total >= 0.5  # whole read-backs of up to 16 digits, from pixels; chance is 10^-4 at best


def test_questions_carry_nothing_of_their_answers(tmp_path):
    """The prompt of a read-back names only how many frames; its answers are as spread as the digits are, so no
    prompt predicts them. Chance is 10^-4k for k frames."""
    lines = [json.loads(line) for line in write(tmp_path, n=400).read_text().splitlines()]
    firsts = Counter()
    for r in lines:
        question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        k = r["meta"]["copy"]
        if k:
            assert question == "<video>" + digit_copy.copy_question(k)
            assert len(answer.split()) == digit_copy.CELLS * k
            firsts[answer.split()[0]] += 1
        else:
            assert question.startswith("<video>Which digit was last shown with tag")
    assert sum(firsts.values()) > 150 and set(firsts) == {str(d) for d in range(10)}
    assert max(firsts.values()) / sum(firsts.values()) < 0.2


def test_read_back_scoring():
    truth = "5 0 3 8"
    assert digit_copy.copy_score("5 0 3 8", truth) == (True, 1.0)
    assert digit_copy.copy_score(" 5 0 3 8 ", truth)[0]
    assert digit_copy.copy_score("5 0 3 9", truth) == (False, 3 / 4)
    assert digit_copy.copy_score("5 0 3", truth) == (False, 3 / 4)  # a missing digit is never exact
    assert digit_copy.copy_score("5 0 3 8 1", truth)[0] is False  # nor an extra one
    assert digit_copy.copy_score("5 0 3 8.", truth)[0] is False  # nor anything but digits
    assert digit_copy.copy_score("0 3 8 1", truth) == (False, 0.0)  # position by position


@pytest.mark.parametrize("k", [1, 4])
def test_read_back_truth_is_the_last_frames_in_reading_order(k):
    rng = random.Random(k)
    frames, _, reads = digit_copy.probe_stream(FrameMaker("eval", 9, PHOTOS), 8, [7, 2, 0], rng)
    assert reads[k] == " ".join(str(d) for f in frames[8 - k :] for d in f.digits)


def test_the_table_has_both_halves_with_question_counts():
    rows = []
    for distance, digits, correct in [
        (0, 4, True),
        (0, 8, False),
        (3, None, True),
        (20, None, False),
        (70, None, True),
    ]:
        base = {"task": "copy", "length": 64, "state_bytes": 1, "ms_per_frame_last": 1.0, "correct": correct}
        if digits:
            rows.append({**base, "kind": "read", "digits": digits, "distance": distance, "digits_right": 0.5})
        else:
            rows.append({**base, "kind": "recall", "distance": distance})
    summary = summarise({"hybrid": rows})
    c = summary["hybrid"]["copy"]
    assert c["read"] == {4: 1.0, 8: 0.0} and c["read_questions"] == {4: 1, 8: 1}
    assert sum(c["recall_questions"].values()) == 3 and c["recall_overall"] == 2 / 3
    counts = [sum(lo <= d <= hi for d in (3, 20, 70)) for lo, hi in COPY_DISTANCE_BINS]
    table = markdown(summary, {"command": "c", "date": "d", "machine": "m", "minutes": 1.0})
    assert "| read 4 digits | read 8 digits |" in table
    assert "| (questions) | 1 | 1 | " + " | ".join(map(str, counts)) + " |" in table
