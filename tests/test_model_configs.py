"""Other shapes than the fixture's: layer counts, head groupings, windows, expand_v, explicit layer types."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from infinitevl.engine.generation import prefill

VARIANTS = [
    {},
    {"num_hidden_layers": 5, "sliding_window": 7},
    {"num_linear_heads": 4, "num_linear_key_value_heads": 2, "expand_v": 1},
    {"num_linear_heads": 4, "num_linear_key_value_heads": 1, "expand_v": 1.5},
    {"num_attention_heads": 4, "num_key_value_heads": 4, "sliding_window": 3},
    {"num_hidden_layers": 4, "layer_types": ["linear_attention", "sliding_attention"] * 2},
    {"num_hidden_layers": 3, "layer_types": ["linear_attention"] * 3},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "fixture")
def test_variant_runs_and_chunked_prefill_equals_full_pass(overrides):
    model = tiny_model(seed=1, **overrides)
    ids = torch.randint(0, 370, (2, 53), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
    state = model.new_state(2)
    chunked = prefill(model, state, ids, chunk_size=10, return_all_logits=True)
    assert full.shape == (2, 53, model.config.text.vocab_size) and torch.isfinite(full).all()
    assert (chunked - full).abs().max() < 1e-3
