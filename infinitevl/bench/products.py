"""The matrix products of one step, timed alone (the floor of a part), and a probe of those same products in fp32,
bf16 and int8 x int8, for the real-size streaming section (bench/stream4b.py).

`record` hooks the modules that are matrix products (linear layers, quantized or not, the LM head and the tower's
patch-embedding convolution) and keeps each call's module and input shape, in order; `replay` calls the same modules
on random inputs of those shapes (so the same kernels: oneDNN bf16, the int8 / int4 packed kernels). `probe` times
each recorded product as a plain matrix product in three ways:

    fp32   F.linear on fp32 activations and weights (MKL)
    bf16   F.linear on bf16 activations and weights (oneDNN)
    int8   torch._int_mm: activations quantized per row at run time (symmetric, scale = max |x| / 127), weights
           per output channel ahead of time; the quantization of the activations and the dequantization of the
           int32 result are inside the timed call

and `tower_agreement` runs the tower in fp32, bf16 and with its linear layers swapped for the int8 x int8 products
(`Int8DynamicLinear`, in a copy; the patch embedding stays bf16) on one frame, giving the cosine similarity per
token against fp32. Nothing here is an inference path: the int8 products exist to measure whether one would pay.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .timing import measure, summary

Call = tuple[nn.Module, torch.Size, torch.dtype]


def _kinds() -> tuple[type, ...]:
    from ..ops.quant import QuantizedLinear, TiedQuantizedHead

    return (nn.Linear, nn.Conv3d, QuantizedLinear, TiedQuantizedHead)


def product_modules(model) -> tuple[list[nn.Module], list[nn.Module]]:
    """The tower's and the decoder's modules that are matrix products (the decoder's with the LM head)."""
    kinds = _kinds()
    tower = [m for m in model.model.visual.modules() if isinstance(m, kinds)]
    decoder = [m for m in model.model.language_model.modules() if isinstance(m, kinds)]
    return tower, [*decoder, model.lm_head]


def record(modules: list[nn.Module]) -> tuple[list[Call], list]:
    """Forward hooks that record, in call order, each module and the shape and dtype of its input."""
    calls: list[Call] = []

    def hook(m, args, out):
        calls.append((m, args[0].shape, args[0].dtype))

    return calls, [m.register_forward_hook(hook) for m in modules]


def replay(calls: list[Call], repeats: int) -> dict[str, Any]:
    """The recorded products alone: each module on a random input of the shape it saw, in order."""
    inputs = [torch.randn(shape).to(dtype) for _, shape, dtype in calls]

    def run():
        for (m, _, _), x in zip(calls, inputs):
            m(x)

    return {"calls": len(calls), **measure(run, repeats, warmup=1)}


def signature(calls: list[Call]) -> tuple:
    """What a replay depends on: the modules and their input shapes (two streams with equal signatures have the same
    floor)."""
    return tuple((id(m), tuple(shape), dtype) for m, shape, dtype in calls)


# -- int8 x int8 products -----------------------------------------------------------------------------------------------
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (int8 [M, K], scale [M, 1] fp32): symmetric per row."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min_(1e-8).div_(127)
    return (x.float() / scale).round_().clamp_(-127, 127).to(torch.int8), scale  # x itself is left as it was


def int8_matmul(x: torch.Tensor, qweight_t: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float, qweight_t [K, N] int8 (quantize_rows of the weight, transposed), weight_scale [1, N] ->
    [M, N] in x's dtype: the activations quantized per row here, an int32 product, dequantized."""
    q, scale = quantize_rows(x)
    return torch._int_mm(q, qweight_t).float().mul_(scale).mul_(weight_scale).to(x.dtype)  # in place: [M, N] is big


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [K, N] contiguous, scale [1, N]): per output channel."""
    q, scale = quantize_rows(weight)
    return q.t().contiguous(), scale.view(1, -1)


class Int8DynamicLinear(nn.Module):
    """A linear layer computed as `int8_matmul` (int8 activations quantized per row at run time x int8 weights)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.qweight_t, self.weight_scale = quantize_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x.reshape(-1, x.shape[-1]), self.qweight_t, self.weight_scale)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


def weight_of(m: nn.Module) -> torch.Tensor:
    """The [N, K] float weight a product module multiplies by (a convolution over whole patches is one)."""
    from ..ops.quant import QuantizedLinear, TiedQuantizedHead

    if isinstance(m, QuantizedLinear):
        return m.dequantized()
    if isinstance(m, TiedQuantizedHead):
        e = m.embedding
        return e.qweight.to(torch.bfloat16) * e.scales.to(torch.bfloat16).unsqueeze(1)
    return m.weight.detach().reshape(m.weight.shape[0], -1)


def _forms(w: torch.Tensor) -> dict[str, tuple]:
    """One weight [N, K] (fp32) as the three products: name -> (function of x, x's dtype, K)."""
    w16, (qw, scale) = w.bfloat16(), quantize_weight(w)
    return {
        "fp32": (lambda x: F.linear(x, w), torch.float32, w.shape[1]),
        "bf16": (lambda x: F.linear(x, w16), torch.bfloat16, w.shape[1]),
        "int8": (lambda x: int8_matmul(x, qw, scale), torch.bfloat16, w.shape[1]),
    }


def probe(calls: list[Call], repeats: int) -> dict[str, Any]:
    """Each recorded product as fp32, bf16 and int8 x int8 matrix products, each call timed `repeats` times after
    a warm-up call; `times_s[i]` is the i-th repeats summed over the calls (one step's products)."""
    per: dict[str, list[list[float]]] = {k: [] for k in ("fp32", "bf16", "int8")}
    by_module: dict[int, list[torch.Size]] = {}
    modules = {}
    for m, shape, _ in calls:
        by_module.setdefault(id(m), []).append(shape)
        modules[id(m)] = m
    for key, shapes in by_module.items():
        forms = _forms(weight_of(modules[key]).float())  # one module at a time: the fp32 decoder is 16 GB
        for shape in shapes:
            rows = shape[0] if isinstance(modules[key], nn.Conv3d) else int(torch.Size(shape[:-1]).numel())
            x = torch.randn(rows, forms["fp32"][2])
            for name, (fn, dtype, _) in forms.items():
                a = x.to(dtype)
                per[name].append(measure(lambda fn=fn, a=a: fn(a), repeats, warmup=1)["times_s"])
        del forms
    out = {name: summary([sum(t[i] for t in times) for i in range(repeats)]) for name, times in per.items()}
    for name in out:
        out[name]["calls"] = len(calls)
    return out


def cosine_per_token(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """min and mean over tokens of the cosine similarity of rows a[i] and b[i] (computed in fp32)."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"min": float(cos.min()), "mean": float(cos.mean()), "tokens": int(cos.numel())}


@torch.inference_mode()
def tower_agreement(tower: nn.Module, pixels: torch.Tensor, grid: torch.Tensor) -> dict[str, Any]:
    """The tower's features on one frame in fp32 (a copy), in its own dtype (bf16) and with int8 x int8 linear
    layers (a copy): cosine similarity per token against fp32."""
    from ..model.vision import encode

    reference = encode(copy.deepcopy(tower).float(), pixels, grid)
    out = {"bf16": cosine_per_token(encode(tower, pixels, grid), reference)}
    int8 = copy.deepcopy(tower)
    swapped = 0
    for parent in list(int8.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8DynamicLinear(child))
                swapped += 1
    out["int8"] = {**cosine_per_token(encode(int8, pixels, grid), reference), "linears": swapped}
    return out
