"""The documentation's examples run as written (blocks marked `<!-- readme-test -->` in the README and the docs pages
it links), from the repository root, and nothing in them points outside the repository.

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
PAGES = ("README.md", "docs/usage.md", "docs/training.md")  # the pages with runnable examples, in reading order


def blocks(kind: str) -> list[tuple[str, str]]:
    """(page, body) of every marked block of one language, page by page."""
    found = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        marked = re.findall(re.escape(MARK) + r"\s*```(\w+)\n(.*?)```", text, flags=re.S)
        found += [(page, body) for lang, body in marked if lang == kind]
    return found


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
    assert len(blocks("python")) >= 3 and len(blocks("bash")) >= 3


def test_nothing_points_outside_the_repository():
    """A clone stands alone: no file in the repository names the folder beside it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    outside = re.compile(r"\.\./shared\b")
    hits = []
    for name in tracked.splitlines():
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".js", ".html", ".cfg", ".txt", ""}:
            try:
                text = path.read_text()
            except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
                continue
            hits += [f"{name}:{i + 1}" for i, line in enumerate(text.splitlines()) if outside.search(line)]
    assert not hits, hits


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_examples(index, tmp_path, monkeypatch):
    page, code = blocks("python")[index]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("INFINITEVL_CACHE", str(tmp_path))
    exec(compile(code, f"{page} python block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("index", range(len(blocks("bash"))))
def test_shell_examples(index, tmp_path):
    """The README's quick start, docs/usage.md's command-line examples, docs/training.md's CPU recipe (runs/tiny)."""
    page, body = blocks("bash")[index]
    env = {
        **os.environ,
        "INFINITEVL_CACHE": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),  # what the examples write lands in this test's folder
    }
    for line, _, err in run_shell_block(body, env):
        noise = [word for word in NOISE if word in err]
        assert not noise, f"{page}: {line}\n{err[-3000:]}"
        if re.match(r"(printf .*\| )?infinitevl (generate|stream|chat)\b", line) and "--model" not in line:
            assert err.count(NOTE) == 1, f"{page}: {line}: the bundled model's note should be said once\n{err[-3000:]}"
