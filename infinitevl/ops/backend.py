"""The one place that picks an implementation for the gated delta rule.

`torch` (this package's plain-PyTorch ops) runs everywhere and is the reference. `fla` (flash-linear-attention's
Triton kernels, see `fla_adapter.py`) is used when the tensors are on CUDA and the package is installed. Tests and
users can force either with `use_backend(...)` or the INFINITEVL_BACKEND environment variable.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from . import gated_delta

BACKENDS = ("auto", "torch", "fla")
_override: str | None = None


@functools.cache
def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside the block (`auto` restores the default choice)."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {list(BACKENDS)}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def select(device: torch.device) -> str:
    choice = _override or os.environ.get("INFINITEVL_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"INFINITEVL_BACKEND={choice!r} is not one of {list(BACKENDS)}")
    if choice == "auto":
        return "fla" if device.type == "cuda" and fla_installed() else "torch"
    if choice == "fla" and (device.type != "cuda" or not fla_installed()):
        raise RuntimeError("the fla backend needs a CUDA device and the flash-linear-attention package")
    return choice


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a sequence (shapes in `gated_delta.py`); returns (o, final fp32 state)."""
    if select(q.device) == "fla":
        from . import fla_adapter

        return fla_adapter.gated_delta_rule(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
    return gated_delta.gated_delta_rule_chunked(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, use_qk_l2norm=use_qk_l2norm
    )
