"""lm-evaluation-harness itself against a live server: the README's two commands (a multiple-choice task scored by
log-likelihood through /v1/completions, a generation task through /v1/chat/completions), on the repository's two
local tasks, with results written by lm-eval."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import ROOT

from infinitevl.engine.runtime import InfiniteVL
from infinitevl.serving import BackgroundServer, ServerConfig, create_app


def readme_eval_commands() -> list[str]:
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text.split("\n## Evaluating with lm-evaluation-harness / lmms-eval\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)[1]
    commands = " ".join(line.rstrip("\\") for line in block.splitlines() if not line.startswith("#"))
    return [c.strip() for c in commands.split("lm_eval ")[1:]]


def test_lm_eval_runs_both_local_tasks_against_the_server(tmp_path):
    commands = readme_eval_commands()
    assert len(commands) == 2
    with BackgroundServer(create_app(InfiniteVL.load(), ServerConfig())) as srv:
        for command, task, metric in zip(commands, ("infinitevl_mc", "infinitevl_gen"), ("acc", "exact_match")):
            args = shlex.split(command.replace("http://127.0.0.1:8000", srv.url))
            out = tmp_path / task
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
            exe = Path(sys.executable).with_name("lm_eval")
            proc = subprocess.run(
                [str(exe), *args, "--output_path", str(out)], cwd=ROOT, capture_output=True, text=True, env=env
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][task]
            value = results[f"{metric},none"]
            assert 0.0 <= value <= 1.0 and f"{metric}_stderr,none" in results
        health = httpx.get(srv.url + "/health").json()
        assert health["completed"] >= 6 * 4 + 4  # every choice of every question scored, every question answered
