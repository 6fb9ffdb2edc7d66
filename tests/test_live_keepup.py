"""Keeping up with a live source faster than the model: `stream --realtime` takes the newest frame due and counts
the skipped ones (a fake clock and a slow consumer), and `stream --pair-frames` end to end."""

from __future__ import annotations

import json
import re

import pytest
from conftest import MEDIA
from PIL import Image
from test_cli import run

from infinitevl.cli.stream import Paced
from infinitevl.defaults import make_untrained_model

DATA = MEDIA / "mllm_demo" / "mllm_demo_data"


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def consume(interval: float, work: float, n: int):
    """Run `n` frames `interval` s apart through `Paced` with a consumer that takes `work` s per frame; returns the
    pacer, the frames taken and, per frame taken, the clock when it was handed over."""
    clock = FakeClock()
    source = [(f"frame{i}", i * interval) for i in range(n)]
    paced = Paced(source, clock=clock, sleep=clock.sleep)
    taken, at = [], []
    for frame, t in paced:
        taken.append((frame, t))
        at.append(clock.now)
        clock.now += work
    return paced, source, taken, at


@pytest.mark.parametrize("work", [0.3, 1.2, 2.6])
def test_a_slow_consumer_gets_the_newest_frame_due_evenly_spaced(work):
    interval, n = 0.5, 41
    paced, source, taken, at = consume(interval, work, n)
    assert paced.kept == len(taken) and paced.kept + paced.skipped == n
    times = [t for _, t in source]
    for (_, t), now in zip(taken[:-1], at[:-1]):
        assert t <= now + 1e-9  # it was due
        later = times[times.index(t) + 1]
        assert later > now  # and no newer frame was
    gaps = [b[1] - a[1] for a, b in zip(taken[:-2], taken[1:-1])]
    # evenly spaced in stream time: every gap is the consumer's period to within one source interval
    assert max(gaps) - min(gaps) <= interval + 1e-9
    assert all(max(work, interval) - interval < g <= max(work, interval) + interval + 1e-9 for g in gaps)
    if work <= interval:
        assert paced.skipped == 0 and taken == source
    else:
        assert paced.skipped > 0
    assert f"({paced.skipped} skipped)" in paced.rate()


def test_a_fast_consumer_is_paced_by_the_timestamps():
    paced, source, taken, at = consume(0.5, 0.0, 9)
    assert taken == source and paced.skipped == 0
    assert at == pytest.approx([t for _, t in source])  # each frame handed over at its time, not before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_untrained_model(tmp_path_factory.mktemp("models") / "tiny")


def test_stream_realtime_skips_what_the_model_cannot_keep_up_with(model_dir, tmp_path):
    """A folder of frames played at 1000 frames/s: a millisecond per frame, which no model here keeps up with (a
    video file's own frame rate would cap the source at 30 frames/s, which the tiny model can match)."""
    n = 40
    folder = tmp_path / "frames"
    folder.mkdir()
    photo = Image.open(DATA / "1.jpg").convert("RGB").resize((64, 64))
    for i in range(n):
        photo.save(folder / f"{i:03d}.png")
    proc = run(
        "stream", folder, "--model", model_dir, "--size", "56", "--fps", "1000", "--realtime", "--no-progress",
    )  # fmt: skip
    kept = int(re.search(r"done: (\d+) frames?", proc.stdout).group(1))
    match = re.search(r"realtime: keeping \S+ of \S+ frames/s \((\d+) skipped\)", proc.stdout)
    assert match, proc.stdout
    assert kept + int(match.group(1)) == n and 0 < kept < n  # a source at 1000 frames/s outruns the model


def test_stream_pair_frames_end_to_end(model_dir, tmp_path):
    snap = tmp_path / "paired.safetensors"
    proc = run(
        "stream", DATA / "3.mp4", "--model", model_dir, "--size", "56", "--fps", "2", "--max-frames", "5",
        "--pair-frames", "--no-progress", "--save-state", snap, "--final", "What happens?", "--max-new-tokens", "3",
    )  # fmt: skip
    assert "in pairs" in proc.stderr and "done: 5 frames" in proc.stdout  # the odd last frame is not lost
    info = json.loads(run("state", snap, "--json").stdout)
    assert info["pair_frames"] and info["held_frames"] == [] and info["counters"]["frames"] == 5
    assert "live frames in pairs, 2 per prefill; no frame held" in run("state", snap).stdout


def test_stream_frames_per_step_end_to_end(model_dir, tmp_path):
    """Four frames per prefill: six frames make one full step and two held ones, which the end of the stream puts
    in (none lost); an odd count with pairs is refused before the model loads."""
    snap = tmp_path / "steps.safetensors"
    proc = run(
        "stream", DATA / "3.mp4", "--model", model_dir, "--size", "56", "--fps", "2", "--max-frames", "6",
        "--pair-frames", "--frames-per-step", "4", "--no-progress", "--save-state", snap,
        "--final", "What happens?", "--max-new-tokens", "3",
    )  # fmt: skip
    assert "in pairs, 4 frames per prefill" in proc.stderr and "done: 6 frames" in proc.stdout
    info = json.loads(run("state", snap, "--json").stdout)
    assert info["frames_per_step"] == 4 and info["held_frames"] == [] and info["counters"]["frames"] == 6
    bad = run(
        "stream", DATA / "3.mp4", "--model", model_dir, "--pair-frames", "--frames-per-step", "3", check=False
    )  # fmt: skip
    assert bad.returncode != 0 and "--frames-per-step: frames_per_step must be an even number" in bad.stderr
