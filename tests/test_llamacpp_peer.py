"""The llama.cpp peer of the precision section (bench/llamacpp.py, gguf_models.py, llamacpp_report.py): the state
stretching against a tiled reference, crashes reported as crashes, the hybrid's rows in the report, and (where the
optional packages are installed: `make peer`) the tiny GGUF files read back and run by llama.cpp."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys

import numpy as np
import pytest

from infinitevl.bench import gguf_models, llamacpp
from infinitevl.bench.llamacpp_report import hybrid_md, llamacpp_md, llamacpp_targets
from infinitevl.bench.report import _target
from infinitevl.bench.runner import full_plan, quick_plan
from infinitevl.bench.timing import fmt_tokens

MAGIC = struct.pack("<Ii", 0x67677371, 0)


def state_blob(positions, toks, ks, vs, v_trans, recurrent=None) -> bytes:
    """A sequence state in llama.cpp's layout (one stream; `toks` None: cells without M-RoPE's x, y, tok)."""
    parts = [MAGIC, struct.pack("<II", 1, len(positions))]
    for i, pos in enumerate(positions):
        parts.append(struct.pack("<iI", pos, 1))
        if toks is not None:
            parts.append(struct.pack("<3i", pos, pos, toks[i]))
        parts.append(struct.pack("<i", 0))
    parts.append(struct.pack("<II", int(v_trans), len(ks)))
    for k in ks:
        parts += [struct.pack("<iQ", 1, k.shape[1]), k.tobytes()]
    for v in vs:
        if v_trans:  # [channels, cells, bytes per element]
            parts += [struct.pack("<iII", 1, v.shape[2], v.shape[0]), v.tobytes()]
        else:
            parts += [struct.pack("<iQ", 1, v.shape[1]), v.tobytes()]
    if recurrent is not None:
        pos, payload = recurrent
        parts += [struct.pack("<IiI", 1, pos, 0), payload]
    return b"".join(parts)


@pytest.mark.parametrize("n_cells", [5, 12, 13])
@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize("hybrid", [False, True])
def test_stretched_state_repeats_the_cells_and_keeps_the_recurrent_state(n_cells, v_trans, hybrid):
    rng = np.random.default_rng(n_cells)
    count, layers = 6, 2
    ks = [rng.integers(0, 256, (count, 8), dtype=np.uint8) for _ in range(layers)]
    shape = (4, count, 2) if v_trans else (count, 8)
    vs = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(layers)]
    toks = list(range(100, 100 + count)) if hybrid else None
    payload = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
    blob = state_blob(range(7, 7 + count), toks, ks, vs, v_trans, (count + 6, payload) if hybrid else None)

    got = llamacpp.stretch_state(blob, n_cells, recurrent=hybrid, cell_ext=hybrid)

    reps = -(-n_cells // count)
    tiled_v = [np.tile(v, (1, reps, 1))[:, :n_cells] if v_trans else np.tile(v, (reps, 1))[:n_cells] for v in vs]
    expected = state_blob(
        range(n_cells),
        np.resize(toks, n_cells) if hybrid else None,
        [np.tile(k, (reps, 1))[:n_cells] for k in ks],
        tiled_v,
        v_trans,
        (n_cells - 1, payload) if hybrid else None,
    )
    assert got.dtype == np.uint8 and got.tobytes() == expected


def test_stretching_refuses_a_state_it_does_not_understand():
    k = np.zeros((2, 8), np.uint8)
    blob = state_blob([0, 1], None, [k], [k], False)
    with pytest.raises(ValueError, match="one KV stream"):
        llamacpp.stretch_state(blob[:8] + struct.pack("<I", 2) + blob[12:], 4)
    with pytest.raises(ValueError, match="bytes left over"):  # a hybrid's recurrent part, read as a Transformer's
        llamacpp.stretch_state(state_blob([0, 1], None, [k], [k], False, (1, b"x" * 8)), 4)


CHILD = """
import json, os, resource, signal, sys
task = json.loads(sys.argv[1])
print("ggml_amx_init: AMX tile kernels ready", file=sys.stderr, flush=True)
if task.get("probe") and {probe_ok}:
    print(json.dumps({{"version": "0.3.36", "system_info": "CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 0 | "}}))
    sys.exit(0)
if {exit_code}:
    raise SystemExit("RuntimeError: llama_decode failed" if {exit_code} == 1 else {exit_code})
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
os.kill(os.getpid(), signal.SIGILL)
"""


def fake_child(monkeypatch, tmp_path, probe_ok: bool, exit_code: int = 0) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(probe_ok=probe_ok, exit_code=exit_code))
    monkeypatch.setattr(llamacpp, "CHILD", [sys.executable, str(script)])
    monkeypatch.setattr(llamacpp, "missing_packages", lambda: [])


SETTINGS = quick_plan().precision["llamacpp"]


def test_a_peer_killed_by_sigill_is_reported_as_a_crash_not_by_its_log(monkeypatch, tmp_path):
    fake_child(monkeypatch, tmp_path, probe_ok=False)
    lines = []
    result = llamacpp.run(SETTINGS, tmp_path / "cache", lines.append)
    assert result["status"] == "crashed" and result["crashed"] and result["signal"] == "SIGILL"
    assert result["log_tail"] == ["ggml_amx_init: AMX tile kernels ready"]  # kept for diagnosis
    text = llamacpp_md(result, {"modes": {}})
    assert text == "llama.cpp: crashed (SIGILL) in its probe." and "crashed (SIGILL)" in lines[-1]


@pytest.mark.parametrize("exit_code", [0, 1, 3])
def test_a_crashed_worker_is_a_crashed_row_beside_ours(monkeypatch, tmp_path, exit_code):
    fake_child(monkeypatch, tmp_path, probe_ok=True, exit_code=exit_code)
    cache = tmp_path / "cache"
    cache.mkdir()
    settings = {**SETTINGS, "models": {"qwen35": SETTINGS["models"]["qwen35"]}}
    for kind in settings["types"]:  # present GGUF files: nothing to write (gguf need not be installed)
        (cache / f"qwen35-tiny-random-{kind}.gguf").write_bytes(b"")
    result = llamacpp.run(settings, cache, lambda line: None)
    assert result["status"] == "measured" and result["build_flags"] == ["AVX2", "AVX512"]
    crash = {0: "crashed (SIGILL)", 1: "crashed (exit code 1: RuntimeError: llama_decode failed)"}.get(
        exit_code, f"crashed (exit code {exit_code})"
    )
    for kind in settings["types"]:
        r = result["qwen35"][kind]
        assert r["crashed"] and llamacpp.outcome(r) == crash
    text = llamacpp_md(result, {"modes": {}})
    assert f"| llama.cpp qwen35 Q8_0 | {crash} |" in text and "AMX tile kernels" not in text
    assert "Built with AVX2 AVX512 (no AMX" in text


def test_without_the_packages_the_peer_is_skipped_with_a_note(monkeypatch, tmp_path):
    monkeypatch.setattr(llamacpp, "missing_packages", lambda: ["llama_cpp"])
    result = llamacpp.run(SETTINGS, tmp_path, lambda line: None)
    assert result["status"] == "not installed"
    assert llamacpp_md(result, {"modes": {}}).startswith("llama.cpp: not installed: llama_cpp not importable")
    assert "make peer" in result["error"]


def _decode(contexts, ms):
    return [{"context": c, "median_s": t / 1e3} for c, t in zip(contexts, ms)]


def test_the_hybrid_rows_sit_beside_ours():
    contexts = full_plan().precision["contexts"]
    modes = {
        "int8": {"status": "measured", "decode": _decode(contexts, [140, 141, 143]), "prefill": {}},
        "int4": {"status": "measured", "decode": _decode(contexts, [80, 81, 82])},
    }
    modes["int8"]["prefill"] = {"tokens": 4096, "tokens_per_s": 71.0}
    hybrid = {
        "model": gguf_models.MODELS["qwen35"],
        "Q8_0": {"status": "measured", "decode": _decode(contexts, [120, 150, 260])},
        "Q4_0": {"status": "crashed", "crashed": True, "signal": "SIGILL"},
    }
    hybrid["Q8_0"]["prefill"] = {"tokens": 4096, "tokens_per_s": 55.5}
    text = hybrid_md(hybrid, modes)
    assert [f"decode ms at {fmt_tokens(c)}" in text for c in contexts] == [True] * 3
    assert "| llama.cpp qwen35 Q8_0 | measured | 120.0 | 150.0 | 260.0 | 55.5 (4K) |" in text
    assert "| InfiniteVL int8 | measured | 140.0 | 141.0 | 143.0 | 71.0 (4K) |" in text
    assert "| llama.cpp qwen35 Q4_0 | crashed (SIGILL) | - | - | - | - |" in text
    ratio = modes["int8"]["decode"][0]["median_s"] / hybrid["Q8_0"]["decode"][0]["median_s"]
    assert f"InfiniteVL int8 / llama.cpp qwen35 Q8_0 at 4K: {ratio:.2f}x" in text

    lcpp = {"status": "measured", "qwen35": hybrid}
    targets = {t["target"]: t for t in llamacpp_targets(lcpp, modes, "cpu", _target)}
    first = targets["precision: int8 decode within 1.3x of llama.cpp qwen35 Q8_0 at 4K"]
    assert first["met"] == (ratio <= 1.3) and first["measured"] == f"{ratio:.2f}x llama.cpp's time"
    assert targets["precision: int8 decode faster than llama.cpp qwen35 Q8_0 at 256K"]["met"] is True
    assert not any("Q4_0" in name for name in targets)  # crashed: nothing to judge


def test_the_full_plan_compares_the_hybrid_where_ours_is_measured():
    p = full_plan().precision
    hybrid = p["llamacpp"]["models"]["qwen35"]
    assert hybrid["contexts"] == p["contexts"] and hybrid["prefill_tokens"] == p["prefill_tokens"]
    assert set(p["llamacpp"]["types"]) == {"Q8_0", "Q4_0"} and {"int8", "int4"} <= set(p["modes"])


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed (optional peer: make peer)")
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_the_tiny_hybrid_gguf_reads_back(tmp_path, kind):
    import gguf

    w = gguf_models.TINY["qwen35"]
    path = gguf_models.write_qwen35(tmp_path / "m.gguf", kind, w)
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["qwen35.attention.recurrent_layers"]
    assert [bool(field.parts[i][0]) for i in field.data] == gguf_models.recurrent_layers(w)
    assert reader.fields["general.architecture"].contents() == "qwen35"
    assert reader.fields["qwen35.ssm.group_count"].contents() == w["gdn_k_heads"]
    tensors = {t.name: t for t in reader.tensors}
    shape = lambda name: tuple(int(x) for x in tensors[name].shape)  # noqa: E731 (GGUF order: columns first)
    d, dk = w["hidden"], w["gdn_head_dim"]
    first_gdn = gguf_models.recurrent_layers(w).index(True)
    assert shape("blk.0.attn_q.weight") == (d, 2 * w["heads"] * w["head_dim"])
    assert shape(f"blk.{first_gdn}.attn_qkv.weight") == (d, (2 * w["gdn_k_heads"] + w["gdn_v_heads"]) * dk)
    assert shape(f"blk.{first_gdn}.ssm_conv1d.weight") == (w["conv"], (2 * w["gdn_k_heads"] + w["gdn_v_heads"]) * dk)
    assert f"blk.{first_gdn}.attn_q.weight" not in tensors and "blk.0.ssm_out.weight" not in tensors
    assert tensors["blk.0.attn_q.weight"].tensor_type == getattr(gguf.GGMLQuantizationType, kind)


def test_the_hybrid_widths_are_ours():
    from infinitevl.bench.configs import infinitevl_config
    from infinitevl.config import LINEAR

    t, w = infinitevl_config("4b").text, gguf_models.QWEN35
    assert (w["hidden"], w["layers"], w["ffn"], w["vocab"]) == (
        t.hidden_size,
        t.num_hidden_layers,
        t.intermediate_size,
        t.vocab_size,
    )
    assert [not r for r in gguf_models.recurrent_layers(w)] == [k != LINEAR for k in t.layer_types]
    assert (w["heads"], w["kv_heads"], w["head_dim"]) == (t.num_attention_heads, t.num_key_value_heads, t.head_dim)
    assert w["rope_sections"] == t.mrope_section
    # the GDN projections and memory have our sizes (value heads of 256 become twice as many of 128)
    dk, dv = t.linear_head_dim, int(t.linear_head_dim * t.expand_v)
    assert w["gdn_k_heads"] * w["gdn_head_dim"] == t.num_linear_heads * dk
    assert w["gdn_v_heads"] * w["gdn_head_dim"] == t.num_linear_heads * dv
    assert w["gdn_v_heads"] * w["gdn_head_dim"] ** 2 == t.num_linear_heads * dk * dv


@pytest.mark.skipif(
    llamacpp.missing_packages() != [], reason="llama-cpp-python / gguf not installed (optional peer: make peer)"
)
def test_llama_cpp_runs_both_tiny_models(tmp_path):
    result = llamacpp.run(SETTINGS, tmp_path, lambda line: None)
    assert result["status"] == "measured", json.dumps(result)[:2000]
    for arch, s in SETTINGS["models"].items():
        record = result if arch == "qwen2" else result[arch]
        for kind in SETTINGS["types"]:
            r = record[kind]
            assert r["status"] == "measured", json.dumps(r)[:2000]
            assert [p["context"] for p in r["decode"]] == s["contexts"]
            assert ("prefill" in r) == ("prefill_tokens" in s)
    assert result["qwen35"]["Q8_0"]["prefill"]["tokens"] == SETTINGS["models"]["qwen35"]["prefill_tokens"]
