"""bench/products.py: the int8 x int8 products the real-size streaming section probes, against fp32 references,
and the recorded products of a step replayed."""

from __future__ import annotations

import torch
from torch import nn

from infinitevl.bench.products import (
    Int8DynamicLinear,
    cosine_per_token,
    int8_matmul,
    probe,
    quantize_rows,
    quantize_weight,
    record,
    replay,
    signature,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_quantize_rows_round_trips_within_half_a_step():
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 10, 7).unsqueeze(1)
    before = x.clone()
    q, scale = quantize_rows(x)
    assert torch.equal(x, before)  # the activations are read, not overwritten
    assert q.dtype == torch.int8 and scale.shape == (7, 1)
    assert int(q.abs().max()) == 127  # each row's largest value uses the whole range
    assert torch.all((q.float() * scale - x).abs() <= scale * 0.5001)  # half a step (and float rounding)


def test_int8_matmul_matches_the_float_product():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(33, 96, generator=gen), torch.randn(40, 96, generator=gen)
    y = int8_matmul(x.bfloat16(), *quantize_weight(w))
    assert y.dtype == torch.bfloat16 and y.shape == (33, 40)
    assert _rel(y, x @ w.t()) < 0.02  # int8 per row and per channel: about 1% on random data


def test_int8_dynamic_linear_keeps_shape_and_bias():
    torch.manual_seed(2)
    linear = nn.Linear(48, 24)
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        y, reference = Int8DynamicLinear(linear)(x), linear(x)
    assert y.shape == (2, 5, 24) and _rel(y, reference) < 0.02


def test_cosine_per_token():
    a = torch.randn(6, 16)
    b = a.clone()
    b[2] = -a[2]
    c = cosine_per_token(b, a)
    assert c["tokens"] == 6 and abs(c["min"] + 1) < 1e-6 and abs(c["mean"] - 4 / 6) < 1e-6


def test_recorded_products_replay_and_probe_every_call():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    products = [model[0], model[2]]
    calls, hooks = record(products)
    model(torch.randn(3, 10, 32))
    model(torch.randn(1, 32))
    for h in hooks:
        h.remove()
    assert [(m, tuple(s)) for m, s, _ in calls] == [
        (model[0], (3, 10, 32)),
        (model[2], (3, 10, 64)),
        (model[0], (1, 32)),
        (model[2], (1, 64)),
    ]
    assert signature(calls) != signature(calls[:2]) and signature(calls) == signature(list(calls))
    floor = replay(calls, repeats=2)
    assert floor["calls"] == 4 and floor["repeats"] == 2
    out = probe(calls, repeats=2)
    assert set(out) == {"fp32", "bf16", "int8"}
    assert all(o["calls"] == 4 and o["repeats"] == 2 and o["median_s"] > 0 for o in out.values())
