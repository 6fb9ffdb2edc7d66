"""LoRA adapters for the long-sequence stage (peft), their files, and folding them into a plain checkpoint.

Adapters go on the named linear layers of the decoder (never the vision tower). `save_adapters` writes only the
adapter tensors plus a JSON describing them; `merge` loads a base checkpoint, applies the adapters, folds them into
the weights (peft's own merge) and returns a model that `save_pretrained` writes in the official format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import LoraConfig

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STANDARD_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "g_proj",
    "a_proj",
    "b_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def _peft_config(cfg: LoraConfig, model) -> object:
    from peft import LoraConfig as PeftLoraConfig

    names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.language_model.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    # a model without GDN layers has no g_proj: standard names that are absent are skipped, others are errors
    unknown = [t for t in cfg.targets if t not in names and t not in STANDARD_TARGETS]
    targets = [t for t in cfg.targets if t in names]
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or cfg.targets} are not linear layers of the decoder; known: {names}")
    # only decoder layers: a regex over full module names keeps the vision tower out
    pattern = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + r")"
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern, bias="none")


def add_adapters(model, cfg: LoraConfig):
    """Inject LoRA layers in place; only their parameters require grad afterwards."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(_peft_config(cfg, model), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


def save_adapters(model, cfg: LoraConfig, folder: str | Path, base: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(folder / ADAPTER_FILE))
    (folder / ADAPTER_CONFIG).write_text(
        json.dumps(
            {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "targets": list(cfg.targets), "base": str(base)},
            indent=2,
        )
    )
    return folder


def load_adapters(model, folder: str | Path):
    """Inject adapters described in `folder` and load their weights (strictly)."""
    folder = Path(folder)
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    cfg = LoraConfig(r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"], targets=meta["targets"])
    add_adapters(model, cfg)
    weights = load_file(str(folder / ADAPTER_FILE))
    expected = set(adapter_state(model))
    if set(weights) != expected:
        raise ValueError(
            f"adapter file does not match: missing {sorted(expected - set(weights))[:5]}, "
            f"unexpected {sorted(set(weights) - expected)[:5]}"
        )
    model.load_state_dict(weights, strict=False)
    return model


@torch.no_grad()
def merge_adapters(model):
    """Fold every LoRA layer into its base weight and put the plain layer back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    model.requires_grad_(False)
    return model


def merge(base: str | Path, adapters: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    from ..model import InfiniteVLForConditionalGeneration

    model = InfiniteVLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    merge_adapters(load_adapters(model, adapters))
    out = model.save_pretrained(out, dtype=dtype)
    from .convert import PROCESSOR_FILES

    for fname in PROCESSOR_FILES:
        if (Path(base) / fname).exists() and not (out / fname).exists():
            (out / fname).write_bytes((Path(base) / fname).read_bytes())
    return out
