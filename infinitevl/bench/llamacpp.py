"""llama.cpp beside InfiniteVL: decode of a Transformer with Qwen2.5-VL-3B's text widths in Q8_0 and Q4_0.

Optional: `pip install llama-cpp-python gguf` (pip compiles llama.cpp for this CPU; not needed by the tests). The
model is written with the `gguf` package as architecture `qwen2` (Qwen2.5-VL's text model is Qwen2 with multimodal
RoPE, which changes positions, not work): hidden 2048, 36 layers, 16 query / 2 key-value heads of 128, MLP 11008,
vocabulary 151936, tied embeddings, random weights (all tensors of one shape share one random matrix, quantized once
per shape: the work per token is the same).

A context of N tokens: prefilling 64K tokens through a 3B model takes hours on 2 cores, so the KV cache is filled
through llama.cpp's own state API: a short prompt is prefilled, its sequence state read (`llama_state_seq_get_data`),
its cells repeated to N cells at positions 0..N-1 and written back (`llama_state_seq_set_data`). A decode step then
attends over N cells exactly as after a real prefill. Decode: one token per `llama_decode` at positions N, N+1, ...,
after one untimed step; the median of `repeats`. Each quantization type runs in its own process.
"""

from __future__ import annotations

import ctypes
import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WIDTHS = dict(vocab=151936, hidden=2048, layers=36, heads=16, kv_heads=2, head_dim=128, ffn=11008, theta=1e6)
MODEL = "Qwen2.5-VL-3B text widths (qwen2 architecture), random weights"


def write_gguf(path: Path, kind: str) -> Path:
    """A qwen2-architecture GGUF of `WIDTHS` in `kind` (Q8_0 / Q4_0; norms and biases in F32)."""
    import gguf
    import numpy as np

    w = WIDTHS
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(1 << 20)
    writer.add_embedding_length(w["hidden"])
    writer.add_block_count(w["layers"])
    writer.add_feed_forward_length(w["ffn"])
    writer.add_head_count(w["heads"])
    writer.add_head_count_kv(w["kv_heads"])
    writer.add_rope_freq_base(w["theta"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(w["vocab"])
    rng = np.random.default_rng(0)
    cache: dict[tuple, Any] = {}

    def matrix(rows: int, cols: int):
        if (rows, cols) not in cache:
            values = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
            cache[(rows, cols)] = gguf.quants.quantize(values, qtype)
        return cache[(rows, cols)]

    def add(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, matrix(rows, cols), raw_dtype=qtype)  # shape: from the quantized bytes

    d, kv = w["hidden"], w["kv_heads"] * w["head_dim"]
    ones, zeros = np.ones(d, dtype=np.float32), np.zeros(max(d, kv), dtype=np.float32)
    add("token_embd.weight", w["vocab"], d)
    writer.add_tensor("output_norm.weight", ones)
    for i in range(w["layers"]):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones)
        writer.add_tensor(p + "ffn_norm.weight", ones)
        add(p + "attn_q.weight", d, d)
        add(p + "attn_k.weight", kv, d)
        add(p + "attn_v.weight", kv, d)
        add(p + "attn_output.weight", d, d)
        writer.add_tensor(p + "attn_q.bias", zeros[:d])
        writer.add_tensor(p + "attn_k.bias", zeros[:kv])
        writer.add_tensor(p + "attn_v.bias", zeros[:kv])
        add(p + "ffn_gate.weight", w["ffn"], d)
        add(p + "ffn_up.weight", w["ffn"], d)
        add(p + "ffn_down.weight", d, w["ffn"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def stretch_state(blob: bytes, n_cells: int) -> bytes:
    """A llama.cpp KV sequence state (one stream) with its cells repeated to `n_cells` at positions 0..n-1."""
    import numpy as np

    head = blob[:8]  # the state's magic number and sequence id, kept as they are
    n_stream, count = struct.unpack_from("<II", blob, 8)
    if n_stream != 1:
        raise ValueError(f"expected one KV stream, got {n_stream}")
    off = 16
    seqs = []
    for _ in range(count):
        _pos, n_seq = struct.unpack_from("<iI", blob, off)
        seqs.append(struct.unpack_from(f"<{n_seq}i", blob, off + 8))
        off += 8 + 4 * n_seq
    if any(s != (0,) for s in seqs):
        raise ValueError("expected cells of sequence 0 only")
    v_trans, n_layer = struct.unpack_from("<II", blob, off)
    off += 8
    parts = [head, struct.pack("<II", 1, n_cells)]
    parts += [struct.pack("<iIi", pos, 1, 0) for pos in range(n_cells)]
    parts.append(struct.pack("<II", v_trans, n_layer))
    reps = -(-n_cells // count)

    def rows(off: int, row: int) -> tuple[bytes, int]:
        data = np.frombuffer(blob, np.uint8, count * row, off).reshape(count, row)
        return np.tile(data, (reps, 1))[:n_cells].tobytes(), off + count * row

    for _ in range(n_layer):  # keys: per layer, type, row size, then the cells' rows
        k_type, k_row = struct.unpack_from("<iQ", blob, off)
        data, off = rows(off + 12, k_row)
        parts += [struct.pack("<iQ", k_type, k_row), data]
    for _ in range(n_layer):
        if not v_trans:  # values as rows, like the keys
            v_type, v_row = struct.unpack_from("<iQ", blob, off)
            data, off = rows(off + 12, v_row)
            parts += [struct.pack("<iQ", v_type, v_row), data]
        else:  # transposed: per channel, the cells' elements
            v_type, el, n_embd = struct.unpack_from("<iII", blob, off)
            off += 12
            data = np.frombuffer(blob, np.uint8, n_embd * count * el, off).reshape(n_embd, count, el)
            off += n_embd * count * el
            tiled = np.tile(data, (1, reps, 1))[:, :n_cells]
            parts += [struct.pack("<iII", v_type, el, n_embd), tiled.tobytes()]
    if off != len(blob):
        raise ValueError(f"unexpected state layout: {len(blob) - off} bytes left over")
    return b"".join(parts)


def worker(task: dict[str, Any]) -> dict[str, Any]:
    """Inside the subprocess: load the GGUF, then decode at every context (largest cache first allocated once)."""
    import llama_cpp as L

    from .timing import summary

    L.llama_backend_init()
    model = L.llama_model_load_from_file(task["gguf"].encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {task['gguf']}")
    out: dict[str, Any] = {"decode": []}
    for n in task["contexts"]:
        params = L.llama_context_default_params()
        params.n_ctx = n + 64
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = task["threads"]
        ctx = L.llama_init_from_model(model, params)
        batch = L.llama_batch_init(512, 0, 1)

        def decode(tokens: list[int], start: int, batch=batch, ctx=ctx) -> None:
            batch.n_tokens = len(tokens)
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(tokens) - 1
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        decode(list(range(100, 100 + task["seed_tokens"])), 0)
        size = L.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        L.llama_state_seq_get_data(ctx, buf, size, 0)
        blob = stretch_state(bytes(buf), n)
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        data = (ctypes.c_uint8 * len(blob)).from_buffer(bytearray(blob))
        if L.llama_state_seq_set_data(ctx, data, len(blob), 0) != len(blob):
            raise RuntimeError("llama.cpp refused the stretched KV state")
        del blob, data
        if L.llama_memory_seq_pos_max(L.llama_get_memory(ctx), 0) != n - 1:
            raise RuntimeError("the KV cache does not hold the context asked for")
        decode([7], n)  # untimed
        times = []
        for i in range(task["repeats"]):
            start = time.perf_counter()
            decode([7 + i], n + 1 + i)
            times.append(time.perf_counter() - start)
        out["decode"].append({"context": n, **summary(times), "kv_cells": n})
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    L.llama_model_free(model)
    return out


def run(settings: dict[str, Any], cache: Path, progress) -> dict[str, Any]:
    import importlib.util

    missing = [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "not installed", "error": f"{' and '.join(missing)} not importable"}
    import llama_cpp
    import torch

    out: dict[str, Any] = {"status": "measured", "model": MODEL, "version": llama_cpp.__version__}
    out["threads"] = torch.get_num_threads()
    cache.mkdir(parents=True, exist_ok=True)
    for kind in settings["types"]:
        path = cache / f"qwen2.5-vl-3b-text-random-{kind}.gguf"
        if not path.exists():
            progress(f"llama.cpp: writing {path.name}")
            start = time.perf_counter()
            write_gguf(path.with_suffix(".tmp"), kind).rename(path)
            progress(f"llama.cpp: {path.name} written in {time.perf_counter() - start:.0f} s")
        task = {
            "gguf": str(path),
            "contexts": settings["contexts"],
            "repeats": settings["repeats"],
            "threads": out["threads"],
            "seed_tokens": 256,
        }
        proc = subprocess.run(
            [sys.executable, "-m", "infinitevl.bench.llamacpp", json.dumps(task)],
            capture_output=True,
            text=True,
            timeout=settings["seconds"],
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            out[kind] = {"status": "failed", "error": tail[0]}
            progress(f"llama.cpp {kind}: failed: {tail[0]}")
            continue
        out[kind] = {
            "status": "measured",
            "file_bytes": path.stat().st_size,
            **json.loads(proc.stdout.splitlines()[-1]),
        }
        progress(
            f"llama.cpp {kind}: "
            + ", ".join(f"{p['median_s'] * 1e3:.1f} ms at {p['context']}" for p in out[kind]["decode"])
        )
    return out


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
