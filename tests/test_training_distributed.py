"""Training on two processes follows the one-process run: DDP over gloo (torchrun, as the README runs it) and FSDP2
(`accelerate launch` with the GPU config `configs/accelerate/fsdp2.yaml`, on 2 CPU processes over gloo).

All runs are the tiny sft recipe (`configs/recipe-tiny/sft.yaml`: real photos, packing) with the same global batch
of 4 samples per step: one process with batch 4, DDP with 2 x 2, FSDP2 with 2 processes x 2 accumulated micro-batches
of 1. The learning rate of every step must be equal, the loss per step equal up to fp32 summation order, and a
sharded FSDP2 checkpoint must resume to the same weights as the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MEDIA, ROOT
from safetensors.torch import load_file

from infinitevl.model import InfiniteVLForConditionalGeneration as Model
from infinitevl.training.config import load_config
from infinitevl.training.convert import convert
from infinitevl.training.loop import Trainer
from infinitevl.training.teacher import new_qwen_teacher

CHATS = MEDIA / "mllm_demo" / "mllm_demo.json"
RECIPE = ROOT / "configs" / "recipe-tiny" / "sft.yaml"
FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
STEPS = 4
# The recipe, shortened (4 steps, smaller photos), with one warm-up step then the cosine, so that every step has
# a different learning rate.
SETS = [f"data.train={CHATS}", "data.image_max_pixels=12544", "log_every=1", "optim.warmup_ratio=0.25", "resume=true"]

# Loss per step, 2 processes against 1: the same mathematics in a different fp32 summation order (each process
# sums its own samples, packed into rows of other lengths, and the gradients are then reduced across processes).
# Measured: relative differences up to 1.1e-7 over 4 steps, about one fp32 ulp; 1e-5 leaves room for Adam, which
# turns a rounding difference in a near-zero gradient into a full-size update difference.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    return convert(new_qwen_teacher(root / "teacher", seed=0), root / "student")


@pytest.fixture(scope="module")
def one_process(student, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The reference: the same steps on one process with a batch of 4; first-step gradients dumped."""
    out = tmp_path_factory.mktemp("one")
    cfg = load_config(RECIPE, [*SETS, "batch_size=4"], student=str(student), out=str(out), max_steps=STEPS)
    Trainer(cfg, dump_first_grads=str(out / "grads.pt")).fit()
    return out, metrics(out)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def launch(launcher: list[str], student: Path, out: Path, sets: list[str], *extra: str) -> None:
    """`infinitevl sft` on the recipe under a multi-process launcher."""
    args = ["-m", "infinitevl.cli.main", "sft", "--config", str(RECIPE), "--student", str(student), "--out", str(out)]
    args += ["--max-steps", str(STEPS), *extra] + [a for s in (*SETS, *sets) for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]


def assert_same_schedule_and_loss(run: list[dict], one: list[dict]) -> None:
    assert [r["step"] for r in run] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in run] == [r["lr"] for r in one]
    assert len({r["lr"] for r in one}) == STEPS  # warm-up then cosine: every step has its own rate
    for a, b in zip(run, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (a, b)


def test_two_process_ddp_follows_the_one_process_run(student, one_process, tmp_path):
    """torchrun as in the README: equal first-step gradients, then the same schedule and losses."""
    one_dir, one = one_process
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "ddp"
    launch(
        [torchrun, "--standalone", "--nproc_per_node", "2"],
        student,
        out,
        ["batch_size=2"],
        "--dump-first-grads",
        str(out / "grads.pt"),
    )
    ddp_grads, one_grads = torch.load(out / "grads.pt"), torch.load(one_dir / "grads.pt")
    assert ddp_grads.keys() == one_grads.keys() and len(one_grads) > 10
    for name in one_grads:
        assert torch.allclose(ddp_grads[name], one_grads[name], atol=1e-7, rtol=1e-5), name
    assert_same_schedule_and_loss(metrics(out), one)


def test_fsdp2_on_two_cpu_processes_follows_one_process_and_resumes_exactly(student, one_process, tmp_path):
    """The GPU FSDP2 config, unchanged but for the process count: parameters, gradients and optimizer state are
    sharded over 2 processes; the checkpoint of step 2 is sharded and resuming from it repeats steps 3-4 exactly."""
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(FSDP2)]
    accelerate += ["--num_processes", "2", "--main_process_port", "0"]
    sets = ["batch_size=1", "grad_accum=2", "save_every=2"]
    straight = tmp_path / "straight"
    launch(accelerate, student, straight, sets)
    assert_same_schedule_and_loss(metrics(straight), one_process[1])

    saved = straight / "checkpoints" / "step-0000002"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # one file per process: the state is sharded
        assert sorted(p.name for p in (saved / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], part
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "last").write_text(saved.name)
    saved.rename(resumed / "checkpoints" / saved.name)
    launch(accelerate, student, resumed, sets)
    timeless = [
        [{k: v for k, v in r.items() if k != "elapsed"} for r in m] for m in (metrics(resumed), metrics(straight))
    ]
    assert timeless[0] == timeless[1][2:]  # steps 3 and 4: the same losses, rates and gradient norms, bit for bit
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    Model.from_pretrained(straight / "final")  # the gathered export is a complete checkpoint (strict load)
