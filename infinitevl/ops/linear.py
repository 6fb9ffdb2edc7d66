"""Linear layers, with a decode fast path for few rows.

With one or a few rows (a decode step), a linear layer only streams its weight from memory. On CPU, torch's
matrix-vector path (MKL's GEMV) reaches about half the machine's bandwidth and falls further with 2-8 rows (measured
here: 23 GB/s for one row, 7 GB/s for three, against 45 GB/s for a plain sum). Viewing the weight [out, in] as two
halves [2, out/2, in] and multiplying them as one batched matrix product takes MKL's GEMM kernels instead, split
over the cores: 33-43 GB/s at one row, 20-24 GB/s at three. The result is the same product up to fp32 rounding
(the summation order differs). Large batches, small weights, autograd and GPUs use `F.linear` unchanged;
INFINITEVL_FAST_GEMV=0 turns the fast path off. The path is for fp32 only: in bf16, F.linear's own one-row product
is faster than the halves (measured on an AMD EPYC with avx512_bf16: 1.3 ms against 2.8 ms for 11008x2048, 4.3
against 9.4 for 2048x11008), and the fused kernels' dot products (ops/fused.py, CPUs with AVX512-BF16) faster still
(0.7 ms and 0.6 ms). Quantized layers have their own kernels (`quant.py`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import fused

MIN_ELEMENTS = 1 << 18  # below this the batched call's overhead outweighs the gain
MAX_ROWS = 16
_enabled = os.environ.get("INFINITEVL_FAST_GEMV", "1") != "0"


def fast_path_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes the batched-halves path for these operands."""
    return (
        _enabled
        and x.numel() // x.shape[-1] <= MAX_ROWS
        and weight.numel() >= MIN_ELEMENTS
        and weight.shape[0] % 2 == 0
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: bool = False
) -> torch.Tensor:
    """F.linear(x, weight, bias); for up to 16 rows and a large weight on CPU, as a batched product of halves (fp32)
    or, with `kernel` (the model decodes with the fused kernels, ops/fused.py), their bf16 product."""
    if kernel and fused.linear_applies(x, weight, MAX_ROWS):
        return torch.ops.infinitevl.linear_bf16(x, weight, bias)
    if not fast_path_applies(x, weight):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    out, inp = weight.shape
    flat = x.reshape(rows, inp).t().unsqueeze(0).expand(2, inp, rows)
    y = torch.bmm(weight.view(2, out // 2, inp), flat)  # [2, out/2, rows]
    y = y.reshape(out, rows).t().reshape(*x.shape[:-1], out)
    return y + bias if bias is not None else y


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) through `linear`. `kernel` is set by the model that holds the
    layer when it decides its decode path (`InfiniteVLTextModel.set_decode_path`)."""

    kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.kernel)
