"""Training configuration: plain dataclasses, stored as YAML, overridable field by field from the command line.

    infinitevl sft --config configs/sft-tiny.yaml --set optim.lr=1e-4 --set data.pack=true

Unknown fields are rejected with the list of known ones. A config file's header comment shows the command that
runs it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

STAGES = ("distill-layer", "distill-e2e", "sft", "sft-long")
PARAM_GROUPS = ("gdn", "swa", "mlp", "norms", "embed", "vision", "merger", "all")


@dataclass
class DataConfig:
    train: str = ""  # .json / .jsonl conversations or a plain text file
    eval: str | None = None  # held-out file; or take `eval_fraction` of `train`
    eval_fraction: float = 0.0
    media_root: str | None = None  # where image/video paths are relative to (default: the data file's folder)
    max_length: int = 2048
    image_max_pixels: int = 512 * 512
    image_min_pixels: int = 56 * 56
    video_fps: float = 2.0
    video_max_frames: int = 16
    pack: bool = False  # several samples per row (sft, sft-long); distillation stages pad
    answer_only: bool = True  # labels on assistant turns only


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainConfig:
    stage: str = "sft"
    student: str = ""  # InfiniteVL folder (from `infinitevl convert` or a previous stage)
    teacher: str | None = None  # Qwen2.5-VL (or InfiniteVL) folder, for the distillation stages and eval
    out: str = "runs/train"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    trainable: list[str] | None = None  # parameter groups; default per stage (see stages.py)
    batch_size: int = 1  # per process, per micro-batch
    grad_accum: int = 1
    max_steps: int = 100
    seed: int = 0
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    eval_every: int = 0
    eval_batches: int = 8
    log_every: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA, none on CPU; or "no" / "bf16"
    temperature: float = 1.0  # distill-e2e
    kl_answer_only: bool = False  # distill-e2e: KL on answer tokens only
    layer_mse_weight: float = 0.0  # distill-e2e: add the layer-wise MSE term
    tensorboard: bool = False
    resume: bool = True  # continue from out/checkpoints/last when it exists

    def validate(self) -> TrainConfig:
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} unknown; known: {list(STAGES)}")
        if not self.student:
            raise ValueError("`student` (a model folder) is required")
        if self.stage.startswith("distill") and not self.teacher:
            raise ValueError(f"stage {self.stage} needs a `teacher` folder")
        if not self.data.train:
            raise ValueError("`data.train` (a data file) is required")
        bad = [g for g in (self.trainable or []) if g not in PARAM_GROUPS]
        if bad:
            raise ValueError(f"unknown parameter groups {bad}; known: {list(PARAM_GROUPS)}")
        if self.data.pack and self.stage.startswith("distill"):
            raise ValueError("packing is for sft / sft-long; distillation stages pad (the teacher cannot pack)")
        for name in ("batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        return self


def _coerce(kind, value: Any, where: str):
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        return tuple(_coerce(args[0], v, where) for v in value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [_coerce(args[0], v, where) for v in value]
    try:
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)  # YAML reads "3e-4" (no dot) as a string
        if kind is int and isinstance(value, str):
            return int(value)
    except ValueError as err:
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}") from err
    if kind in (int, str, bool) and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def from_dict(cls, raw: dict, where: str = "config"):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in raw.items()})


def apply_override(raw: dict, assignment: str) -> None:
    """`a.b=value` (value parsed as YAML) into a nested dict, checking the path against TrainConfig."""
    key, sep, value = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. optim.lr=1e-4")
    path = key.strip().split(".")
    cls: Any = TrainConfig
    node = raw
    for i, part in enumerate(path):
        names = {f.name: f for f in fields(cls)}
        if part not in names:
            prefix = ".".join(path[:i]) or "top level"
            raise ValueError(f"--set {key}: no field {part!r} in {prefix}; known: {sorted(names)}")
        hint = typing.get_type_hints(cls)[part]
        if i == len(path) - 1:
            node[part] = yaml.safe_load(value)
        else:
            if not dataclasses.is_dataclass(hint):
                raise ValueError(f"--set {key}: {part} is not a section")
            node = node.setdefault(part, {})
            cls = hint


def load_config(path: str | Path | None, overrides: list[str] = (), **fixed) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no config file at {path}")
        raw = yaml.safe_load(path.read_text()) or {}
    raw.update({k: v for k, v in fixed.items() if v is not None})
    for assignment in overrides:
        apply_override(raw, assignment)
    return from_dict(TrainConfig, raw).validate()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
