"""Checkpoint files: the official names on disk <-> module names in memory, strict loading, sharding, tied head.

On disk (written by transformers for the official class) the legacy spelling is used: `visual.*`, `model.layers.*`,
`model.embed_tokens.weight`, `model.norm.weight`; in memory the newer one: `model.visual.*`,
`model.language_model.*`. Both are read. Loading is strict: a missing, unexpected or wrongly shaped tensor raises a
`CheckpointError` naming them. `lm_head.weight` is usually absent because it is tied to the embeddings.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import InfiniteVLConfig

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"
EMBED = "model.language_model.embed_tokens.weight"


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model: lists the offending tensors by name."""


def to_memory_name(key: str) -> str:
    """Any accepted spelling -> the in-memory name."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key[len("model.") :]
    return key


def to_disk_name(key: str) -> str:
    """In-memory name -> the legacy spelling the official class writes."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def resolve(path: str | Path) -> Path:
    """A local folder, or a hub id resolved through huggingface_hub (cache or network, as its settings allow)."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{path} is a file; give the folder that holds config.json and the weights")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
            )
        except Exception as err:
            raise CheckpointError(
                f"{path} is not a local folder and could not be resolved on the hub "
                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {err}"
            ) from err
    raise CheckpointError(f"no model folder at {path}")


def weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX).exists():
        index = json.loads((folder / INDEX).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointError(f"{folder / INDEX} lists shard files that are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    if (folder / WEIGHTS).exists():
        return [folder / WEIGHTS]
    raise CheckpointError(f"{folder} has neither {WEIGHTS} nor {INDEX}")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint under their in-memory names (either spelling accepted, not both at once)."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    name = to_memory_name(key)
                    if name in tensors:
                        raise CheckpointError(
                            f"{key} ({file.name}) and {origin[name]} are the same tensor spelled twice"
                        )
                    tensors[name] = f.get_tensor(key)
                    origin[name] = f"{key} ({file.name})"
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"cannot read {file}: {err}") from err
    return tensors


def check_and_tie(model: torch.nn.Module, tensors: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Strict comparison with the model's parameters; returns the tensors to load (lm_head handled)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if tied:
        expected.pop(LM_HEAD, None)
        head = tensors.pop(LM_HEAD, None)
        if head is not None and EMBED in tensors and head.shape != tensors[EMBED].shape:
            raise CheckpointError(
                f"{LM_HEAD} has shape {tuple(head.shape)} but is tied to {EMBED} {tuple(tensors[EMBED].shape)}"
            )
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k} (file {tuple(tensors[k].shape)}, model {tuple(expected[k])})"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or wrong:
        parts = []
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if names:
                shown = ", ".join(to_disk_name(n) if title != "wrong shape" else n for n in names[:20])
                more = f" and {len(names) - 20} more" if len(names) > 20 else ""
                parts.append(f"{len(names)} {title}: {shown}{more}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    return tensors


def load_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", **config_overrides):
    folder = resolve(path)
    config = InfiniteVLConfig.from_file(folder)
    if config_overrides:
        config = config.replace(**config_overrides)
    tensors = read_weights(folder)
    with torch.device("meta"):
        model = cls(config)
    tensors = check_and_tie(model, tensors, config.text.tie_word_embeddings)
    tensors = {k: v.to(dtype=dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=not config.text.tie_word_embeddings, assign=True)
    model.tie_weights()
    from .model.vision import reset_rotary

    reset_rotary(model.model.visual)
    model.source_folder = folder
    return model.to(device=device).eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"cannot read size {size!r} (use e.g. '5GB', '500MB' or a byte count)")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_pretrained(model, path, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> Path:
    """Official format: config.json (flat), legacy key names, lm_head omitted when tied, shards above the limit."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    state = model.state_dict()
    if model.config.text.tie_word_embeddings:
        state.pop(LM_HEAD, None)
    tensors = {
        to_disk_name(k): (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in state.items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    for stale in [folder / WEIGHTS, folder / INDEX, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            for key, t in shard.items():
                weight_map[key] = name
                total += t.numel() * t.element_size()
        (folder / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
        )
    config = model.config
    if dtype is not None:
        config.torch_dtype = str(dtype).replace("torch.", "")
    config.save(folder)
    return folder
