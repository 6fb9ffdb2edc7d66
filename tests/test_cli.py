"""Every subcommand through the real `infinitevl` entry point (a subprocess), on a tiny model folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MEDIA

from infinitevl.defaults import make_untrained_model

DATA = MEDIA / "mllm_demo" / "mllm_demo_data"
EXE = Path(sys.executable).with_name("infinitevl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_untrained_model(tmp_path_factory.mktemp("models") / "tiny")


def run(*args, stdin: str | None = None, env_cache=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if env_cache:
        env["INFINITEVL_CACHE"] = str(env_cache)
    proc = subprocess.run(
        [str(EXE), *map(str, args)], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_for_every_subcommand():
    out = run("--help").stdout
    for sub in ("generate", "chat", "stream", "state"):
        assert sub in out
        assert "usage: infinitevl " + sub in run(sub, "--help").stdout


def test_generate_with_images_streams_text(model_dir):
    proc = run(
        "generate",
        "Who are they?",
        "--image",
        DATA / "1.jpg",
        "--image",
        DATA / "2.jpg",
        "--model",
        model_dir,
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "1",
    )
    assert "untrained" in proc.stderr
    assert proc.stdout.endswith("\n")


def test_chat_is_multi_turn_with_images(model_dir):
    proc = run(
        "chat",
        "--model",
        model_dir,
        "--max-new-tokens",
        "4",
        stdin=f"Hello\n/image {DATA / '3.jpg'}\nWhat is this?\n/stats\n/nonsense\n/quit\n",
    )
    assert "[image queued" in proc.stderr and "turns 2" in proc.stderr and "unknown command /nonsense" in proc.stderr
    assert len(proc.stdout.splitlines()) >= 2


def test_stream_a_video_and_a_frame_folder_then_inspect_the_state(model_dir, tmp_path):
    snap = tmp_path / "stream.safetensors"
    proc = run(
        "stream",
        DATA / "3.mp4",
        "--model",
        model_dir,
        "--fps",
        "2",
        "--size",
        "112",
        "--max-frames",
        "6",
        "--ask",
        "1.0:What happens?",
        "--final",
        "And at the end?",
        "--max-new-tokens",
        "4",
        "--save-state",
        snap,
    )
    assert "Q: What happens?" in proc.stdout and "Q: And at the end?" in proc.stdout
    assert "6 frames" in proc.stdout and "constant throughout" in proc.stdout
    assert "frames/s" in proc.stderr  # the progress bar
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        shutil.copy(DATA / name, folder / name)
    proc = run("stream", folder, "--model", model_dir, "--size", "56", "--load-state", snap, "--no-progress")
    assert "9 frames" in proc.stdout  # the resumed stream counts its first 6 frames too
    text = run("state", snap).stdout
    assert "gated_deltanet" in text and "ring 23 slots" in text
    info = json.loads(run("state", snap, "--json").stdout)
    assert info["tokens"][0] > 6 * 16 and json.loads(info["extra"]["counters"])["frames"] == 6


def test_errors_are_one_line_unless_debug(model_dir, tmp_path):
    proc = run("stream", tmp_path / "missing.mp4", "--model", model_dir, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("infinitevl stream: error:")
    assert "Traceback" not in proc.stderr
    proc = run("generate", "hi", "--model", tmp_path / "nowhere", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "no model folder" in proc.stderr
    proc = run("--debug", "stream", DATA / "1.mp4", "--model", model_dir, "--ask", "soon:what?", check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "expected SECONDS:question" in proc.stderr


def test_without_model_the_bundled_trained_model_runs(tmp_path):
    proc = run("generate", "Which digit was last shown with tag A?", "--max-new-tokens", "3", env_cache=tmp_path)
    assert "untrained" not in proc.stderr
    assert not (tmp_path / "untrained-tiny").exists()  # the stand-in is only built when no model ships


def test_demo_checks_every_answer_and_asks_the_window_alone_too(tmp_path):
    """`make demo` at a small size: the bundled model's answers beside the truth, the same questions put to the
    shipped SWA-only model, one processing rate, and exact read-backs of the last frames."""
    proc = run("demo", "--frames", "64", "--no-progress", env_cache=tmp_path)
    assert "1 frame/s in stream time" in proc.stderr
    pattern = re.compile(r"answer '(\d*)'\s+truth (\d)\s+(correct|WRONG)\s+SWA-only: '(.*?)'\s+(correct|WRONG)")
    answers = [pattern.search(line) for line in proc.stdout.splitlines() if line.startswith("  tag ")]
    assert len(answers) >= 5 and all(answers)
    for m in answers:  # every verdict follows from the answer and the truth printed beside it
        assert (m[3] == "correct") == (m[1] == m[2]) and (m[5] == "correct") == (m[4] == m[2])
    hits, total = (int(x) for x in re.search(r"^(\d+)/(\d+) correct; 64 frames in ", proc.stdout, re.M).groups())
    assert total == len(answers) and hits == sum(m[3] == "correct" for m in answers)
    assert re.search(r"frames/s of processing\)", proc.stdout) and proc.stdout.count("frames/s") == 1
    assert re.search(rf"^SWA-only: {sum(m[5] == 'correct' for m in answers)}/{total} correct", proc.stdout, re.M)
    reads = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("Read the last")]
    assert len(reads) == 4 and re.search(r"^\d/4 read back exactly", proc.stdout, re.M)
