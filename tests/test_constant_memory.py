"""A 200,000-token stream through a tiny model: constant state bytes, flat process memory, flat chunk times."""

from __future__ import annotations

import statistics
import time

import psutil
import pytest
import torch
from conftest import tiny_model

from infinitevl.engine.generation import decode_step, prefill

pytestmark = pytest.mark.serial  # timings: run alone, not beside other tests

CHUNK = 2048
TOTAL = 200_000


@pytest.mark.slow
def test_200k_token_stream_is_constant_in_memory_and_time():
    model = tiny_model(seed=3)
    state = model.new_state()
    g = torch.Generator().manual_seed(0)
    process = psutil.Process()
    prefill(model, state, torch.randint(0, 370, (1, 1024), generator=g))
    bytes_at_1k = state.nbytes
    times, rss = [], []
    while int(state.num_tokens) < TOTAL:
        ids = torch.randint(0, 370, (1, CHUNK), generator=g)
        t0 = time.perf_counter()
        prefill(model, state, ids, chunk_size=CHUNK)
        times.append(time.perf_counter() - t0)
        rss.append(process.memory_info().rss)
    assert int(state.num_tokens) >= TOTAL
    assert state.nbytes == bytes_at_1k
    warm = 10  # allocator and caches settle over the first chunks
    growth = (max(rss[warm:]) - rss[warm]) / rss[warm]
    assert growth < 0.05, f"process memory grew {growth:.1%} after warm-up"
    early = statistics.median(times[warm : warm + 25])
    late = statistics.median(times[-25:])
    assert late < 1.25 * early, f"chunk time went from {early * 1e3:.0f} ms to {late * 1e3:.0f} ms"
    # and a decode step at 200K tokens costs what it costs at the start
    fresh = model.new_state()
    prefill(model, fresh, torch.randint(0, 370, (1, 16), generator=g))

    def step_time(s):
        t0 = time.perf_counter()
        for _ in range(20):
            decode_step(model, s, torch.tensor([1]))
        return time.perf_counter() - t0

    step_time(fresh), step_time(state)  # warm-up
    assert step_time(state) < 1.5 * step_time(fresh)
