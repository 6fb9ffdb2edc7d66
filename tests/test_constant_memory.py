"""A 200,000-token stream through a tiny model: constant state bytes, flat process memory, and the same work per
chunk and per decode step at the end as at the start (counted in floating-point operations, not timed: wall time on
a shared machine is too noisy for a test; `infinitevl bench` measures time)."""

from __future__ import annotations

import psutil
import pytest
import torch
from conftest import tiny_model
from torch.utils.flop_counter import FlopCounterMode

from infinitevl.engine.generation import decode_step, prefill

pytestmark = pytest.mark.serial  # process memory: run alone, not beside other tests

CHUNK = 2048
TOTAL = 200_000


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.slow
def test_200k_token_stream_is_constant_in_memory_and_work():
    model = tiny_model(seed=3)
    state = model.new_state()
    g = torch.Generator().manual_seed(0)
    process = psutil.Process()
    prefill(model, state, torch.randint(0, 370, (1, 1024), generator=g))
    bytes_at_1k = state.nbytes
    work, rss = [], []
    while int(state.num_tokens) < TOTAL:
        ids = torch.randint(0, 370, (1, CHUNK), generator=g)
        if not work or int(state.num_tokens) + CHUNK >= TOTAL:  # the first and the last chunk
            work.append(flops(lambda ids=ids: prefill(model, state, ids, chunk_size=CHUNK)))
        else:
            prefill(model, state, ids, chunk_size=CHUNK)
        rss.append(process.memory_info().rss)
    assert int(state.num_tokens) >= TOTAL
    assert state.nbytes == bytes_at_1k
    warm = 10  # allocator and caches settle over the first chunks
    growth = (max(rss[warm:]) - rss[warm]) / rss[warm]
    assert growth < 0.05, f"process memory grew {growth:.1%} after warm-up"
    assert work[0] > 0 and work[-1] == work[0], f"a chunk cost {work[0]} FLOPs at 1K tokens, {work[-1]} at 200K"
    # and a decode step at 200K tokens does the work it does at the start
    fresh = model.new_state()
    prefill(model, fresh, torch.randint(0, 370, (1, 64), generator=g))
    step = lambda s: flops(lambda: decode_step(model, s, torch.tensor([1])))  # noqa: E731
    assert step(state) == step(fresh) > 0


PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import randomize
from infinitevl.config import tiny_config
from infinitevl.engine.generation import prefill
from infinitevl.model import InfiniteVLForConditionalGeneration

torch.set_num_threads(1)
model = randomize(InfiniteVLForConditionalGeneration(tiny_config(hidden_size=256, head_dim=64, mrope_section=[8, 12, 12], num_hidden_layers=2)), 0).eval()
ids = torch.randint(0, 370, (1, {n}))
state = model.new_state()
prefill(model, state, ids[:, :4096], chunk_size=1024)  # warm up the allocator at the chunk size


def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024


base = hwm()
prefill(model, state, ids, chunk_size=1024)
print(hwm() - base)
"""


@pytest.mark.slow
def test_long_prefill_peak_memory_does_not_grow_with_length(tmp_path):
    """A 640K-token prompt has the same peak as a 40K one: embeddings, positions and logits exist per chunk only
    (a whole-input embedding would be 640K x 256 x 4 B = 655 MB here)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    growth = {}
    for n in (40_000, 640_000):
        out = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT.format(tests=tests, n=n)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        growth[n] = int(out.stdout.split()[-1])
    extra = growth[640_000] - growth[40_000]
    assert extra < 32 * 2**20, f"peak grew {extra / 2**20:.0f} MiB more for the longer prompt ({growth})"
