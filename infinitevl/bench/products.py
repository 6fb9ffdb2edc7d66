"""The matrix products of one step, timed alone (the floor of a part), and a probe of those same products in fp32,
bf16 and int8 x int8, for the real-size streaming section (bench/stream4b.py).

`record` hooks the modules that are matrix products (linear layers, quantized or not, the LM head and the tower's
patch-embedding convolution) and keeps each call's module and input shape, in order; `replay` calls the same modules
on random inputs of those shapes (so the same kernels: oneDNN bf16, the int8 / int4 packed kernels). `probe` times
each recorded product as a plain matrix product in three ways:

    fp32   F.linear on fp32 activations and weights (MKL)
    bf16   F.linear on bf16 activations and weights (oneDNN)
    int8   the int8 x int8 products of `--int8-products` (ops/int8_products.py: oneDNN's quantized linear,
           activations quantized per row at run time, weights per output channel ahead of time); the quantization
           of the activations and the scaling of the int32 result are inside the timed call

bf16 is timed only where the CPU has bf16 instructions (elsewhere oneDNN emulates it, several times slower than fp32,
and a step's products would take minutes). `tower_agreement` runs the tower in fp32, in its own dtype and with the
int8 products (in copies) on one frame, giving the cosine similarity per token against fp32.
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


def weight_of(m: nn.Module) -> torch.Tensor:
    """The [N, K] float weight a product module multiplies by (a convolution over whole patches is one)."""
    from ..ops.quant import QuantizedLinear, TiedQuantizedHead

    if isinstance(m, QuantizedLinear):
        return m.dequantized()
    if isinstance(m, TiedQuantizedHead):
        e = m.embedding
        return e.qweight.to(torch.bfloat16) * e.scales.to(torch.bfloat16).unsqueeze(1)
    return m.weight.detach().reshape(m.weight.shape[0], -1)


def _forms(w: torch.Tensor, bf16: bool) -> dict[str, tuple]:
    """One weight [N, K] (fp32) as the products: name -> (function of x, x's dtype, K)."""
    from ..ops.int8_products import PackedWeight, weight_levels

    packed = PackedWeight(w, weight_levels())
    forms = {"fp32": (lambda x: F.linear(x, w), torch.float32, w.shape[1])}
    if bf16:
        w16 = w.bfloat16()
        forms["bf16"] = (lambda x: F.linear(x, w16), torch.bfloat16, w.shape[1])
    forms["int8"] = (packed, torch.float32, w.shape[1])
    return forms


def bf16_instructions() -> bool:
    from ..ops.precision import BF16_FLAGS, cpu_flags

    return any(f in cpu_flags() for f in BF16_FLAGS)


def probe(calls: list[Call], repeats: int, bf16: bool | None = None) -> dict[str, Any]:
    """Each recorded product as fp32, bf16 (by default where the CPU has bf16 instructions) and int8 x int8 matrix
    products, each call timed `repeats` times after a warm-up call; `times_s[i]` is the i-th repeats summed over the
    calls (one step's products)."""
    bf16 = bf16_instructions() if bf16 is None else bf16
    per: dict[str, list[list[float]]] = {k: [] for k in ("fp32", "bf16", "int8") if k != "bf16" or bf16}
    by_module: dict[int, list[torch.Size]] = {}
    modules = {}
    for m, shape, _ in calls:
        by_module.setdefault(id(m), []).append(shape)
        modules[id(m)] = m
    for key, shapes in by_module.items():
        forms = _forms(weight_of(modules[key]).float(), bf16)  # one module at a time: the fp32 decoder is 16 GB
        for shape in shapes:
            rows = shape[0] if isinstance(modules[key], nn.Conv3d) else int(torch.Size(shape[:-1]).numel())
            x = torch.randn(rows, forms["fp32"][2])
            for name, (fn, dtype, _) in forms.items():
                a = x.to(dtype)
                if name == "int8":
                    a = a.view(rows, -1)
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
    """The tower's features on one frame in fp32 (a copy), in its own dtype and with the int8 products on every
    linear layer (a copy of the tower in its own dtype; the patch embedding keeps it): cosine similarity per token
    against fp32."""
    from ..model.vision import encode
    from ..ops import int8_products

    reference = encode(copy.deepcopy(tower).float(), pixels, grid)
    dtype = str(next(tower.parameters()).dtype).replace("torch.", "")
    out = {"dtype": dtype, "own": cosine_per_token(encode(tower, pixels, grid), reference)}
    int8 = copy.deepcopy(tower)
    swapped = int8_products.enable([m for m in int8.modules() if isinstance(m, nn.Linear)], min_rows=1)
    out["int8"] = {**cosine_per_token(encode(int8, pixels, grid), reference), "linears": swapped}
    return out
