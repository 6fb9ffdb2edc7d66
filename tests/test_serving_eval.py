"""lm-evaluation-harness itself against a live server: the documented two commands (a multiple-choice task scored by
log-likelihood through /v1/completions, a generation task through /v1/chat/completions), on the repository's two
local tasks, with results written by lm-eval. Every log-likelihood lm-eval computed through the server is compared
with the model's own, from one full forward pass of the same tokens."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ROOT

from infinitevl.engine.runtime import InfiniteVL
from infinitevl.serving import BackgroundServer, ServerConfig, create_app


def documented_eval_commands() -> list[str]:
    """The bash block of the docs (README or docs/) that runs lm_eval: one command per `lm_eval` call."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            if "lm_eval --model local-completions" in block:
                commands = " ".join(line.rstrip("\\") for line in block.splitlines() if not line.startswith("#"))
                return [c.strip() for c in commands.split("lm_eval ")[1:]]
    raise AssertionError("no documented lm_eval commands")


def own_loglikelihood(engine, context: str, continuation: str) -> float:
    """log p(continuation | context) from one forward pass, tokenized as lm-eval documents it: the context's
    trailing spaces go to the continuation, the whole text is tokenized and split after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    tok = engine.processor.tokenizer
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n_context = len(tok(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(n_context, len(whole)))


def test_lm_eval_runs_both_local_tasks_against_the_server(tmp_path):
    commands = documented_eval_commands()
    assert len(commands) == 2
    engine = InfiniteVL.load()
    with BackgroundServer(create_app(InfiniteVL.load(), ServerConfig())) as srv:
        for command, task, metric in zip(commands, ("infinitevl_mc", "infinitevl_gen"), ("acc", "exact_match")):
            args = shlex.split(command.replace("http://127.0.0.1:8000", srv.url))
            out = tmp_path / task
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
            exe = Path(sys.executable).with_name("lm_eval")
            proc = subprocess.run(
                [str(exe), *args, "--output_path", str(out), "--log_samples"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env=env,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][task]
            value = results[f"{metric},none"]
            assert 0.0 <= value <= 1.0 and f"{metric}_stderr,none" in results
            if task == "infinitevl_mc":
                samples = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]
                scored = 0
                for sample in samples:
                    for args_, resp in zip(sample["arguments"].values(), sample["resps"]):
                        context, continuation = args_["arg_0"], args_["arg_1"]
                        served = float(resp[0][0])  # (log-likelihood, is greedy), as text
                        assert served == pytest.approx(own_loglikelihood(engine, context, continuation), abs=1e-3)
                        scored += 1
                assert scored == sum(len(s["doc"]["choices"]) for s in samples) > 0
        health = httpx.get(srv.url + "/health").json()
        # every choice of every question scored by the model (the generation task's questions are not the bundled
        # model's tasks: its fixed reply answers them without the model)
        assert health["completed"] >= 6 * 4
