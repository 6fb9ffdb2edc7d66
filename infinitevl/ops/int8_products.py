"""int8 x int8 matrix products for many rows at once (a prefill's tokens, the vision tower's patches), on oneDNN's
quantized linear kernel (`torch.ops.onednn.qlinear_pointwise`).

    weight       quantized once, one scale per output channel, symmetric:  W ~ qw * sw   qw in [-L, L]
    activations  quantized per call, one scale per row, symmetric:         x ~ qx * sx   qx in [-127, 127]
                 (held as uint8 with zero point 128, the kernel's input)
    product      int32 sums of qx * qw, then y = sx * sw * sum (+ bias), in fp32, cast to the input's dtype

Only calls with at least `min_rows` rows take this path; fewer rows (a decode step, a small batch of them) run the
layer as before on its own weights, so decode is unchanged bit for bit. The packed int8 weight is an extra copy (one
byte per weight) beside the layer's own.

L is 127 where the CPU multiplies uint8 by int8 without intermediate saturation (VNNI, AMX-INT8) and 63 elsewhere:
without VNNI, oneDNN adds pairs of uint8 x int8 products in int16 (vpmaddubsw), and 2 x 255 x 127 > 32767. Which
holds is found by a probe (`saturates`: one product whose exact answer needs the full range), not by CPU flags.

Whether the int8 products are faster than the float ones is also a probe (`speedup`: one product of a prefill's
shape, both ways, on this CPU). What they cost in accuracy is measured by the benchmark (the tower's features per
token and the bundled model's answers against fp32; docs/benchmarks.md) and by the tests against an exact integer
reference. This module swaps nothing by itself; `enable` is called by the model (`use_int8_products`).
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from .quant import QuantizedLinear

DEFAULT_MIN_ROWS = 32  # the server batches decode steps of up to 8-16 sessions: those stay on the float path
MODES = ("off", "on", "auto")
AUTO_SPEEDUP = 1.2  # `auto` takes the int8 products when the probe finds them at least this much faster
ZERO_POINT = 128


class Int8ProductsError(ValueError):
    """A setting of the int8 products, or a layer or device they cannot serve."""


def available() -> bool:
    return hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available()


# -- the kernel and its probes -----------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (int8 [N, K] in [-levels, levels], fp32 scale [N]): one symmetric scale per row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min_(1e-12).div_(levels)
    return (w / scale.unsqueeze(1)).round_().clamp_(-levels, levels).to(torch.int8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (uint8 [M, K] = round(x / s) + 128, fp32 scale s [M, 1]): symmetric per row."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min_(1e-12).div_(127)
    q = x.float().div_(scale) if x.dtype != torch.float32 else x / scale  # |x / s| <= 127: no clamp needed
    return q.round_().add_(ZERO_POINT).to(torch.uint8), scale


class PackedWeight:
    """One weight, quantized and packed for the kernel; `__call__` is the product with a float [M, K]."""

    def __init__(self, weight: torch.Tensor, levels: int):
        qweight, self.scale = quantize_weight(weight, levels)
        self.out_features, self.in_features = qweight.shape
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, [1, self.in_features])
        self.zeros = torch.zeros(self.out_features, dtype=torch.long)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float -> [M, N] fp32 (no bias): the activations' scale is applied after the int32 product."""
        q, row_scale = quantize_rows(x)
        y = torch.ops.onednn.qlinear_pointwise(
            q, 1.0, ZERO_POINT, self.packed, self.scale, self.zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
        return y.mul_(row_scale)


@functools.cache
def saturates() -> bool:
    """Whether this CPU's kernel saturates on full-range int8 weights: every activation at +127 (uint8 255) times
    every weight at +127; the exact answer is K x 127 x 127 x the scales."""
    K = 64
    probe = PackedWeight(torch.ones(16, K), 127)
    got = probe(torch.ones(1, K))
    return not torch.allclose(got, torch.full_like(got, float(K)), rtol=1e-5)


@functools.cache
def weight_levels() -> int:
    return 63 if saturates() else 127


def speedup(dtype: torch.dtype, rows: int = 256, width: int = 2048, repeats: int = 3) -> float:
    """The float product's time over the int8 product's (quantization of the activations included), one prefill-
    shaped product [rows, width] x [width, 4 * width] on this CPU, best of `repeats`."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4 * width, width, generator=gen).div_(width**0.5).to(dtype)
    x = torch.randn(rows, width, generator=gen).to(dtype)
    packed = PackedWeight(weight, weight_levels())

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(lambda: F.linear(x, weight)) / best(lambda: packed(x))


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise Int8ProductsError(f"int8 products: unknown mode {mode!r}; known: {', '.join(MODES)}")


def decide(mode: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(use them, why) for a mode of `MODES` and the model's dtype and device."""
    check_mode(mode)
    if mode == "off":
        return False, "off"
    problem = None
    if torch.device(device).type != "cpu":
        problem = f"they run on the CPU only (the model is on {device})"
    elif not available():
        problem = "this torch build has no oneDNN quantized linear (torch.ops.onednn.qlinear_prepack)"
    if problem is not None:
        if mode == "on":
            raise Int8ProductsError(f"int8 products: {problem}")
        return False, f"auto: not used, {problem}"
    bits = "8-bit weights" if weight_levels() == 127 else "7-bit weights (the CPU's int8 products saturate)"
    if mode == "on":
        return True, f"on; {bits}"
    gain = speedup(dtype)
    dtype_name = str(dtype).replace("torch.", "")
    if gain >= AUTO_SPEEDUP:
        return True, f"auto: {gain:.2f}x faster than {dtype_name} products on this CPU (probe); {bits}"
    return False, f"auto: not used, {gain:.2f}x {dtype_name} products on this CPU (probe; needs {AUTO_SPEEDUP}x)"


# -- the layers ----------------------------------------------------------------------------------------------------------
class _Int8Rows:
    """Mixed into a linear layer's class by `enable`: calls with many rows go through `int8_packed`."""

    int8_packed: PackedWeight
    int8_min_rows: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows < self.int8_min_rows or x.requires_grad:
            return super().forward(x)
        y = self.int8_packed(x.reshape(rows, x.shape[-1]))
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


SERVED = (nn.Linear, QuantizedLinear)  # and their subclasses (the decoder's `ops.linear.Linear`)


@functools.cache
def _with_int8_rows(cls: type) -> type:
    """`cls` with the int8 path mixed in (the same parameters, buffers and state dict keys)."""
    return type(f"Int8Rows{cls.__name__}", (_Int8Rows, cls), {})


def float_weight(layer: nn.Module) -> torch.Tensor:
    return layer.dequantized(torch.float32) if isinstance(layer, QuantizedLinear) else layer.weight.detach().float()


def enable(layers: list[nn.Module], min_rows: int = DEFAULT_MIN_ROWS) -> int:
    """Give each layer (nn.Linear or QuantizedLinear, on the CPU) the int8 path for calls of `min_rows` rows or
    more. Parameters, buffers and state dict keys are unchanged. Returns how many layers were given it."""
    if min_rows < 1:
        raise Int8ProductsError(f"int8 products: min_rows must be >= 1 (got {min_rows})")
    levels = weight_levels()
    for layer in layers:
        if not isinstance(layer, SERVED):
            raise Int8ProductsError(f"int8 products: {type(layer).__name__} is not a linear layer they can serve")
        held = layer.qweight if isinstance(layer, QuantizedLinear) else layer.weight
        if held.device.type != "cpu":  # checked on the held tensor: dequantizing here would do the work twice
            raise Int8ProductsError("int8 products: the layers must be on the CPU")
    for layer in layers:
        layer.int8_packed = PackedWeight(float_weight(layer), levels)
        layer.int8_min_rows = min_rows
        if not isinstance(layer, _Int8Rows):
            layer.__class__ = _with_int8_rows(type(layer))
    return len(layers)


def disable(module: nn.Module) -> int:
    """Undo `enable` on every layer under `module`; returns how many were restored."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, _Int8Rows):
            layer.__class__ = type(layer).__bases__[1]
            del layer.int8_packed, layer.int8_min_rows
            count += 1
    return count


def packed_bytes(module: nn.Module) -> int:
    """The extra bytes the packed int8 weights under `module` hold."""
    return sum(
        m.int8_packed.out_features * m.int8_packed.in_features for m in module.modules() if isinstance(m, _Int8Rows)
    )
