"""Checkpoint files: the official names on disk <-> module names in memory, strict loading, sharding, tied head.

On disk (written by transformers for the official class) the legacy spelling is used: `visual.*`, `model.layers.*`,
`model.embed_tokens.weight`, `model.norm.weight`; in memory the newer one: `model.visual.*`,
`model.language_model.*`. Both are read. Loading is strict: a missing, unexpected or wrongly shaped tensor raises a
`CheckpointError` naming them. `lm_head.weight` is usually absent because it is tied to the embeddings.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import InfiniteVLConfig

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"
EMBED = "model.language_model.embed_tokens.weight"
T = TypeVar("T")


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


def _each_tensor(folder: Path, read: Callable[[Any, str, Path], T]) -> dict[str, T]:
    """`read(handle, on-disk key, file)` of every tensor of a checkpoint, under in-memory names. A tensor spelled
    both ways is an error, and so is a file that cannot be read."""
    out: dict[str, T] = {}
    seen: dict[str, str] = {}
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    name = to_memory_name(key)
                    if name in seen:
                        raise CheckpointError(f"{key} ({file.name}) and {seen[name]} are the same tensor spelled twice")
                    seen[name] = f"{key} ({file.name})"
                    out[name] = read(f, key, file)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"cannot read {file}: {err}") from err
    return out


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint under their in-memory names (either spelling accepted, not both at once)."""
    return _each_tensor(folder, lambda f, key, file: f.get_tensor(key))


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


def tensor_shapes(folder: Path) -> dict[str, tuple[torch.Tensor, Path, str]]:
    """Every tensor of a checkpoint as a meta tensor of its shape and dtype (nothing read but the headers), with
    the file and on-disk key it comes from, under in-memory names (either spelling, not both at once)."""

    def header(f, key: str, file: Path) -> tuple[torch.Tensor, Path, str]:
        part = f.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(part.get_dtype())
        if dtype is None:
            raise CheckpointError(f"{key} ({file.name}) has dtype {part.get_dtype()}, not supported")
        return torch.empty(part.get_shape(), dtype=dtype, device="meta"), file, key

    return _each_tensor(folder, header)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    # One open per tensor: safetensors maps the file, and every page read stays in the process's resident memory
    # until the mapping closes. Reopening keeps a multi-GB shard from ever being resident at once.
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key)
    except Exception as err:
        raise CheckpointError(f"cannot read {key} from {file}: {err}") from err


def quantization_of(config: InfiniteVLConfig, quantize, group_size: int | None, embeddings: str | None):
    """The quantization to load with: the folder's own (config.json `quantization_config`) or the one asked for;
    a folder already quantized loads only as what it is."""
    from .ops.quant import QuantConfig, QuantizationError

    raw = config.extra.get("quantization_config")
    try:
        stored = QuantConfig.from_json(raw) if raw is not None else None
        if quantize is None or isinstance(quantize, QuantConfig):
            asked = quantize
        else:
            asked = QuantConfig(quantize, group_size, embeddings or "int8")
    except QuantizationError as err:
        raise CheckpointError(str(err)) from err
    if stored is not None and asked is not None and asked != stored:
        raise CheckpointError(
            f"this folder holds weights quantized as {stored.describe()}; it cannot be loaded as "
            f"{asked.describe()} (quantize the original checkpoint instead)"
        )
    return stored, (asked or stored)


def load_pretrained(
    cls,
    path,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    quantize=None,
    group_size: int | None = None,
    embeddings: str | None = None,
    **config_overrides,
):
    """Build the model on the meta device, check the file's names and shapes strictly, then read it one tensor at
    a time, converting (or quantizing) each tensor as it arrives: peak memory is the loaded model plus one tensor."""
    folder = resolve(path)
    config = InfiniteVLConfig.from_file(folder)
    if config_overrides:
        config = config.replace(**config_overrides)
    stored, target = quantization_of(config, quantize, group_size, embeddings)
    if target is not None and torch.device(device).type != "cpu":
        raise CheckpointError(f"int8 / int4 weights run on torch's CPU kernels: load them on cpu, not {device}")
    found = tensor_shapes(folder)
    with torch.device("meta"):
        model = cls(config)
    if stored is not None:
        model.quantize(stored, _keep=stored.modules_to_not_convert)  # meta: swaps modules, computes nothing
    metas = check_and_tie(model, {k: v[0] for k, v in found.items()}, config.text.tie_word_embeddings)
    if target is not None and stored is None:
        model.quantize(target)
    from .ops.quant import quantize_for

    owners = _quantized_owners(model)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name in sorted(metas, key=lambda n: (str(found[n][1]), n)):
        meta, file, key = found[name]
        prefix, _, leaf = name.rpartition(".")
        owner = owners.get(prefix)
        if owner is None or leaf == "bias":
            # always a copy in the process's own memory: a tensor left on safetensors' file mapping is paged in on
            # first use, dropped and read back from disk when memory is short, and streamed about 20% slower by a
            # decode step (measured: 4B in bf16, 322-332 ms per token mapped, 266-272 ms copied)
            tensor = _read_tensor(file, key)
            _assign(model, name, tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone())
        elif stored is None:  # a float weight of a layer quantized while loading
            owner.set_portable(quantize_for(owner, _read_tensor(file, key)))
            release_freed_memory()
        else:  # one piece of a stored quantized weight; set when all of its pieces are read
            if leaf == "weight" and meta.dtype not in (torch.int8, torch.uint8):
                raise CheckpointError(
                    f"{to_disk_name(name)} is {meta.dtype} in a quantized folder: expected int8/uint8"
                )
            pieces = pending.setdefault(prefix, {})
            pieces[leaf] = _read_tensor(file, key)
            if len(pieces) == len(owner.portable_keys()):
                owner.set_portable(pending.pop(prefix))
    model.tie_weights()
    for module in owners.values():
        if hasattr(module, "dtype"):  # a quantized embedding's lookups come out in the model's dtype
            module.dtype = dtype
    from .model.vision import reset_rotary

    reset_rotary(model.model.visual)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{len(left)} tensors were not loaded: {', '.join(left[:20])}")
    model.source_folder = folder
    return model.to(device=device).eval()


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc). Quantizing while loading frees a tensor's temporaries between
    long-lived results on the heap; without this the holes stay resident and the process's peak grows by several
    times the model (measured: 530 MiB instead of 130 MiB for a 97 MiB int4 model)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _quantized_owners(model: torch.nn.Module) -> dict:
    from .ops.quant import QuantizedEmbedding, QuantizedLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put a loaded tensor in place of a meta parameter or buffer (as load_state_dict(assign=True) does)."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise CheckpointError(f"{to_disk_name(name)} has no place in the model")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"cannot read size {size!r} (use e.g. '5GB', '500MB' or a byte count)")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file with the permissions of any other file the user writes (safetensors makes it 0600)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    try:  # Linux says it without changing it (os.umask would, for a moment, in every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_pretrained(model, path, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> Path:
    """Official format: config.json (flat), legacy key names, lm_head omitted when tied, shards above the limit."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    state = model.state_dict()
    if model.config.text.tie_word_embeddings:
        state.pop(LM_HEAD, None)
    quantized = getattr(model, "quantization", None) is not None

    def cast(key: str, v: torch.Tensor) -> torch.Tensor:
        # a quantized model's scales and zeros are part of its integer weights: kept as they are
        keep = quantized and key.endswith((".weight_scale", ".weight_zero"))
        return v.to(dtype) if dtype is not None and v.is_floating_point() and not keep else v

    tensors = {to_disk_name(k): cast(k, v).detach().contiguous().cpu() for k, v in state.items()}
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
        write_tensors(shards[0], folder / WEIGHTS)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_tensors(shard, folder / name)
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
