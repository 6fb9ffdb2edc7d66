"""Quantized layers at widths the CPU int8/int4 kernels do not take (not multiples of 16, 32 or 64): each either
computes what its float weights give or refuses at construction, never returns the kernel's garbage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn

from infinitevl.ops.quant import (
    QuantConfig,
    QuantizationError,
    QuantizedEmbedding,
    QuantizedLinear,
    TiedQuantizedHead,
    fits,
)

WIDTHS = [24, 40, 48, 64, 72, 100, 128]  # in_features / hidden sizes, fitting and not


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def dequantized_table(embedding: QuantizedEmbedding) -> torch.Tensor:
    return embedding.qweight.float() * embedding.scales.float().unsqueeze(1)


@pytest.mark.parametrize("width", WIDTHS)
def test_tied_int8_head_at_any_width(width):
    gen = torch.Generator().manual_seed(width)
    table = nn.Embedding(96, width)
    nn.init.normal_(table.weight, generator=gen)
    embedding = QuantizedEmbedding.from_float(table.to(torch.bfloat16))
    head = TiedQuantizedHead(embedding)
    x = torch.randn(5, width, generator=gen).bfloat16()
    got = head(x)
    assert got.shape == (5, 96) and torch.isfinite(got).all()
    # the int8 table's own product (bf16 inputs, fp32 sums) to bf16 rounding; the float table to int8 rounding
    assert relative_error(got, F.linear(x.float(), dequantized_table(embedding))) < 1e-2
    assert relative_error(got, F.linear(x.float(), table.weight.float())) < 3e-2
    # lookups of the same table
    ids = torch.tensor([0, 7, 95])
    assert relative_error(embedding(ids), table.weight[ids]) < 2e-2


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("width", WIDTHS)
def test_quantized_linear_at_any_width_computes_or_refuses(method, width):
    gen = torch.Generator().manual_seed(width)
    out_features, group = 128, 32
    layer = nn.Linear(width, out_features, bias=True).bfloat16()
    config = QuantConfig(method, group if method == "int4" else None)
    if not fits(method, out_features, width, config.group_size):
        with pytest.raises(QuantizationError, match=f"{out_features}, {width}"):
            QuantizedLinear.from_float(layer, config)
        return
    quantized = QuantizedLinear.from_float(layer, config)
    x = torch.randn(3, width, generator=gen).bfloat16()
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    got = quantized(x)
    assert torch.isfinite(got).all()
    assert relative_error(got, F.linear(x.float(), quantized.dequantized(torch.float32), layer.bias.float())) < 1e-2
    assert relative_error(got, want) < (3e-2 if method == "int8" else 0.2)


@pytest.mark.parametrize("tied", [True, False])
def test_int8_model_whose_hidden_width_the_kernel_cannot_take(tied):
    """hidden 48 (not a multiple of 32): quantize("int8") works for tied and untied heads, and the logits stay
    those of the bf16 model with the same (dequantized) embedding table."""
    kw = dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=tied)
    model = tiny_model(**kw).to(torch.bfloat16)
    model.quantize("int8", embeddings="int8")
    lm = model.model.language_model
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        hidden = lm(lm.embed_tokens(ids), torch.arange(9).view(1, 1, 9).expand(3, 1, 9))[0]
    if tied:
        want = F.linear(hidden.float(), dequantized_table(lm.embed_tokens))
    else:
        assert "lm_head" in model.quantization.modules_to_not_convert
        want = F.linear(hidden.float(), model.lm_head.weight.float())
    assert torch.isfinite(got).all()
    assert relative_error(got, want) < 1e-2
