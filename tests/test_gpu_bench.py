"""`python -m infinitevl.bench.gpu` in its CPU form (`--device cpu --quick`): the same code as on a GPU at tiny
sizes, so that the GPU check cannot rot between the rare runs on a lent GPU. Numbers are not judged (tiny sizes on a
shared CPU); that every check passed or says why it was skipped, and that every figure exists, is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infinitevl.bench import report
from infinitevl.bench.gpu_checks import rel_err
from infinitevl.state import AttentionLayerState

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "infinitevl.bench.gpu", "--device", "cpu", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()
    assert last[-1] == f"JSON: {out}"
    assert any(line.startswith("paper (RTX 4090) against this run") for line in last)  # the table is printed last
    return json.loads(out.read_text())


def test_checks_pass_or_say_why_they_were_skipped(record):
    checks = record["checks"]
    assert not [c for c in checks if c["status"] not in ("passed", "skipped")]
    skipped = [c for c in checks if c["status"] == "skipped"]
    # on a CPU exactly what needs CUDA is skipped: flash-linear-attention's kernels and the CUDA graph
    assert skipped and all(c["check"].startswith(("kernels/fla/", "cuda_graph/")) and c["reason"] for c in skipped)
    passed = {c["check"].split("/")[0] + "/" + c["check"].split("/")[1] for c in checks if c["status"] == "passed"}
    assert {"kernels/torch", "fixture/float32", "fixture/bfloat16", "engine/float32"} <= passed
    assert any(c["check"].startswith("greedy/") and c["status"] == "passed" for c in checks)
    for c in checks:
        if "rel_err" in c:
            assert 0 <= c["rel_err"] <= c["tolerance_rel"]


def test_every_figure_is_present_and_positive(record):
    f = record["figures"]
    assert record["machine"]["device"] == "cpu" and record["plan"] == "quick"
    for rows in (f["decode"], f["baseline"]["decode"]):
        assert rows and all(r["status"] == "measured" and r["eager_s"] > 0 and r["peak_bytes"] > 0 for r in rows)
    assert all(r["graph_s"] is None and r["graph_skipped"] for r in f["decode"])
    for rows in (f["prefill"], f["baseline"]["prefill"]):
        assert rows and all(r["status"] == "measured" and r["tokens_per_s"] > 0 for r in rows)
    s = f["streaming"]
    assert s["frames"] > 0 and s["fps_end_to_end"] > 0 and s["fps_device"] >= s["fps_end_to_end"]
    assert s["tokens_per_frame"] == 256 and s["peak_bytes"] > 0  # 448x448: 32x32 patches, merged 2x2
    figures = {r["figure"] for r in record["paper"]}
    assert {"decode per token, flat with context", "live streaming at 448x448", "memory"} <= figures
    assert all(r["card"] == record["machine"]["card"] and r["paper_card"] == "RTX 4090" for r in record["paper"])


def test_report_section_has_gpu_figures_only_from_a_gpu_run(record):
    assert "No GPU run is recorded yet" in report.gpu_md(None)
    assert "CPU form" in report.gpu_md(record) and "tokens/s" not in report.gpu_md(record)
    # the same record as if a GPU had produced it: the section names the card and the software, and has the tables
    gpu = json.loads(json.dumps(record))
    gpu["machine"].update(device="cuda", card="Some GPU", memory_bytes=2**34, driver="1.2", cuda="13.0", triton="3.6")
    text = report.gpu_md(gpu)
    for expected in ("**Some GPU**", "driver 1.2", "Triton 3.6", f"torch {record['machine']['torch']}", "Decode"):
        assert expected in text
    assert "## On a GPU" in report.render({}, gpu)


def test_one_token_ring_write_skips_padding_rows():
    """The decode step's ring write (no host sync, so that a CUDA graph can record it) leaves a padding row's
    slots alone and writes a real row at position % capacity."""
    B, KV, cap, D = 2, 1, 4, 3
    state = AttentionLayerState(
        keys=torch.zeros(B, KV, cap, D), values=torch.zeros(B, KV, cap, D), positions=torch.full((B, cap), -1), window=5
    )
    state.keys[1] = 7.0
    state.positions[1] = torch.tensor([4, 5, 6, 3])
    before = state.keys[1].clone(), state.positions[1].clone()
    k, v = torch.randn(B, 1, KV, D), torch.randn(B, 1, KV, D)
    state.write(k, v, torch.tensor([[6], [-1]]))
    assert torch.equal(state.keys[0, :, 6 % cap], k[0, 0]) and torch.equal(state.values[0, :, 6 % cap], v[0, 0])
    assert state.positions[0].tolist() == [-1, -1, 6, -1]
    assert torch.equal(state.keys[1], before[0]) and torch.equal(state.positions[1], before[1])


def test_decode_as_a_cuda_graph_records_it_equals_the_plain_step(monkeypatch):
    """While a CUDA graph records, decode steps read the whole ring (empty slots masked) instead of asking the host
    how full it is. Forced on here on the CPU: the logits equal the plain step's, before and after the ring wraps."""
    from conftest import tiny_model

    import infinitevl.ops.attention
    import infinitevl.state
    from infinitevl.engine.generation import decode_step, prefill

    model = tiny_model()
    window = model.config.text.sliding_window
    prompt = torch.randint(0, 300, (1, window // 2), generator=torch.Generator().manual_seed(0))
    plain = model.new_state()
    prefill(model, plain, prompt)
    recorded = plain.clone()
    tokens = torch.randint(0, 300, (window,), generator=torch.Generator().manual_seed(1)).tolist()
    for t in tokens:  # from half a window to past the point where the ring wraps around
        want = decode_step(model, plain, torch.tensor([t]))
        with monkeypatch.context() as m:
            for module in (infinitevl.state, infinitevl.ops.attention):
                m.setattr(module, "graph_capturing", lambda _: True)
            got = decode_step(model, recorded, torch.tensor([t]))
        assert rel_err(got, want)[0] < 1e-5  # fp32 rounding: the ring's masked slots change the summation order
    for name, t in plain.tensors().items():
        assert rel_err(recorded.tensors()[name], t)[0] < 1e-5, name
