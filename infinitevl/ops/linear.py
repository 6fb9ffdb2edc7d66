"""Linear layers, with a decode fast path: a matrix-vector product split across two cores.

With one or a few rows (a decode step), a linear layer only streams its weight from memory, and on CPU a single
matrix-vector kernel does not reach the machine's bandwidth (measured here: about 23 GB/s on one core, 30 to 50
GB/s with the output rows split between two). Large weights are therefore split in two row halves, one computed on a
helper thread, the other on the calling thread (torch releases the GIL inside its kernels). Results are identical:
every output element is the same dot product. Training, small weights, GPUs and single-threaded runs use
`F.linear` unchanged; INFINITEVL_SPLIT_GEMV=0 turns the fast path off.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_MIN_ELEMENTS = 2 << 20  # smaller weights lose more to the hand-off than they gain
MAX_ROWS = 8
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _helper() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infinitevl-gemv")
        return _pool


def split_enabled() -> bool:
    return os.environ.get("INFINITEVL_SPLIT_GEMV", "1") != "0" and torch.get_num_threads() > 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); for few rows and a large weight on CPU without autograd, in two halves."""
    rows = x.numel() // x.shape[-1]
    if (
        rows > MAX_ROWS
        or weight.numel() < SPLIT_MIN_ELEMENTS
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or not split_enabled()
        or threading.current_thread().name.startswith("infinitevl-gemv")
    ):
        return F.linear(x, weight, bias)
    half = weight.shape[0] // 2
    b1, b2 = (None, None) if bias is None else (bias[:half], bias[half:])
    first = _helper().submit(F.linear, x, weight[:half], b1)
    second = F.linear(x, weight[half:], b2)
    return torch.cat([first.result(), second], dim=-1)


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
