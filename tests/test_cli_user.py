"""What a new user meets first, through the real `infinitevl` entry point: Ctrl-C (a real SIGINT) in a chat answer and
in a live stream, speed and memory where a user looks, a random model of a named size to try them, errors about
bad files told in words before the model loads, and files written where and how the user expects."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MEDIA

from infinitevl.config import InfiniteVLConfig
from infinitevl.defaults import make_untrained_model
from infinitevl.state import InfiniteVLState

DATA = MEDIA / "mllm_demo" / "mllm_demo_data"
EXE = Path(sys.executable).with_name("infinitevl")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_untrained_model(tmp_path_factory.mktemp("models") / "tiny")


def run(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@contextlib.contextmanager
def started(*args):
    """The command running, with pipes to all three streams; killed if the test ends before it does."""
    proc = subprocess.Popen(
        [str(EXE), *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def in_process(argv: list, capsys, monkeypatch) -> tuple[int, str]:
    """`infinitevl ARGV` in this process with model loading forbidden: (exit status, stderr)."""
    from infinitevl.cli.main import main
    from infinitevl.engine.runtime import InfiniteVL

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(InfiniteVL, "load", load)
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def read_until(stream, pattern: str, timeout: float = 120) -> str:
    """What `stream` (a pipe) gives until `pattern` appears in it."""
    seen, end = b"", time.monotonic() + timeout
    while not re.search(pattern, seen.decode("utf-8", "replace")):
        left = end - time.monotonic()
        assert left > 0, f"{pattern!r} did not appear; got {seen[-2000:]!r}"
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"the stream ended before {pattern!r}; got {seen[-2000:]!r}"
            seen += chunk
    return seen.decode("utf-8", "replace")


# -- 1. Ctrl-C ----------------------------------------------------------------------------------------------------------
def test_ctrl_c_in_a_chat_answer_ends_that_answer_only(model_dir, tmp_path):
    # the untrained model never ends this answer by itself: only Ctrl-C can
    saved = tmp_path / "chat.safetensors"
    with started("chat", "--model", model_dir, "--max-new-tokens", "1000000") as proc:
        proc.stdin.write(b"Hello\n")
        proc.stdin.flush()
        read_until(proc.stdout, r"(?s).", timeout=120)  # the answer is being written
        proc.send_signal(signal.SIGINT)
        read_until(proc.stderr, r"answer stopped by Ctrl-C")
        proc.stdin.write(f"/stats\n/save {saved}\n/quit\n".encode())
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    err = err.decode()
    assert ", 1 turn]" in err and "last answer: prefill" in err and "decode" in err  # /stats after the stop
    meta = InfiniteVLState.read_metadata(saved)
    assert '"questions": 1' in meta["counters"]  # the conversation went on: the turn is in it
    state = InfiniteVLState.load(saved, InfiniteVLConfig.from_file(model_dir))
    prompt = int(re.search(r"prefill (\d+) tokens?\b", err).group(1))
    answered = int(re.search(r"decode (\d+) tokens?\b", err).group(1))
    assert answered >= 1 and state.tokens_seen > prompt + answered  # the partial answer and the turn's end are kept


def test_ctrl_c_in_a_live_stream_saves_the_state(model_dir, tmp_path):
    saved = tmp_path / "live.safetensors"
    argv = ["stream", DATA, "--model", model_dir, "--size", "56", "--loops", "100000", "--save-state", saved]
    with started(*argv) as proc:
        read_until(proc.stderr, r"\b[2-9] frames \[")  # the bar: a few frames are in
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 0, err
    frames = int(re.search(r"stopped by Ctrl-C after (\d+) frames", err).group(1))
    assert f"state saved to {saved}" in out and frames >= 2
    assert f'"frames": {frames}' in InfiniteVLState.read_metadata(saved)["counters"]
    assert "frame/s" not in err  # one rate on the bar (the frames/s of the last frames), not tqdm's own too


# -- 2. speed, and a model of a named size ------------------------------------------------------------------------------
def test_init_model_writes_a_loadable_model_of_the_named_size_and_generate_prints_speed(tmp_path):
    out = tmp_path / "sized"
    widths = ["hidden_size=128", "num_attention_heads=8", "num_hidden_layers=4", "vision.depth=2"]
    proc = run("init-model", "--size", "tiny", *[a for w in widths for a in ("--set", w)], "--out", out)
    assert proc.stdout.strip() == str(out) and "random weights" in proc.stderr
    config = InfiniteVLConfig.from_file(out)
    assert (config.text.hidden_size, config.text.num_attention_heads, config.text.num_hidden_layers) == (128, 8, 4)
    assert config.vision.depth == 2 and config.vision.out_hidden_size == 128 and config.extra["infinitevl_untrained"]
    proc = run("generate", "Hello", "--model", out, "--verbose", "--max-new-tokens", "4")
    speed = r"prefill \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\); decode \d tokens? in [\d.]+ s \([\d.]+ tokens/s\)"
    assert re.search(speed + r"; peak memory \(RSS\) \d+ MiB; state [\d.]+ MiB", proc.stderr), proc.stderr
    assert "random, untrained weights" in proc.stderr  # the note says the answers are meaningless
    bad = run("init-model", "--set", "hidden_sise=8", "--out", tmp_path / "bad", check=False)
    assert bad.returncode == 1 and "no field 'hidden_sise' in the decoder; known:" in bad.stderr
    assert not (tmp_path / "bad").exists()


# -- 4. errors about files, before the model loads ------------------------------------------------------------------
def test_bad_media_are_told_in_words_before_the_model_loads(tmp_path, capsys, monkeypatch):
    empty_video = tmp_path / "empty.mp4"
    empty_video.write_bytes(b"")
    empty_folder = tmp_path / "frames"
    empty_folder.mkdir()
    readme = Path(__file__).resolve().parents[1] / "README.md"
    cases = [
        (["generate", "hi", "--image", readme], f"--image {readme}: not an image file (expected JPEG, PNG"),
        (["generate", "hi", "--image", empty_video], "the file is empty, not an image"),
        (["generate", "hi", "--video", readme], f"--video {readme}: not a video file that can be decoded"),
        (["generate", "hi", "--video", empty_video], f"--video {empty_video}: the file is empty, not a video"),
        (["stream", readme], f"source {readme}: not a video file that can be decoded"),
        (["stream", empty_video], f"source {empty_video}: the file is empty, not a video"),
        (["stream", empty_folder], f"source {empty_folder}: no image files in that folder"),
    ]
    for argv, message in cases:
        code, err = in_process(argv, capsys, monkeypatch)
        assert code == 1 and message in err, (argv, err)
        assert not re.search(r"Errno|BufferedReader|Invalid data found", err), err


# -- 5. files written where and how the user expects ----------------------------------------------------------------
def test_save_into_a_missing_folder_is_refused_and_creates_nothing(model_dir, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no" / "such"
    proc = subprocess.run(
        [str(EXE), "chat", "--model", str(model_dir), "--max-new-tokens", "2"],
        input=f"/save {missing / 'x.safetensors'}\n/stats\n",
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"the folder {missing} does not exist (create it first); nothing saved" in proc.stderr
    assert not (tmp_path / "no").exists()
    code, err = in_process(["stream", DATA, "--save-state", missing / "s.safetensors"], capsys, monkeypatch)
    assert code == 1 and f"the folder {missing} does not exist" in err  # refused before the model loads
    assert not (tmp_path / "no").exists()


def test_written_models_have_the_permissions_of_any_other_file(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    out = tmp_path / "int8"
    run("quantize", "--bits", "8", "--out", out)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == want and set(modes.values()) == {want}, modes
