"""The README's examples run as written (blocks marked `<!-- readme-test -->`), from the repository root."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

MARK = "<!-- readme-test -->"


def blocks(kind: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    found = re.findall(re.escape(MARK) + r"\s*```(\w+)\n(.*?)```", text, flags=re.S)
    return [body for lang, body in found if lang == kind]


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
    }
    for line in blocks("bash")[index].strip().splitlines():
        proc = subprocess.run(line, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
