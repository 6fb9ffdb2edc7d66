"""The README's examples run as written (blocks marked `<!-- readme-test -->`), from the repository root.

A shell block runs as one bash script, as it would pasted into a terminal (a variable set on one line is seen by the
next); each command's stderr is told apart so that what a reader sees can be checked: the bundled model's note
once per command that loads it, and none of the warnings that only alarm (library notices, tracebacks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

MARK = "<!-- readme-test -->"
NOTE = "note: the bundled model"
NOISE = ("Traceback", "Removed shared tensor", "much slower", "Warning:", "UserWarning")
LINE = "@@readme-line "


def blocks(kind: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    found = re.findall(re.escape(MARK) + r"\s*```(\w+)\n(.*?)```", text, flags=re.S)
    return [body for lang, body in found if lang == kind]


def run_shell_block(body: str, env: dict) -> list[tuple[str, subprocess.CompletedProcess, str]]:
    """Runs the block in one bash process; returns (line, the whole run, that line's stderr) per line."""
    lines = [line for line in body.strip().splitlines() if line.strip()]
    script = ["set -eo pipefail"]
    for i, line in enumerate(lines):
        script += [f"echo '{LINE}{i}' >&2", line]
    proc = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    parts = re.split(rf"^{re.escape(LINE)}(\d+)\n", proc.stderr, flags=re.M)
    per_line = {int(i): err for i, err in zip(parts[1::2], parts[2::2])}
    last = max(per_line, default=0)
    assert proc.returncode == 0, f"{lines[last]}\n{per_line.get(last, proc.stderr)[-3000:]}"
    return [(line, proc, per_line.get(i, "")) for i, line in enumerate(lines)]


def test_readme_has_runnable_examples():
    assert len(blocks("python")) >= 3 and len(blocks("bash")) >= 2


@pytest.mark.parametrize("index", range(3))
def test_python_examples(index, tmp_path, monkeypatch):
    code = blocks("python")[index]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("INFINITEVL_CACHE", str(tmp_path))
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("index", range(2))
def test_shell_examples(index, tmp_path):
    """Block 0: the command-line examples; block 1: the CPU training recipe (writes runs/tiny)."""
    env = {
        **os.environ,
        "INFINITEVL_CACHE": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),  # what the examples write lands in this test's folder
    }
    for line, _, err in run_shell_block(blocks("bash")[index], env):
        noise = [word for word in NOISE if word in err]
        assert not noise, f"{line}\n{err[-3000:]}"
        if index == 0 and re.match(r"(printf .*\| )?infinitevl (generate|stream|chat)\b", line):
            assert err.count(NOTE) == 1, f"{line}: the bundled model's note should be said once\n{err[-3000:]}"
