"""The training loop, on accelerate: one code path for one CPU process, DDP over gloo, FSDP2 (on GPUs, or on CPU
processes over gloo, as the tests run it) or DeepSpeed on GPUs.

fp32 master weights (bf16 autocast on CUDA), AdamW with decoupled weight decay (none on norms, biases and GDN gate
parameters), cosine schedule with warm-up, gradient accumulation, clipping, optional gradient checkpointing.
Every step's micro-batches are known in advance, so each loss term is divided by its token count over the whole
step and all processes: accumulation and data parallelism give exactly the gradient of one large batch.
Checkpoints (accelerate's `save_state`: model, optimizer, scheduler, RNG) plus the step number make resuming exact:
the data order is a pure function of (seed, step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from ..model import InfiniteVLForConditionalGeneration
from ..processing.processor import Processor
from .collate import collate
from .config import TrainConfig, to_dict
from .data import DataOptions, TokenDataset
from .stages import DEFAULT_TRAINABLE, Stage, make_stage, select_trainable
from .teacher import Teacher

NO_DECAY = ("norm", "bias", "A_log", "dt_bias", "ln_q")


class _TiedHeadNotice(logging.Filter):
    """accelerate leaves `lm_head.weight` out of every checkpoint because it shares its storage with the embeddings
    (the weights are tied) and warns on each save; loading ties it again, so that warning says nothing. A shared
    tensor other than the tied head is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = re.search(r"Removed shared tensor \{(.*?)\} while saving", record.getMessage())
        if not found:
            return True
        names = [name.strip(" '\"") for name in found.group(1).split(",")]
        return not all(name.endswith("lm_head.weight") for name in names)


logging.getLogger("accelerate.utils.other").addFilter(_TiedHeadNotice())


class StudentWithLoss(nn.Module):
    """The student and its stage's loss as one module, so that DDP / FSDP see every forward: a training step
    (`batch`, `teacher`) or any other use of the student (`call(student)`, e.g. evaluation: under FSDP the
    parameters held by the root module are gathered only inside its own forward)."""

    def __init__(self, student: InfiniteVLForConditionalGeneration, stage: Stage):
        super().__init__()
        self.student = student
        self.stage = stage

    def forward(self, batch: dict | None = None, teacher=None, call=None):
        if call is not None:
            return call(self.student)
        return self.stage.sums(self.student, batch, teacher)


def data_options(cfg: TrainConfig) -> DataOptions:
    d = cfg.data
    return DataOptions(
        max_length=d.max_length,
        image_max_pixels=d.image_max_pixels,
        image_min_pixels=d.image_min_pixels,
        video_fps=d.video_fps,
        video_max_frames=d.video_max_frames,
        answer_only=d.answer_only,
    )


def build_datasets(cfg: TrainConfig, processor: Processor, model_config):
    opts = data_options(cfg)
    train = TokenDataset(cfg.data.train, processor, opts, model_config, cfg.data.media_root)
    if cfg.data.eval:
        return train, TokenDataset(cfg.data.eval, processor, opts, model_config, cfg.data.media_root)
    if cfg.data.eval_fraction > 0:
        n = len(train)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 999)).tolist()
        k = max(1, int(n * cfg.data.eval_fraction))
        held = TokenDataset(cfg.data.train, processor, opts, model_config, cfg.data.media_root, sorted(order[:k]))
        kept = TokenDataset(cfg.data.train, processor, opts, model_config, cfg.data.media_root, sorted(order[k:]))
        return kept, held
    return train, None


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions [start, start + count) of the endless stream of per-epoch permutations of range(n)."""
    out = []
    while len(out) < count:
        pos = start + len(out)
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = min(n - offset, count - len(out))
        out.extend(perm[offset : offset + take])
    return out


def micro_batches(cfg: TrainConfig, dataset, step: int, rank: int, world: int, pad_id: int) -> list[dict]:
    """This process's micro-batches of optimizer step `step` (a pure function of seed and step)."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    indices = sample_indices(len(dataset), cfg.seed, step * per_step, per_step)
    out = []
    for m in range(cfg.grad_accum):
        lo = (m * world + rank) * cfg.batch_size
        samples = [dataset[i] for i in indices[lo : lo + cfg.batch_size]]
        out.append(collate(samples, pad_id, cfg.data.pack, cfg.data.max_length))
    return out


def cosine_schedule(optimizer, cfg: TrainConfig):
    warmup = int(cfg.max_steps * cfg.optim.warmup_ratio)
    floor = cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("nothing to train: no parameter requires grad (check `trainable` / the stage)")
    o = cfg.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_accelerator(mixed_precision: str = "auto"):
    """The Accelerator of a run: what `accelerate launch` / `torchrun` configured, on CUDA when there is one.

    Two departures from accelerate's defaults. The schedule steps once per optimizer step: by default accelerate
    steps it once per process, as it assumes per-process data loaders and a schedule sized for one process, which made
    a 2-process run anneal twice as fast. And an FSDP launch on CPU gets FSDP: accelerate 1.15 turns its FSDP config
    into DDP over gloo when there is no accelerator device, although FSDP2 (`fully_shard`) runs on CPU; switching the
    state before `prepare` lets a CPU run take the GPU path (DTensor parameters, sharded checkpoints).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    cpu = not torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "no" if cpu else "bf16"
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, step_scheduler_with_optimizer=False)
    fsdp_launch = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_launch and acc.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState() copies it on every call
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc


class Trainer:
    def __init__(self, cfg: TrainConfig, dump_first_grads: str | None = None):
        from accelerate.utils import set_seed

        self.cfg = cfg.validate()
        self.accelerator = make_accelerator(cfg.mixed_precision)
        set_seed(cfg.seed)
        self.out = Path(cfg.out)
        self.dump_first_grads = dump_first_grads
        from ..checkpoint import resolve

        student_dir = resolve(cfg.student)
        student = InfiniteVLForConditionalGeneration.from_pretrained(student_dir, dtype=torch.float32)
        self.processor = Processor.from_pretrained(student_dir, student.config)
        self.processor.frame_cache = {}  # stream frames are read again every epoch
        self.stage = make_stage(cfg)
        if cfg.stage == "sft-long":
            from .lora import add_adapters

            add_adapters(student, cfg.lora)
        else:
            select_trainable(student, cfg.trainable or DEFAULT_TRAINABLE[cfg.stage])
        student.language_model.gradient_checkpointing = cfg.gradient_checkpointing
        student.train()
        self.teacher = None
        if self.stage.needs_teacher:
            self.teacher = Teacher.load(cfg.teacher, dtype=torch.float32, device=self.accelerator.device)
        self.train_data, self.eval_data = build_datasets(cfg, self.processor, student.config)
        self.pad_id = student.config.pad_token_id if student.config.pad_token_id is not None else 0
        wrapped = StudentWithLoss(student, self.stage)
        optimizer = make_optimizer(wrapped, cfg)
        scheduler = cosine_schedule(optimizer, cfg)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(wrapped, optimizer, scheduler)
        self.step = 0
        self.metrics_path = self.out / "metrics.jsonl"

    @property
    def student(self) -> InfiniteVLForConditionalGeneration:
        return self.accelerator.unwrap_model(self.model).student

    # -- checkpoints ---------------------------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step:07d}"

    def save_checkpoint(self) -> Path:
        folder = self.checkpoint_dir(self.step)
        self.accelerator.save_state(str(folder))
        if self.accelerator.is_main_process:
            (folder / "trainer_state.json").write_text(
                json.dumps({"step": self.step, "config": to_dict(self.cfg)}, indent=2)
            )
            (self.out / "checkpoints" / "last").write_text(folder.name)
        self.accelerator.wait_for_everyone()
        return folder

    def try_resume(self) -> bool:
        pointer = self.out / "checkpoints" / "last"
        if not (self.cfg.resume and pointer.exists()):
            return False
        folder = self.out / "checkpoints" / pointer.read_text().strip()
        self.accelerator.load_state(str(folder))
        self.step = json.loads((folder / "trainer_state.json").read_text())["step"]
        return True

    # -- training ------------------------------------------------------------------------------------------------------
    def global_counts(self, batches: list[dict]) -> dict[str, float]:
        local: dict[str, float] = {}
        for b in batches:
            for k, v in self.stage.counts(b, self.student).items():
                local[k] = local.get(k, 0) + v
        keys = sorted(local)
        totals = torch.tensor([float(local[k]) for k in keys], device=self.accelerator.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        return dict(zip(keys, totals.tolist()))

    def train_step(self) -> dict:
        acc = self.accelerator
        batches = [
            to_device(b, acc.device)
            for b in micro_batches(
                self.cfg, self.train_data, self.step, acc.process_index, acc.num_processes, self.pad_id
            )
        ]
        counts = self.global_counts(batches)
        weights = self.stage.weights()
        sums_total = {k: 0.0 for k in weights}
        for m, batch in enumerate(batches):
            sync = nullcontext() if m == len(batches) - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                sums = self.model(batch, self.teacher)
                loss = sum(weights[k] * sums[k] * acc.num_processes / max(counts[k], 1.0) for k in weights)
            acc.backward(loss)
            for k in weights:
                sums_total[k] += float(sums[k].detach())
        if self.dump_first_grads and self.step == 0:
            self._dump_grads()
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = acc.clip_grad_norm_(params, self.cfg.optim.grad_clip) if self.cfg.optim.grad_clip else None
        reduced = acc.reduce(torch.tensor([sums_total[k] for k in weights], device=acc.device), reduction="sum")
        self._refuse_non_finite(dict(zip(weights, reduced.tolist())), grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # what this step uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: float(v) / max(counts[k], 1.0) for k, v in zip(weights, reduced.tolist())}
        out["loss"] = sum(weights[k] * out[k] for k in weights)
        out["lr"] = lr
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def _refuse_non_finite(self, sums: dict[str, float], grad_norm) -> None:
        """A NaN or infinite loss or gradient stops the run before the update: the weights stay those of the last
        finite step, and the checkpoints on disk are untouched (every rank sees the same reduced values)."""
        bad = {k: v for k, v in sums.items() if not math.isfinite(v)}
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            bad["grad_norm"] = float(grad_norm)
        if not bad:
            return
        self.optimizer.zero_grad(set_to_none=True)
        saved = sorted(self.out.glob("checkpoints/step-*"))
        where = f"the last checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
        raise FloatingPointError(
            f"training step {self.step + 1} of {self.cfg.stage}: "
            + ", ".join(f"{k} is {v}" for k, v in bad.items())
            + f"; no update was applied and {where}"
        )

    def _dump_grads(self) -> None:
        if self.accelerator.is_main_process:
            grads = {
                n: p.grad.detach().cpu().clone()
                for n, p in self.accelerator.unwrap_model(self.model).named_parameters()
                if p.grad is not None
            }
            torch.save(grads, self.dump_first_grads)

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self._tb.add_scalar(k, v, record["step"])

    def fit(self) -> dict:
        from tqdm import tqdm

        cfg, acc = self.cfg, self.accelerator
        resumed = self.try_resume()
        self._tb = None
        if cfg.tensorboard and acc.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            if not resumed:
                self.metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process, desc=cfg.stage, dynamic_ncols=True
        )
        if resumed:
            bar.write(f"resumed from step {self.step}")
        last: dict = {}
        t0 = time.perf_counter()
        while self.step < cfg.max_steps:
            last = self.train_step()
            self.step += 1
            last.update(step=self.step, elapsed=round(time.perf_counter() - t0, 3))
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.eval_data is not None:
                last.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.log(last)
            bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "lr", "grad_norm")})
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        self.export()
        return last

    def export(self) -> Path:
        """The result as a model folder (sft-long: the adapters; merge them with `infinitevl merge`)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.out / ("adapters" if self.cfg.stage == "sft-long" else "final")
        student = self.gathered_student()
        if acc.is_main_process:
            if self.cfg.stage == "sft-long":
                from .lora import save_adapters

                save_adapters(student, self.cfg.lora, final, self.cfg.student)
            else:
                student.save_pretrained(final)
                from .convert import PROCESSOR_FILES

                for fname in PROCESSOR_FILES:
                    src = Path(self.cfg.student) / fname
                    if src.exists():
                        shutil.copy(src, final / fname)
        acc.wait_for_everyone()
        return final

    def gathered_student(self) -> InfiniteVLForConditionalGeneration | None:
        """The student with whole tensors on the main process (None on the others), for writing it out.

        Under FSDP the parameters are shards (DTensors): every process takes part in gathering them, and the main
        process loads them into a copy built on the meta device (its non-persistent buffers stay there: the copy
        is for `state_dict`, not for running)."""
        acc = self.accelerator
        if not acc.is_fsdp2:
            return self.student
        state = acc.get_state_dict(self.model)  # a collective; full tensors on the main process only
        if not acc.is_main_process:
            return None
        with torch.device("meta"):
            copy = InfiniteVLForConditionalGeneration(self.student.config)
            if self.cfg.stage == "sft-long":
                from .lora import add_adapters

                add_adapters(copy, self.cfg.lora)
        copy.load_state_dict({k.removeprefix("student."): v for k, v in state.items()}, assign=True)
        copy.tie_weights()
        return copy

    @torch.no_grad()
    def evaluate(self) -> dict:
        from .evaluate import evaluate

        def run(student):
            return evaluate(
                student,
                self.eval_data,
                self.teacher,
                batch_size=self.cfg.batch_size,
                max_batches=self.cfg.eval_batches,
                pad_id=self.pad_id,
                device=self.accelerator.device,
            )

        student = self.student
        was_training = student.training
        student.eval()
        try:
            return self.model(call=run) if self.accelerator.is_fsdp2 else run(student)
        finally:
            student.train(was_training)
