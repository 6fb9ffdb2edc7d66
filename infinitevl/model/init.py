"""A random initialisation in which every parameter visibly matters, as the official fixture was made: for tests,
stand-in teachers and benchmarks, where the usual std-0.02 init gives near-uniform, uninformative outputs."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def spread_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Linear / conv weights N(0, 1/fan_in), embeddings N(0, 0.4^2), norm weights 1 + N(0, 0.15^2), biases
    N(0, 0.1^2), GDN decay parameters spread over slow and fast heads, short-conv kernels N(0, 0.5^2). Works on
    InfiniteVL and transformers' Qwen2.5-VL alike (by parameter name)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("A_log"):
            value = torch.empty(p.shape).uniform_(0.3, 4.0, generator=gen).log()
        elif name.endswith("dt_bias"):
            value = torch.randn(p.shape, generator=gen) * 0.8 - 2.0
        elif "conv1d" in name:
            value = torch.randn(p.shape, generator=gen) * 0.5
        elif p.dim() == 1 and ("norm" in name or "ln_q" in name):
            value = 1 + torch.randn(p.shape, generator=gen) * 0.15
        elif p.dim() == 1:
            value = torch.randn(p.shape, generator=gen) * 0.1
        elif "embed_tokens" in name:
            value = torch.randn(p.shape, generator=gen) * 0.4
        else:
            value = torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:]))
        p.copy_(value)
    return model
