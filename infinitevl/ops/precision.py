"""`dtype="auto"`: the dtype a device runs this model fastest in, and why.

On a CPU, bf16 halves the bytes a decode step reads whatever the CPU, but bf16 matrix products are fast only with
bf16 instructions (AVX512-BF16, or AMX on recent Xeons); without them bf16 products are emulated and prefill and
the vision tower can run slower than in fp32. So `auto` is bf16 when the CPU reports `avx512_bf16` or `amx_bf16` (read from
/proc/cpuinfo, no timing at start-up), fp32 otherwise; on CUDA, bf16 where the GPU supports it. The choice and its
reason are returned for `--verbose` and the server's /health. This module only decides; it converts nothing.
"""

from __future__ import annotations

import functools

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def auto_dtype(device: str | torch.device = "cpu") -> tuple[torch.dtype, str]:
    """(dtype, reason) for `dtype="auto"` on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU supports bf16"
        return torch.float32, "auto: the GPU has no bf16 support"
    if device.type != "cpu":
        return torch.float32, f"auto: float32 on {device.type}"
    present = [f for f in BF16_FLAGS if f in cpu_flags()]
    if present:
        return torch.bfloat16, f"auto: the CPU has {' and '.join(present)} (bf16 matrix instructions)"
    return torch.float32, "auto: the CPU has no bf16 matrix instructions (no avx512_bf16 or amx_bf16)"


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> tuple[torch.dtype, str]:
    """A dtype, a dtype name, or "auto" -> (dtype, how it was chosen)."""
    if isinstance(dtype, torch.dtype):
        return dtype, "given"
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; known: auto, {', '.join(NAMES)}")
    return NAMES[dtype], "given"
