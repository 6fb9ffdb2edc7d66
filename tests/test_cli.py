"""Every subcommand through the real `infinitevl` entry point (a subprocess), on a tiny model folder; the parser's
help, its speed (nothing heavy imported before a command runs) and the checks made before a model loads."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MEDIA

import infinitevl
from infinitevl.cli.main import build_parser
from infinitevl.defaults import make_untrained_model

DATA = MEDIA / "mllm_demo" / "mllm_demo_data"
EXE = Path(sys.executable).with_name("infinitevl")
HEAVY = ("torch", "transformers", "safetensors", "av", "fastapi", "matplotlib", "accelerate")


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


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.choices).choices


def test_help_for_every_subcommand():
    out = run("--help").stdout
    for sub in ("generate", "chat", "stream", "state"):
        assert sub in out
        assert "usage: infinitevl " + sub in run(sub, "--help").stdout
    assert run("--version").stdout.strip() == f"infinitevl {infinitevl.__version__}"


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("INFINITEVL_API_KEY", "not-for-your-eyes")
    assert "not-for-your-eyes" not in subparsers()["serve"].format_help()  # a default from a secret is not shown
    for name, parser in subparsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help is argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
            shown = action.default not in (None, [], argparse.SUPPRESS) and action.default is not False
            if action.option_strings and shown:
                shown_help = parser._get_formatter()._format_action(action)  # as --help prints it
                assert "default" in shown_help, f"{name} {action.option_strings[-1]}: default not shown"
    assert "--dump-first-grads" not in subparsers()["sft"].format_help()  # a testing aid, hidden


def test_parsing_imports_nothing_heavy():
    """--help, --version and the parsing of every command line import no torch, transformers or model code: they
    answer at once. Checked on what is imported, not on time (a subprocess, so this process's imports do not
    count)."""
    code = (
        "import sys\n"
        "from infinitevl.cli.main import build_parser, parse\n"
        "for argv in (['--help'], ['--version'], *[[c, '--help'] for c in build_parser()._subparsers"
        "._group_actions[0].choices]):\n"
        "    try:\n"
        "        parse(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "parse(['generate', 'hi', '--image', 'x.jpg', '--max-new-tokens', '3'])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_an_unknown_option_gets_the_subcommands_usage_and_a_suggestion():
    proc = run("generate", "hi", "--max-tokens", "5", check=False)
    assert proc.returncode == 2
    assert "usage: infinitevl generate" in proc.stderr and "did you mean --max-new-tokens?" in proc.stderr
    proc = run("generat", "hi", check=False)
    assert proc.returncode == 2 and "did you mean generate?" in proc.stderr
    proc = run("chat", "--top-p", "1.5", check=False)  # values out of range: refused by the parser, at once
    assert (
        proc.returncode == 2 and "usage: infinitevl chat" in proc.stderr and "--top-p: must be in (0, 1]" in proc.stderr
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "hi", "--image", "missing.jpg"], "--image missing.jpg: no such file"),
        (["generate", "hi", "--image", str(DATA / "1.jpg"), "--video", "gone.mp4"], "--video gone.mp4: no such file"),
        (["generate", "hi", "--image", "https://example.com/a.jpg"], "URLs are not fetched here"),
        (["generate", "hi", "--model", "no/such/folder"], "no model folder at no/such/folder"),
        (["stream", "missing.mp4"], "missing.mp4: no such file or folder"),
        (["stream", str(DATA / "1.mp4"), "--size", "30"], "--size 30 is not a positive multiple of 28"),
        (["stream", str(DATA / "1.mp4"), "--load-state", "old.safetensors"], "--load-state old.safetensors"),
        (["state", "missing.safetensors"], "snapshot missing.safetensors: no such file"),
    ],
)
def test_inputs_are_checked_before_anything_heavy_loads(argv, message, tmp_path):
    """A mistake in the command line is reported before torch (let alone the model) is imported."""
    code = (
        "import sys\n"
        "from infinitevl.cli.main import main\n"
        f"rc = main({argv!r})\n"
        f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.stdout.strip() == "1 []", proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_python_api_counts_tokens_as_an_int():
    from infinitevl.config import tiny_config
    from infinitevl.state import InfiniteVLState, StateError

    state = InfiniteVLState.allocate(tiny_config())
    state.num_tokens += 7  # what the model does as tokens go through it
    assert state.tokens_seen == 7 and type(state.tokens_seen) is int
    with pytest.raises(StateError, match="2 streams"):
        InfiniteVLState.allocate(tiny_config(), batch_size=2).tokens_seen  # noqa: B018


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
    assert proc.stderr.count("untrained") == 1  # the model's note, once
    assert proc.stdout.endswith("\n")


def test_chat_is_multi_turn_with_images(model_dir, tmp_path):
    proc = run(
        "chat",
        "--model",
        model_dir,
        "--max-new-tokens",
        "4",
        stdin=f"Hello\n/image {DATA / '3.jpg'}\nWhat is this?\n/stats\n/nonsense\n/quit\n",
    )
    assert (
        "[image attached" in proc.stderr and ", 2 turns]" in proc.stderr and "unknown command /nonsense" in proc.stderr
    )
    assert len(proc.stdout.splitlines()) >= 2
    assert proc.stderr.count("untrained") == 1  # the model's note, once for the whole conversation


def test_a_mistake_never_ends_a_chat(model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("plain text")
    proc = run(
        "chat",
        "--model",
        model_dir,
        "--max-new-tokens",
        "2",
        stdin=f"/image {tmp_path / 'missing.jpg'}\n/image {not_an_image}\nHello\n/save {blocker / 'x.safetensors'}\n"
        "Still there?\n/stats\n",
    )
    assert "missing.jpg: no such file; nothing attached" in proc.stderr
    assert f"{not_an_image}: not an image file" in proc.stderr
    assert f"{blocker} is a file, not a folder; nothing saved" in proc.stderr  # the failed save
    assert ", 2 turns]" in proc.stderr and "Traceback" not in proc.stderr  # both messages answered, text only


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
    assert "session: 6 frames" in text and "open run of live frames: timestamps 0-2.5" in text
    info = json.loads(run("state", snap, "--json").stdout)  # plain JSON: numbers and objects, no JSON in strings
    assert info["tokens"][0] > 6 * 16 and info["counters"]["frames"] == 6
    assert info["segment"]["first_time"] == 0.0 and info["segment"]["last_time"] == pytest.approx(2.5, abs=0.05)
    assert info["extra"] == {} and info["checksum"].startswith("sha256:")
    assert f"checksum {info['checksum']} (verified)" in text


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
    assert proc.stderr.count("note: the bundled model") == 1 and "--model" in proc.stderr  # what it can and cannot do
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
