"""int8 x int8 products (ops/int8_products.py): the kernel against an exact integer reference (full-range inputs
included, where a CPU without VNNI saturates), the layers keep their parameters and their own products for few rows
(decode), the model-level switch, the engine's modes and the CLI flag."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infinitevl.bench.quality import held_out_prompts
from infinitevl.defaults import default_model_folder
from infinitevl.engine.runtime import InfiniteVL
from infinitevl.ops import int8_products as i8
from infinitevl.ops.linear import Linear
from infinitevl.ops.quant import QuantConfig, QuantizedLinear

EXE = Path(sys.executable).with_name("infinitevl")
pytestmark = pytest.mark.skipif(not i8.available(), reason="this torch build has no oneDNN quantized linear")


def exact(x: torch.Tensor, weight: torch.Tensor, levels: int) -> torch.Tensor:
    """The product the kernel must give: the same quantized integers, multiplied and summed in float64."""
    qw, sw = i8.quantize_weight(weight, levels)
    qx, sx = i8.quantize_rows(x)
    sums = (qx.double() - i8.ZERO_POINT) @ qw.double().t()
    return sums * sx.double() * sw.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 33, 200])
def test_product_equals_the_integer_reference(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 160, generator=gen)
    x = (torch.randn(rows, 160, generator=gen) * torch.rand(rows, 1, generator=gen) * 5).to(dtype)
    levels = i8.weight_levels()
    got = i8.PackedWeight(weight, levels)(x)
    want = exact(x, weight, levels)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    reference = F.linear(x.float(), weight)
    assert float((got - reference).norm() / reference.norm()) < 0.03  # what 8-bit rows x 7- or 8-bit weights cost


def test_full_range_inputs_do_not_saturate():
    """Every activation at its row's maximum and every weight at +-its row's maximum: the largest pair sums the
    kernel can meet. With the levels the probe chose for this CPU they come out exact."""
    K = 256
    weight = torch.ones(64, K)
    weight[1::2] = -1.0
    weight[2::4, ::3] = 0.5
    x = torch.ones(40, K) * torch.arange(1, 41).unsqueeze(1)
    got = i8.PackedWeight(weight, i8.weight_levels())(x)
    assert torch.allclose(got.double(), exact(x, weight, i8.weight_levels()), rtol=1e-5)
    assert torch.allclose(got[:, :2], F.linear(x, weight[:2]), rtol=1e-5)  # +-1: no rounding at any level count


def _layers():
    gen = torch.Generator().manual_seed(0)
    plain = nn.Linear(128, 192)
    decoder = Linear(128, 256, bias=False)
    for m in (plain, decoder):
        m.weight.data = torch.randn(m.weight.shape, generator=gen) * 0.05
    q8 = QuantizedLinear.from_float(copy.deepcopy(decoder), QuantConfig("int8"))
    q4 = QuantizedLinear.from_float(copy.deepcopy(decoder), QuantConfig("int4", 64))
    return {"nn.Linear": plain, "ops.linear.Linear": decoder, "int8": q8, "int4": q4}


@pytest.mark.parametrize("kind", ["nn.Linear", "ops.linear.Linear", "int8", "int4"])
def test_layer_keeps_its_weights_and_its_own_product_for_few_rows(kind):
    layer = _layers()[kind]
    gen = torch.Generator().manual_seed(1)
    few, many = torch.randn(2, 5, 128, generator=gen), torch.randn(3, 30, 128, generator=gen)
    with torch.no_grad():
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        few_before, many_before = layer(few), layer(many)
        float_weight = i8.float_weight(layer)
        assert i8.enable([layer], min_rows=32) == 1
        assert isinstance(layer, i8._Int8Rows) and isinstance(layer, type(_layers()[kind]))
        after = layer.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
        assert torch.equal(layer(few), few_before)  # 10 rows: the layer's own product, bit for bit
        got = layer(many)  # 90 rows: int8
        assert got.shape == many_before.shape and got.dtype == many_before.dtype
        want = exact(many.reshape(90, 128), float_weight, i8.weight_levels()).view_as(got)
        if layer.bias is not None:
            want = want + layer.bias.double()
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert float((got - many_before).norm() / many_before.norm()) < 0.03
        assert i8.packed_bytes(layer) == float_weight.numel()
        assert i8.disable(layer) == 1 and not isinstance(layer, i8._Int8Rows)
        assert torch.equal(layer(many), many_before)


def test_training_calls_keep_the_float_product():
    layer = nn.Linear(64, 64)
    x = torch.randn(40, 64, requires_grad=True)
    want = layer(x)
    i8.enable([layer], min_rows=1)
    got = layer(x)
    assert torch.equal(got, want) and got.requires_grad


def test_bad_settings_are_refused():
    with pytest.raises(i8.Int8ProductsError, match="min_rows must be >= 1"):
        i8.enable([nn.Linear(8, 8)], min_rows=0)
    with pytest.raises(i8.Int8ProductsError, match="Conv1d is not a linear layer"):
        i8.enable([nn.Conv1d(4, 4, 1)])
    with pytest.raises(i8.Int8ProductsError, match="unknown mode 'fast'; known: off, on, auto"):
        i8.decide("fast", torch.float32)
    with pytest.raises(i8.Int8ProductsError, match="CPU only"):
        i8.decide("on", torch.float32, "cuda")
    assert i8.decide("off", torch.float32) == (False, "off")
    assert i8.decide("auto", torch.float32, "cuda") == (False, "auto: not used, they run on the CPU only (the model "
                                                               "is on cuda)")  # fmt: skip


def test_auto_follows_the_probe(monkeypatch):
    monkeypatch.setattr(i8, "speedup", lambda dtype: 2.5)
    use, why = i8.decide("auto", torch.float32)
    assert use and why.startswith("auto: 2.50x faster than float32 products")
    monkeypatch.setattr(i8, "speedup", lambda dtype: 1.1)
    use, why = i8.decide("auto", torch.bfloat16)
    assert not use and "1.10x bfloat16" in why


def test_speedup_probe_times_both_products():
    assert i8.speedup(torch.float32, rows=32, width=64, repeats=1) > 0


def test_model_prefill_close_and_decode_unchanged():
    """The bundled model on a held-out stream of its task (frames and a question, one prompt): the tower's and the
    decoder's linear layers take int8; the logits stay close to fp32; a decode step from the same state is the
    float model's bit for bit."""
    engine = InfiniteVL.load()
    model = engine.model
    prompt = held_out_prompts(default_model_folder(), 1, 40, None, 5)[0]
    ids = prompt["input_ids"]
    with torch.no_grad():
        reference = model(**prompt).logits
        state = model.new_state()
        model(**prompt, state=state)
        step_state = copy.deepcopy(state)
        step = model(input_ids=ids[:, :1], state=step_state).logits
        swapped = model.use_int8_products()
        assert swapped == sum(isinstance(m, i8._Int8Rows) for m in model.modules()) > 0
        assert not isinstance(model.lm_head, i8._Int8Rows)
        assert all(isinstance(m, i8._Int8Rows) for m in model.model.visual.modules() if isinstance(m, nn.Linear))
        got = model(**prompt).logits
        cos = F.cosine_similarity(got[0], reference[0], dim=-1)
        assert float(cos.min()) > 0.99 and float(cos.mean()) > 0.999 and not torch.equal(got, reference)
        step_state = copy.deepcopy(state)
        assert torch.equal(model(input_ids=ids[:, :1], state=step_state).logits, step)
    i8.disable(model)


def test_engine_modes_and_precision_report():
    engine = InfiniteVL.load(int8_products="on")
    p = engine.precision
    assert p["int8_products"].startswith("on;") and p["int8_products_bytes"] > 0
    assert "int8 products for the tower and prefill" in engine.describe_precision()
    off = InfiniteVL.load()
    assert off.precision["int8_products"] == "off" and off.precision["int8_products_bytes"] == 0
    with pytest.raises(i8.Int8ProductsError, match="unknown mode"):
        InfiniteVL.load(int8_products="yes")


def test_cli_flag(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = [str(EXE), "generate", "Hi", "--max-new-tokens", "2", "--verbose", "--int8-products", "on"]
    proc = subprocess.run(run, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("precision:"))
    assert "int8 products: on;" in line
    proc = subprocess.run(run + ["--device", "cuda"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "--int8-products on: they run on the CPU only (--device cuda)" in proc.stderr
