"""bench/products.py: the recorded products of a step replayed and probed as fp32, bf16 and int8 x int8 products,
and the tower's agreement (the int8 products themselves: tests/test_int8_products.py)."""

from __future__ import annotations

import torch
from torch import nn

from infinitevl.bench.products import bf16_instructions, cosine_per_token, probe, record, replay, signature


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
    assert set(out) == ({"fp32", "bf16", "int8"} if bf16_instructions() else {"fp32", "int8"})
    out = probe(calls, repeats=2, bf16=True)
    assert set(out) == {"fp32", "bf16", "int8"}
    assert all(o["calls"] == 4 and o["repeats"] == 2 and o["median_s"] > 0 for o in out.values())
