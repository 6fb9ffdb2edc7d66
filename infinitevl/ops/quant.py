"""Weight-only int8 / int4 quantization for CPU inference, on torch's packed CPU kernels.

    int8  one scale per output row, symmetric:        W ~ q * s            q in [-127, 127]
          kernel: torch.ops.aten._weight_int8pack_mm
    int4  one scale and zero per group of `group_size` inputs of a row:   W ~ (q - 8) * s + z      q in [0, 15]
          kernel: torch.ops.aten._weight_int4pack_mm_for_cpu on the layout of _convert_weight_to_int4pack_for_cpu

Activations enter both kernels in bf16, their fast path (with fp32 activations the same kernels are 10-20x slower);
the result comes back in the caller's dtype. Scales and zeros are bf16. A weight exists in two forms:

    portable  what checkpoints and state dicts hold, the same on every CPU: `weight` int8 [N, K] (int8) or uint8
              [N, K/2] with two int4 values per byte (low nibble = even input column), `weight_scale` [N] or
              [N, K/g], `weight_zero` [N, K/g] (int4: a float zero, z above)
    packed    what the kernel reads (int4: blocked by rows, CPU-specific), built when a layer is loaded

Only the packed form stays in memory; `state_dict()` rebuilds the portable one, so a quantized model saves and loads
like any other. The token embedding can share one int8 table with a tied LM head (`QuantizedEmbedding`).

This module quantizes tensors and layers; which layers of the model are quantized is decided in `model/vlm.py`
(`InfiniteVLForConditionalGeneration.quantize`) and `checkpoint.py` (while loading).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
KERNEL_DTYPE = torch.bfloat16
INT4_ROW_BLOCK = 64  # int4 layers need a multiple of this many output rows (the packed layout's row block)
INT8_COLUMN_MULTIPLE = 32  # the int8 kernel reads inputs in vectors of 16 (other widths crash it): keep a margin
FORMAT = "infinitevl-weight-only/1"
# From this many rows on (prefill), a layer's weight is dequantized to bf16 for one bf16 matrix product: the int
# kernels are GEMV kernels and reach 50-65 GFLOP/s on many rows, bf16 GEMM 260. Measured on the AMD EPYC (avx512_bf16,
# 2 threads), 11008x2048 and 2048x11008: the int kernel is faster up to 128 rows, dequantize + GEMM from 256 on.
DEQUANTIZE_ROWS = 256


class QuantizationError(ValueError):
    """A quantization setting or a quantized tensor that cannot be used."""


@dataclass(frozen=True)
class QuantConfig:
    """What `quantize` does: the method for decoder linears, int4's group size, and what the tied token embedding /
    LM head becomes ("int8": one int8 table with a scale per row serves both; "none": kept in the model's dtype).
    `modules_to_not_convert` lists the modules kept in the model's dtype (filled in when a model is quantized)."""

    method: str
    group_size: int | None = None
    embeddings: str = "int8"
    modules_to_not_convert: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"unknown quantization {self.method!r}; known: {', '.join(METHODS)}")
        if self.method == "int8" and self.group_size not in (None, -1):
            raise QuantizationError("int8 has one scale per output row: give no group size")
        if self.method == "int4":
            size = DEFAULT_GROUP_SIZE if self.group_size is None else self.group_size
            if size not in GROUP_SIZES:
                raise QuantizationError(f"int4 group size {size} is not one of {list(GROUP_SIZES)}")
            object.__setattr__(self, "group_size", size)
        else:
            object.__setattr__(self, "group_size", None)
        if self.embeddings not in ("int8", "none"):
            raise QuantizationError(f"embeddings must be 'int8' or 'none', got {self.embeddings!r}")

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    def describe(self) -> str:
        kind = "int8 per row" if self.method == "int8" else f"int4 groups of {self.group_size}"
        emb = "int8 embedding / lm_head" if self.embeddings == "int8" else "embedding / lm_head unquantized"
        return f"decoder linears {kind} ({kernel_name(self.method)}), {emb}"

    def to_json(self) -> dict:
        """The `quantization_config` entry of config.json, in the keys transformers' configs use."""
        return {
            "quant_method": "infinitevl",
            "format": FORMAT,
            "bits": self.bits,
            "group_size": self.group_size if self.group_size is not None else -1,
            "sym": self.method == "int8",
            "zero_point": "float" if self.method == "int4" else "none",
            "embeddings": self.embeddings,
            "activation_dtype": "bfloat16",
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }

    @classmethod
    def from_json(cls, raw: dict) -> QuantConfig:
        if raw.get("quant_method") != "infinitevl" or raw.get("format") != FORMAT:
            raise QuantizationError(
                f"quantization_config has quant_method {raw.get('quant_method')!r}, format {raw.get('format')!r}; "
                f"this package reads quant_method 'infinitevl', format {FORMAT!r}"
            )
        bits = raw.get("bits")
        if bits not in (4, 8):
            raise QuantizationError(f"quantization_config bits must be 4 or 8, got {bits!r}")
        group = raw.get("group_size", -1)
        return cls(
            method=f"int{bits}",
            group_size=None if group in (None, -1) else int(group),
            embeddings=raw.get("embeddings", "int8"),
            modules_to_not_convert=tuple(raw.get("modules_to_not_convert", ())),
        )


def kernel_name(method: str) -> str:
    return "aten._weight_int8pack_mm" if method == "int8" else "aten._weight_int4pack_mm_for_cpu"


def fits(method: str, out_features: int, in_features: int, group_size: int | None) -> bool:
    """Whether the kernel takes a weight of this shape."""
    if method == "int8":
        return in_features % INT8_COLUMN_MULTIPLE == 0
    return out_features % INT4_ROW_BLOCK == 0 and in_features % group_size == 0


# -- tensors: float <-> portable ---------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """[N, K] float -> {'weight': int8 [N, K], 'weight_scale': bf16 [N]} (symmetric, one scale per row)."""
    lo, hi = torch.aminmax(weight, dim=1)
    scale = (torch.maximum(-lo.float(), hi.float()) / 127).clamp(min=1e-8).to(KERNEL_DTYPE)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    rows = max(1, (16 << 20) // max(1, weight.shape[1]))  # fp32 work in blocks of 64 MB (the 4B embedding: 1.2 GB)
    for s in range(0, weight.shape[0], rows):
        block = weight[s : s + rows].to(torch.float32, copy=True)
        q[s : s + rows] = block.div_(scale[s : s + rows].float().unsqueeze(1)).round_().clamp_(-127, 127)
    return {"weight": q, "weight_scale": scale}


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """[N, K] float -> {'weight': uint8 [N, K/2], 'weight_scale', 'weight_zero': bf16 [N, K/g]} (min-max per group).

    The scale and zero are rounded to bf16 first and the integers chosen against the rounded values, so that
    dequantizing with the stored bf16 numbers gives the nearest grid point."""
    N, K = weight.shape
    w = weight.to(torch.float32, copy=True).view(N, K // group_size, group_size)  # worked on in place below
    lo, hi = torch.aminmax(w, dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(KERNEL_DTYPE)
    zero = (lo + 8 * scale.float()).to(KERNEL_DTYPE)
    base = zero.float() - 8 * scale.float()  # the value of q = 0
    q = w.sub_(base.unsqueeze(-1)).div_(scale.float().unsqueeze(-1)).round_().clamp_(0, 15).to(torch.uint8)
    q = q.view(N, K)
    return {"weight": q[:, 0::2] | (q[:, 1::2] << 4), "weight_scale": scale, "weight_zero": zero}


def dequantize(portable: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] a portable quantized weight stands for (the reference the kernels are tested on)."""
    q, scale = portable["weight"], portable["weight_scale"].float()
    if q.dtype == torch.int8:
        return (q.float() * scale.unsqueeze(1)).to(dtype)
    N = q.shape[0]
    values = torch.stack([q & 15, q >> 4], dim=-1).view(N, -1).float()  # [N, K]
    group = values.shape[1] // scale.shape[1]
    s = scale.repeat_interleave(group, dim=1)
    z = portable["weight_zero"].float().repeat_interleave(group, dim=1)
    return ((values - 8) * s + z).to(dtype)


def quantize_tensor(weight: torch.Tensor, config: QuantConfig) -> dict[str, torch.Tensor]:
    if config.method == "int8":
        return quantize_int8(weight)
    return quantize_int4(weight, config.group_size)


def quantize_for(module, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The portable form of a float weight for a quantized module (its own method and group size)."""
    return quantize_int8(weight) if module.method == "int8" else quantize_int4(weight, module.group_size)


def portable_shapes(method: str, out_features: int, in_features: int, group_size: int | None) -> dict[str, tuple]:
    if method == "int8":
        return {"weight": (out_features, in_features), "weight_scale": (out_features,)}
    groups = in_features // group_size
    return {
        "weight": (out_features, in_features // 2),
        "weight_scale": (out_features, groups),
        "weight_zero": (out_features, groups),
    }


PORTABLE_DTYPES = {"weight_scale": KERNEL_DTYPE, "weight_zero": KERNEL_DTYPE}


# -- int4: portable <-> the kernel's packed layout ---------------------------------------------------------------------
def _unpacked_values(portable_weight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] two per byte -> int32 [N, K] values 0..15."""
    N = portable_weight.shape[0]
    return torch.stack([portable_weight & 15, portable_weight >> 4], dim=-1).view(N, -1).to(torch.int32)


def pack_int4(portable_weight: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of a portable int4 weight."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpacked_values(portable_weight), 1)


def _blocked(values: torch.Tensor, block: int) -> torch.Tensor:
    """A candidate packed layout: per block of `block` rows, input-major, byte n holds row n (low nibble) and row
    n + block/2 (high nibble). Used only to invert the kernel's packing; `_row_block` checks it on this CPU."""
    N, K = values.shape
    b = values.view(N // block, block, K)
    lo, hi = b[:, : block // 2].transpose(1, 2), b[:, block // 2 :].transpose(1, 2)
    return (lo | (hi << 4)).to(torch.uint8).reshape(N, K // 2)


@functools.cache
def _row_block() -> int:
    """The row block of torch's int4 packing on this CPU, found by packing a probe (the layout depends on the
    instruction set the kernel was built for)."""
    probe = torch.randint(0, 16, (2 * INT4_ROW_BLOCK, 64), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    for block in (64, 32, 16, 8):
        if torch.equal(_blocked(probe, block), packed):
            return block
    raise QuantizationError(
        "torch's int4 packing on this CPU has a layout this package does not know, so an in-memory int4 model "
        "cannot be saved here; `infinitevl quantize` writes int4 folders without unpacking"
    )


def unpack_int4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The inverse of `pack_int4`: the kernel's layout -> portable uint8 [N, K/2]."""
    block = _row_block()
    N, K = out_features, in_features
    b = packed.view(N // block, K, block // 2)
    lo, hi = (b & 15).transpose(1, 2), (b >> 4).transpose(1, 2)  # [N/block, block/2, K]
    values = torch.cat([lo, hi], dim=1).reshape(N, K)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def int4_scale_and_zero(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, K/g] scales and zeros -> the kernel's [K/g, N, 2]."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in torch's own (aligned) memory: the int8 kernel crashes on tensors that live at an
    unaligned offset of a buffer, as tensors read from a safetensors file can."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return out.copy_(t)


# -- modules -----------------------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """A linear layer with int8 or int4 weights (packed for the CPU kernel) and an optional float bias.

    Its state dict holds the portable form under `weight`, `weight_scale` (and `weight_zero`), next to `bias`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: str,
        group_size: int | None = None,
        bias: bool = False,
        dtype: torch.dtype = KERNEL_DTYPE,
        device=None,
    ):
        super().__init__()
        if not fits(method, out_features, in_features, group_size):
            raise QuantizationError(
                f"a [{out_features}, {in_features}] weight does not fit the {method} kernel (group size {group_size})"
            )
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        N, K = out_features, in_features
        if method == "int8":
            self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, device=device), persistent=False)
            self.register_buffer("scales", torch.empty(N, dtype=KERNEL_DTYPE, device=device), persistent=False)
        else:
            self.register_buffer("qweight", torch.empty(N, K // 2, dtype=torch.uint8, device=device), persistent=False)
            self.register_buffer(
                "scales", torch.empty(K // group_size, N, 2, dtype=KERNEL_DTYPE, device=device), persistent=False
            )
        self.bias = nn.Parameter(torch.empty(N, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
        module = cls(
            linear.in_features,
            linear.out_features,
            config.method,
            config.group_size,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        if linear.weight.device.type == "meta":  # the layout only: loading a checkpoint fills it
            return module
        module.set_portable(quantize_tensor(linear.weight.detach(), config))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def portable_keys(self) -> tuple[str, ...]:
        return tuple(portable_shapes(self.method, self.out_features, self.in_features, self.group_size))

    def set_portable(self, portable: dict[str, torch.Tensor]) -> None:
        """Load the portable form (checked against this layer's shapes) into the kernel's layout."""
        expected = portable_shapes(self.method, self.out_features, self.in_features, self.group_size)
        for key, shape in expected.items():
            if key not in portable or tuple(portable[key].shape) != shape:
                got = tuple(portable[key].shape) if key in portable else "missing"
                raise QuantizationError(f"{key}: expected shape {shape}, got {got}")
        q = portable["weight"].to(torch.int8 if self.method == "int8" else torch.uint8)
        if self.method == "int8":
            self.qweight = _own(q)
            self.scales = _own(portable["weight_scale"].to(KERNEL_DTYPE))
        else:
            self.qweight = pack_int4(q)
            self.scales = int4_scale_and_zero(portable["weight_scale"], portable["weight_zero"])

    def portable(self) -> dict[str, torch.Tensor]:
        N, K = self.out_features, self.in_features
        if self.qweight.device.type == "meta":
            shapes = portable_shapes(self.method, N, K, self.group_size)
            dtypes = {"weight": torch.int8 if self.method == "int8" else torch.uint8, **PORTABLE_DTYPES}
            return {k: torch.empty(s, dtype=dtypes[k], device="meta") for k, s in shapes.items()}
        if self.method == "int8":
            return {"weight": self.qweight, "weight_scale": self.scales}
        return {
            "weight": unpack_int4(self.qweight, N, K),
            "weight_scale": self.scales[..., 0].t().contiguous(),
            "weight_zero": self.scales[..., 1].t().contiguous(),
        }

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in self.portable().items():
            destination[prefix + key] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        keys = list(portable_shapes(self.method, self.out_features, self.in_features, self.group_size))
        absent = [prefix + k for k in keys if prefix + k not in state_dict]
        if absent:
            missing.extend(absent)
            return
        try:
            self.set_portable({k: state_dict[prefix + k] for k in keys})
        except QuantizationError as err:
            errors.append(f"{prefix}: {err}")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias = nn.Parameter(state_dict[prefix + "bias"].to(self.bias.dtype), requires_grad=False)
            else:
                missing.append(prefix + "bias")

    def dequantized(self, dtype: torch.dtype = KERNEL_DTYPE) -> torch.Tensor:
        """The float weight [N, K] (for many rows at once, where a bf16 matrix product beats the int kernels)."""
        N, K = self.out_features, self.in_features
        if self.method == "int8":
            return self.qweight.to(dtype) * self.scales.to(dtype).unsqueeze(1)
        block = _row_block()
        b = self.qweight.view(N // block, K, block // 2)
        values = torch.cat([b & 15, b >> 4], dim=2).transpose(1, 2).reshape(N, K // self.group_size, self.group_size)
        scale, zero = self.scales[..., 0].t().unsqueeze(-1), self.scales[..., 1].t().unsqueeze(-1)  # [N, K/g, 1]
        w = values.to(dtype).sub_(8).mul_(scale.to(dtype)).add_(zero.to(dtype))
        return w.view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype (the kernel runs on bf16 activations)."""
        lead = x.shape[:-1]
        a = x.reshape(-1, self.in_features)
        if a.dtype != KERNEL_DTYPE:  # (no-op casts skipped: a decode step makes hundreds of these calls)
            a = a.to(KERNEL_DTYPE)
        if a.shape[0] >= DEQUANTIZE_ROWS:  # prefill: compute-bound, where bf16 GEMM is several times faster
            y = F.linear(a, self.dequantized()).to(x.dtype).view(*lead, self.out_features)
            return y + self.bias if self.bias is not None else y
        scales = self.scales
        if scales.dtype != KERNEL_DTYPE:  # after .to()
            scales = scales.to(KERNEL_DTYPE)
        if self.method == "int8":
            y = torch.ops.aten._weight_int8pack_mm(a, self.qweight, scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.qweight, self.group_size, scales)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.view(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}{group}"


class QuantizedEmbedding(nn.Module):
    """A token embedding held as int8 with one bf16 scale per row; lookups come out in `dtype`. Its state dict
    holds `weight` (int8) and `weight_scale`, like an int8 `QuantizedLinear`."""

    method, group_size = "int8", None

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = KERNEL_DTYPE, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        shape = (num_embeddings, embedding_dim)
        self.register_buffer("qweight", torch.empty(shape, dtype=torch.int8, device=device), persistent=False)
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=KERNEL_DTYPE, device=device), persistent=False)

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> QuantizedEmbedding:
        w = embedding.weight.detach()
        module = cls(*w.shape, dtype=w.dtype, device=w.device)
        if w.device.type != "meta":  # on meta, the layout only
            module.set_portable(quantize_int8(w))
        return module

    def portable_keys(self) -> tuple[str, ...]:
        return ("weight", "weight_scale")

    def set_portable(self, portable: dict[str, torch.Tensor]) -> None:
        for key, shape in portable_shapes("int8", self.num_embeddings, self.embedding_dim, None).items():
            if key not in portable or tuple(portable[key].shape) != shape:
                got = tuple(portable[key].shape) if key in portable else "missing"
                raise QuantizationError(f"{key}: expected shape {shape}, got {got}")
        # in place: a tied LM head holds the same tensors
        if self.qweight.device.type == "meta":
            self.qweight = _own(portable["weight"].to(torch.int8))
            self.scales = _own(portable["weight_scale"].to(KERNEL_DTYPE))
        else:
            self.qweight.copy_(portable["weight"])
            self.scales.copy_(portable["weight_scale"])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.qweight.device.type == "meta":
            destination[prefix + "weight"] = torch.empty(self.qweight.shape, dtype=torch.int8, device="meta")
            destination[prefix + "weight_scale"] = torch.empty(self.scales.shape, dtype=KERNEL_DTYPE, device="meta")
            return
        destination[prefix + "weight"] = self.qweight
        destination[prefix + "weight_scale"] = self.scales

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        absent = [prefix + k for k in ("weight", "weight_scale") if prefix + k not in state_dict]
        if absent:
            missing.extend(absent)
            return
        try:
            self.set_portable({k: state_dict[prefix + k] for k in ("weight", "weight_scale")})
        except QuantizationError as err:
            errors.append(f"{prefix}: {err}")

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` changes the dtype lookups come out in, as it would a float embedding's
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.qweight.device)).dtype
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids].to(self.dtype)  # [..., d]: only the rows asked for are converted
        return rows * self.scales[ids].unsqueeze(-1).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class TiedQuantizedHead(nn.Module):
    """The LM head tied to a `QuantizedEmbedding`: logits from the embedding's int8 table with the int8 kernel. It
    holds a reference to the embedding, not tensors of its own, so it has no state dict entries and `.to()` cannot
    split the tie."""

    method, group_size = "int8", None

    def __init__(self, embedding: QuantizedEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: the embedding is registered once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        a = x.reshape(-1, e.embedding_dim).to(KERNEL_DTYPE)
        scales = e.scales if e.scales.dtype == KERNEL_DTYPE else e.scales.to(KERNEL_DTYPE)
        if fits("int8", e.num_embeddings, e.embedding_dim, None):
            y = torch.ops.aten._weight_int8pack_mm(a, e.qweight, scales)
        else:  # widths the kernel reads wrongly (not a multiple of its vectors): the same product, dequantized
            y = F.linear(a, e.qweight.to(KERNEL_DTYPE) * scales.unsqueeze(1))
        return y.to(x.dtype).view(*x.shape[:-1], e.num_embeddings)

    def extra_repr(self) -> str:
        return f"tied to the int8 embedding ({self.embedding.num_embeddings} x {self.embedding.embedding_dim})"


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each distinct tensor once (tied tensors and meta excluded)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
