"""The training pipeline on a tiny random Qwen2.5-VL teacher: conversion, the four stages, exact resume, LoRA
merge, packing (several processes: test_training_distributed.py). Text from wiki_demo.txt, conversations with real
images from mllm_demo.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MEDIA
from test_training_losses import LargestTensor
from transformers import Qwen2_5_VLForConditionalGeneration

from infinitevl.config import FULL
from infinitevl.model import InfiniteVLForConditionalGeneration as Model
from infinitevl.processing.processor import Processor
from infinitevl.training.collate import collate, model_inputs, valid_mask
from infinitevl.training.config import load_config
from infinitevl.training.convert import convert
from infinitevl.training.data import DataOptions, TokenDataset
from infinitevl.training.loop import Trainer
from infinitevl.training.losses import cross_entropy, kl_divergence
from infinitevl.training.stages import make_stage
from infinitevl.training.teacher import Teacher, new_qwen_teacher

CHATS = MEDIA / "mllm_demo" / "mllm_demo.json"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    teacher = new_qwen_teacher(root / "teacher", seed=0)
    student = convert(teacher, root / "student")
    lines = (MEDIA / "wiki_demo.txt").read_text().splitlines()
    (root / "train.txt").write_text("\n".join(lines[:20]))
    (root / "heldout.txt").write_text("\n".join(lines[20:]))
    return root, teacher, student


def config(work, stage, **kw):
    root, teacher, student = work
    overrides = {
        "data.max_length": 96,
        "batch_size": 2,
        "optim.warmup_ratio": 0.0,
        "log_every": 100,
        "data.eval": str(root / "heldout.txt"),
    }
    overrides.update(kw.pop("set", {}))
    base = dict(
        stage=stage,
        student=str(kw.pop("student", student)),
        teacher=str(teacher),
        out=str(kw.pop("out", root / f"run-{stage}")),
        max_steps=kw.pop("max_steps", 10),
    )
    base.update(kw)
    raw = [f"{k}={v}" for k, v in overrides.items()]
    data = str(root / "train.txt") if "data.train" not in overrides else None
    return load_config(None, raw + ([f"data.train={data}"] if data else []), **base)


def heldout(work, model):
    root = work[0]
    return TokenDataset(
        root / "heldout.txt", Processor.from_pretrained(work[2]), DataOptions(max_length=96), model.config
    )


def test_conversion_keeps_the_teacher_exactly_when_no_layer_is_converted(work, tmp_path):
    _, teacher_dir, _ = work
    student = Model.from_pretrained(convert(teacher_dir, tmp_path / "same", layer_types=[FULL] * 4, window=None))
    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(teacher_dir), attn_implementation="sdpa").eval()
    processor = Processor.from_pretrained(teacher_dir)
    prompt = processor.prompt(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": MEDIA / "mllm_demo" / "mllm_demo_data" / "2.jpg"},
                    {"type": "text", "text": "Who is he?"},
                ],
            }
        ]
    )
    inputs = prompt.model_inputs()
    c = student.config
    types = (inputs["input_ids"] == c.image_token_id).int()
    with torch.no_grad():
        ours = student(**inputs).logits
        theirs = teacher(**inputs, mm_token_type_ids=types).logits
    assert ours.abs().max() > 1.0  # the spread initialisation gives informative logits
    assert (ours - theirs).abs().max() < 1e-4


def test_converted_hybrid_loads_strictly_and_reuses_the_teacher(work):
    _, teacher_dir, student_dir = work
    student = Model.from_pretrained(student_dir)  # strict
    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(teacher_dir))
    t = dict(teacher.named_parameters())
    s = dict(student.named_parameters())
    assert torch.equal(
        s["model.language_model.layers.0.self_attn.q_proj.weight"],
        t["model.language_model.layers.0.self_attn.q_proj.weight"],
    )  # softmax layer copied
    gdn_q = s["model.language_model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(gdn_q, t["model.language_model.layers.1.self_attn.q_proj.weight"])  # teacher init
    k_teacher = t["model.language_model.layers.1.self_attn.k_proj.weight"].view(2, 16, 64)
    k_student = s["model.language_model.layers.1.self_attn.k_proj.weight"].view(4, 16, 64)
    assert torch.equal(k_student[1], k_teacher[0]) and torch.equal(k_student[2], k_teacher[1])  # GQA repeat


def test_distillation_losses_are_zero_for_identical_models(work):
    _, _, student_dir = work
    model = Model.from_pretrained(student_dir)
    teacher = Teacher.load(student_dir)
    data = heldout(work, model)
    batch = collate([data[0], data[1]], 0)
    for stage in ("distill-layer", "distill-e2e"):
        cfg = config(work, stage, set={"layer_mse_weight": 1.0})
        sums = make_stage(cfg).sums(model, batch, teacher)
        assert all(float(v.detach()) == 0.0 for v in sums.values()), sums


def test_stages_equal_the_losses_on_whole_logits_without_building_them(work):
    """sft and distill-e2e (the Qwen2.5-VL teacher) project hidden states in chunks of positions: the same sums
    and gradients as the losses on both models' logits, and no [B, T, vocab] tensor on the way."""
    _, teacher_dir, student_dir = work
    model = Model.from_pretrained(student_dir).train()
    teacher = Teacher.load(teacher_dir)
    processor = Processor.from_pretrained(student_dir)
    short = TokenDataset(work[0] / "heldout.txt", processor, DataOptions(max_length=50), model.config)
    batch = collate([heldout(work, model)[0], short[1]], 0)  # the second row padded
    B, T = batch["input_ids"].shape
    V = model.config.text.vocab_size

    def on_logits(stage):
        logits = model(**model_inputs(batch)).logits
        if stage == "sft":
            return cross_entropy(logits, batch["labels"])
        return kl_divergence(logits, teacher(batch).logits, valid_mask(batch))

    for stage in ("sft", "distill-e2e"):
        sums = make_stage(config(work, stage))
        with LargestTensor(last_dim=V) as seen:
            (ours,) = sums.sums(model, batch, teacher).values()
            ours.backward()
        assert seen.largest < B * T * V, (stage, seen.largest)
        grads = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        ref = on_logits(stage)
        ref.backward()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=f"{stage} {name}")
        model.zero_grad(set_to_none=True)


def test_layer_then_end_to_end_distillation_improve_heldout(work):
    before = Trainer(config(work, "distill-layer", max_steps=1)).evaluate()
    layer = Trainer(config(work, "distill-layer", max_steps=60, set={"optim.lr": 3e-3}))
    layer.fit()
    after_layer = layer.evaluate()
    assert after_layer["layer_mse"] < 0.6 * before["layer_mse"], (before, after_layer)
    e2e = Trainer(config(work, "distill-e2e", student=layer.out / "final", max_steps=60, set={"optim.lr": 3e-3}))
    start = e2e.evaluate()
    e2e.fit()
    end = e2e.evaluate()
    assert end["kl"] < 0.85 * start["kl"], (start, end)
    assert end["agreement"] > start["agreement"]


def test_sft_lowers_the_answer_loss_on_real_images(work):
    cfg = config(
        work,
        "sft",
        max_steps=12,
        set={
            "data.train": str(CHATS),
            "data.max_length": 512,
            "data.image_max_pixels": 112 * 112,
            "optim.lr": 2e-3,
            "data.eval": str(CHATS),
            "eval_batches": 6,
        },
    )
    trainer = Trainer(cfg)
    assert trainer.train_data[0].images  # the real photos are in the samples
    before = trainer.evaluate()["student_ppl"]
    trainer.fit()
    after = trainer.evaluate()["student_ppl"]
    assert after < 0.8 * before, (before, after)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(work):
    root = work[0]
    straight = Trainer(config(work, "sft", out=root / "straight", max_steps=6, set={"optim.lr": 1e-3}))
    straight.fit()

    class Interrupted(Trainer):
        def train_step(self):
            if self.step == 3:
                raise KeyboardInterrupt
            return super().train_step()

    cfg = config(work, "sft", out=root / "interrupted", max_steps=6, set={"optim.lr": 1e-3, "save_every": 3})
    with pytest.raises(KeyboardInterrupt):
        Interrupted(cfg).fit()
    resumed = Trainer(cfg)
    resumed.fit()
    assert resumed.step == 6
    a, b = dict(straight.student.named_parameters()), dict(resumed.student.named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_lora_merge_equals_base_plus_adapters(work, tmp_path):
    from infinitevl.training.lora import load_adapters, merge

    trainer = Trainer(
        config(
            work,
            "sft-long",
            out=tmp_path / "long",
            max_steps=4,
            set={"optim.lr": 5e-3, "data.max_length": 128, "lora.r": 4},
        )
    )
    trainer.fit()
    adapters = tmp_path / "long" / "adapters"
    base = work[2]
    with_adapters = load_adapters(Model.from_pretrained(base), adapters).eval()
    merged = Model.from_pretrained(merge(base, adapters, tmp_path / "merged"))  # strict load: plain checkpoint
    plain = Model.from_pretrained(base)
    ids = torch.randint(0, 370, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (with_adapters, merged, plain))
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-3  # the adapters did change the model


def test_packed_batch_gives_each_sample_its_own_logits(work):
    _, _, student_dir = work
    model = Model.from_pretrained(student_dir)
    data = TokenDataset(
        CHATS,
        Processor.from_pretrained(student_dir),
        DataOptions(max_length=512, image_max_pixels=112 * 112),
        model.config,
    )
    samples = [data[i] for i in range(4)]
    packed = collate(samples, 0, pack=True, max_length=sum(len(s) for s in samples[:2]) + 5)
    assert packed["input_ids"].shape[0] < 4  # several samples share a row
    keys = ("input_ids", "position_ids", "segment_ids", "pixel_values", "image_grid_thw")
    with torch.no_grad():
        logits = model(**{k: packed[k] for k in keys}).logits
        row, t, seen = 0, 0, 0
        for s in samples:
            if t + len(s) > packed["input_ids"].shape[1] or packed["segment_ids"][row, t] == -1:
                row, t = row + 1, 0
            alone = model(**{k: v for k, v in collate([s], 0).items() if k in keys or k == "attention_mask"}).logits
            assert (logits[row, t : t + len(s)] - alone[0]).abs().max() < 1e-3
            t += len(s)
            seen += 1
    assert seen == 4


def test_config_rejects_unknown_fields_and_reads_overrides():
    with pytest.raises(ValueError, match=r"no field 'lrr' in optim; known: \['betas', 'eps'"):
        load_config(None, ["optim.lrr=1"], stage="sft", student="x")
    cfg = load_config(
        None, ["optim.lr=3e-4", "data.train=a.txt", "lora.targets=q_proj,o_proj"], stage="sft-long", student="x"
    )
    assert cfg.optim.lr == 3e-4 and cfg.lora.targets == ["q_proj", "o_proj"]
    with pytest.raises(ValueError, match="needs a `teacher`"):
        load_config(None, ["data.train=a.txt"], stage="distill-e2e", student="x")


def first_grads(work, tmp_path, name, **sets):
    trainer = Trainer(
        config(work, "sft", out=tmp_path / name, max_steps=1, set={"resume": False, **sets}),
        dump_first_grads=str(tmp_path / f"{name}.pt"),
    )
    trainer.fit()
    return torch.load(tmp_path / f"{name}.pt")


def test_accumulation_and_checkpointing_give_the_same_gradient(work, tmp_path):
    base = first_grads(work, tmp_path, "base", batch_size=4)
    accumulated = first_grads(work, tmp_path, "accum", batch_size=2, grad_accum=2)
    checkpointed = first_grads(work, tmp_path, "ckpt", batch_size=4, gradient_checkpointing=True)
    for name in base:
        assert torch.allclose(accumulated[name], base[name], atol=1e-7, rtol=1e-5), name
        assert torch.allclose(checkpointed[name], base[name], atol=1e-7, rtol=1e-5), name


def test_video_records_labels_and_truncation(work, tmp_path):
    import json

    data = tmp_path / "videos.jsonl"
    video = MEDIA / "mllm_demo" / "mllm_demo_data" / "3.mp4"
    record = {
        "messages": [
            {"role": "user", "content": "<video>What happens?"},
            {"role": "assistant", "content": "A short clip."},
        ],
        "videos": [str(video)],
    }
    data.write_text(json.dumps(record) + "\n")
    model_config = Model.from_pretrained(work[2]).config
    processor = Processor.from_pretrained(work[2])
    full = TokenDataset(data, processor, DataOptions(max_length=4096, video_fps=1.0, video_max_frames=4), model_config)[
        0
    ]
    c = model_config
    assert len(full.videos) == 1 and full.input_ids.count(c.video_token_id) == full.videos[0].num_tokens
    answer = [t for t, lab in zip(full.input_ids, full.labels) if lab != -100]
    assert processor.decode(answer, skip_special_tokens=False) == "A short clip.<|im_end|>"
    assert full.position_ids.shape == (3, len(full))
    start = full.input_ids.index(c.vision_start_token_id)
    cut = TokenDataset(
        data, processor, DataOptions(max_length=start + 5, video_fps=1.0, video_max_frames=4), model_config
    )[0]
    assert not cut.videos and c.video_token_id not in cut.input_ids and len(cut) <= start + 5


def test_convert_eval_and_merge_commands(work, tmp_path):
    root, teacher, student = work
    exe = Path(sys.executable).with_name("infinitevl")

    def run(*args):
        proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    assert "linear_attention" in run("convert", "--teacher", teacher, "--out", tmp_path / "s", "--init", "mimic")
    out = run(
        "eval",
        "--model",
        tmp_path / "s",
        "--teacher",
        teacher,
        "--data",
        root / "heldout.txt",
        "--max-length",
        "64",
        "--max-batches",
        "2",
        "--json",
    )
    import json

    metrics = json.loads(out)
    assert {"kl", "student_ppl", "teacher_ppl", "agreement", "layer_mse"} <= set(metrics)
    assert metrics["kl"] > 0 and 0 <= metrics["agreement"] <= 1
    run(
        "sft-long",
        "--student",
        student,
        "--data",
        root / "train.txt",
        "--out",
        tmp_path / "long",
        "--max-steps",
        "2",
        "--set",
        "data.max_length=64",
        "--set",
        "lora.r=2",
    )
    assert "merged checkpoint" in run(
        "merge", "--base", student, "--adapters", tmp_path / "long" / "adapters", "--out", tmp_path / "merged"
    )
    Model.from_pretrained(tmp_path / "merged")


def test_a_non_finite_loss_stops_the_run_before_the_update(work):
    """A NaN in the forward pass (here: planted in one activation at step 3) stops training with the step and the
    loss named; the weights are those after step 2 and the saved checkpoint is untouched."""
    root = work[0]
    cfg = config(work, "sft", out=root / "nan-run", max_steps=6, set={"optim.lr": 1e-3, "save_every": 2})
    trainer = Trainer(cfg)
    embed = trainer.student.model.language_model.embed_tokens

    def poison(module, args, output):
        return output * float("nan") if trainer.step == 2 else output

    for _ in range(2):
        trainer.train_step()
        trainer.step += 1
    trainer.save_checkpoint()
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    saved = {p: p.read_bytes() for p in trainer.checkpoint_dir(2).rglob("*") if p.is_file()}
    embed.register_forward_hook(poison)
    with pytest.raises(
        FloatingPointError, match=r"training step 3 of sft: ce is nan.*last checkpoint is .*step-0000002"
    ):
        trainer.fit()
    for name, p in trainer.student.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    assert {p: p.read_bytes() for p in trainer.checkpoint_dir(2).rglob("*") if p.is_file()} == saved
