"""llama.cpp beside InfiniteVL, in the precision section: decode (and, for the hybrid, prefill) of random-weight
GGUF models in Q8_0 and Q4_0 against our int8 and int4.

Two models (bench/gguf_models.py): `qwen2`, a Transformer with Qwen2.5-VL-3B's text widths (full attention in every
layer), and `qwen35`, llama.cpp's Qwen3.5 hybrid (Gated DeltaNet + full-attention layers) at InfiniteVL-4B's widths.

Optional: `make peer` builds llama-cpp-python 0.3.36 from source with AMX off and AVX-512 on (its default
`-march=native` build takes ggml's AMX tile path on CPUs that report AMX, and `tileloadd` traps with SIGILL in VMs
that do not grant the tile state); the flags it was built with are recorded from `llama_print_system_info()`.
Nothing here imports llama_cpp in the benchmark's own process: a probe and one worker per (model, type) run in
subprocesses, and a worker that dies by a signal or exits non-zero is recorded as crashed (`signal` or `exit_code`,
with its log's tail kept for diagnosis), not as the last line of its log.

A context of N tokens: prefilling 64K tokens through a 3B model takes hours on 2 cores, so the cache is filled
through llama.cpp's own state API. A real prompt is prefilled (qwen2: 256 tokens; qwen35: the timed prefill of 4K
tokens), its sequence state read (`llama_state_seq_get_data`), the attention layers' KV cells repeated to N cells at
positions 0..N-1 and written back (`llama_state_seq_set_data`). For qwen35 the state also holds the GDN layers'
recurrent state (conv tails and memories: fixed-size, whatever N is); it is kept as the real prefill left it, its
position moved to N - 1. A decode step then attends over N cells and updates the same-size recurrent state exactly
as after a real prefill of N tokens. Decode: one token per `llama_decode` at positions N, N+1, ..., after one
untimed step; the median of `repeats`. Prefill (qwen35): the prompt in batches of 2048 (micro-batches of 512,
llama.cpp's defaults) after a short warm-up prompt, timed `prefill_repeats` times.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import gguf_models

CHILD = [sys.executable, "-m", "infinitevl.bench.llamacpp"]  # + the task as JSON
INSTALL = "make peer (llama-cpp-python 0.3.36 and gguf 0.19.0 built with AMX off, AVX-512 on)"
BATCH, UBATCH = 2048, 512


# -- the KV / recurrent state ----------------------------------------------------------------------------------------------
def stretch_state(blob: bytes, n_cells: int, recurrent: bool = False, cell_ext: bool = False) -> Any:
    """A llama.cpp sequence state (one KV stream) with its attention cells repeated to `n_cells` at positions
    0..n-1, as a numpy uint8 buffer. `recurrent`: a hybrid model's state, whose recurrent part follows the KV part
    (one cell); it is kept, its position set to n - 1. `cell_ext`: cells carry M-RoPE's 2D position and token
    (x, y, tok: models with multimodal RoPE), set to the new position (as for text) and the source cell's token."""
    import numpy as np

    src = np.frombuffer(blob, np.uint8)
    n_stream, count = struct.unpack_from("<II", blob, 8)  # after the state's magic number and sequence id
    if n_stream != 1:
        raise ValueError(f"expected one KV stream, got {n_stream}")
    ext = 3 if cell_ext else 0
    off, tokens = 16, []
    for _ in range(count):  # per cell: pos, n_seq_id, [x, y, tok], seq ids
        _pos, n_seq = struct.unpack_from("<iI", blob, off)
        tokens.append(struct.unpack_from(f"<{ext}i", blob, off + 8)[2:])
        if struct.unpack_from(f"<{n_seq}i", blob, off + 8 + 4 * ext) != (0,):
            raise ValueError("expected cells of sequence 0 only")
        off += 8 + 4 * ext + 4 * n_seq
    v_trans, n_layer = struct.unpack_from("<II", blob, off)
    cells = np.zeros((n_cells, 3 + ext), np.int32)  # the new cells: pos, n_seq_id = 1, [x, y, tok], seq 0
    cells[:, 0] = np.arange(n_cells)
    cells[:, 1] = 1
    if ext:
        cells[:, 2] = cells[:, 3] = cells[:, 0]
        cells[:, 4] = np.resize(np.array(tokens, np.int32).reshape(-1), n_cells)
    head = blob[:8] + struct.pack("<II", 1, n_cells) + cells.tobytes()
    pieces: list[Any] = [head, struct.pack("<II", v_trans, n_layer)]
    off += 8
    for part in ("k", "v"):  # per layer: type, row size, then the cells' rows (values: also transposed)
        for _ in range(n_layer):
            if part == "k" or not v_trans:
                row = struct.unpack_from("<iQ", blob, off)[1]
                pieces += [blob[off : off + 12], src[off + 12 : off + 12 + count * row].reshape(count, row)]
                off += 12 + count * row
            else:  # per channel, the cells' elements
                el, n_embd = struct.unpack_from("<iII", blob, off)[1:]
                data = src[off + 12 : off + 12 + n_embd * count * el].reshape(n_embd, count, el)
                pieces += [blob[off : off + 12], data]
                off += 12 + n_embd * count * el
    rest = blob[off:]
    if recurrent:
        n_recurrent = struct.unpack_from("<I", rest)[0]
        if n_recurrent != 1:
            raise ValueError(f"expected one recurrent cell, got {n_recurrent}")
        rest = rest[:4] + struct.pack("<i", n_cells - 1) + rest[8:]
    elif rest:
        raise ValueError(f"unexpected state layout: {len(rest)} bytes left over")
    pieces.append(rest)
    # the cells are written in place, repeated: no tiled copy of a state of several GB
    size = sum(len(p) if isinstance(p, bytes) else p.size // count * n_cells for p in pieces)
    out = np.empty(size, np.uint8)
    at = 0
    for p in pieces:
        if isinstance(p, bytes):
            out[at : at + len(p)] = np.frombuffer(p, np.uint8)
            at += len(p)
            continue
        cells_axis = 0 if p.ndim == 2 else 1
        shape = list(p.shape)
        shape[cells_axis] = n_cells
        dst = out[at : at + p.size // count * n_cells].reshape(shape)
        for start in range(0, n_cells, count):
            m = min(count, n_cells - start)
            if cells_axis == 0:
                dst[start : start + m] = p[:m]
            else:
                dst[:, start : start + m] = p[:, :m]
        at += dst.size
    return out


# -- the subprocess --------------------------------------------------------------------------------------------------------
def probe() -> dict[str, Any]:
    import llama_cpp as L

    L.llama_backend_init()
    return {"version": L.__version__, "system_info": L.llama_print_system_info().decode()}


def worker(task: dict[str, Any]) -> dict[str, Any]:
    """Inside the subprocess: load the GGUF, prefill a real prompt (timed for qwen35), then decode at every context
    with the prompt's state stretched to it."""
    import llama_cpp as L

    from .timing import summary

    L.llama_backend_init()
    model = L.llama_model_load_from_file(task["gguf"].encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {task['gguf']}")
    seed, recurrent = task["seed_tokens"], task["arch"] == "qwen35"
    out: dict[str, Any] = {"decode": []}
    blob = None
    for n in task["contexts"]:
        params = L.llama_context_default_params()
        params.n_ctx = max(n, seed) + 64
        params.n_batch, params.n_ubatch = BATCH, UBATCH
        params.n_threads = params.n_threads_batch = task["threads"]
        ctx = L.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        batch = L.llama_batch_init(BATCH, 0, 1)
        memory = L.llama_get_memory(ctx)

        def decode(tokens: list[int], start: int, batch=batch, ctx=ctx) -> None:
            for at in range(0, len(tokens), BATCH):
                part = tokens[at : at + BATCH]
                batch.n_tokens = len(part)
                for i, t in enumerate(part):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + at + i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = at + i == len(tokens) - 1
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")

        if blob is None:
            prompt = [100 + i % 300 for i in range(seed)]  # ids within the tiny models' vocabulary too
            if task.get("time_prefill"):
                decode(prompt[:64], 0)  # warm-up
                times = []
                for _ in range(task["prefill_repeats"]):
                    L.llama_memory_clear(memory, True)
                    start = time.perf_counter()
                    decode(prompt, 0)
                    times.append(time.perf_counter() - start)
                out["prefill"] = {"tokens": seed, "batch": BATCH, "ubatch": UBATCH, **summary(times)}
                out["prefill"]["tokens_per_s"] = seed / out["prefill"]["median_s"]
            else:
                decode(prompt, 0)
            size = L.llama_state_seq_get_size(ctx, 0)
            buf = (ctypes.c_uint8 * size)()
            L.llama_state_seq_get_data(ctx, buf, size, 0)
            blob = bytes(buf)
            del buf
        state = stretch_state(blob, n, recurrent, cell_ext=recurrent)  # qwen35: interleaved M-RoPE, 2D cells
        L.llama_memory_clear(memory, True)
        pointer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if L.llama_state_seq_set_data(ctx, pointer, state.size, 0) != state.size:
            raise RuntimeError("llama.cpp refused the stretched state")
        del state, pointer
        if L.llama_memory_seq_pos_max(memory, 0) != n - 1:
            raise RuntimeError("the cache does not hold the context asked for")
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


def run_child(task: dict[str, Any], timeout: float) -> dict[str, Any]:
    """`python -m infinitevl.bench.llamacpp TASK` -> its JSON; a signal, a non-zero exit or a timeout is recorded
    as such (`crashed`, `signal` / `exit_code`, the log's tail) instead of as a result."""
    cmd = [*CHILD, json.dumps(task)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return {"status": "timed out", "crashed": False, "timeout_s": timeout, "log_tail": _tail(log)}
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return {"status": "crashed", "crashed": True, "signal": name, "log_tail": _tail(proc.stderr)}
    if proc.returncode != 0:
        out = {"status": "crashed", "crashed": True, "exit_code": proc.returncode, "log_tail": _tail(proc.stderr)}
        last = out["log_tail"][-1] if out["log_tail"] else ""
        if re.match(r"\w+(Error|Exception)\b", last):  # a Python exception's own message (not llama.cpp's log)
            out["error"] = last
        return out
    return {"status": "measured", **json.loads(proc.stdout.strip().splitlines()[-1])}


def _tail(log: str, lines: int = 8) -> list[str]:
    return log.strip().splitlines()[-lines:]


def outcome(r: dict[str, Any]) -> str:
    """A short phrase for a result that is not a measurement: 'crashed (SIGILL)', 'crashed (exit code 1)', ..."""
    if r.get("crashed"):
        if r.get("signal"):
            return f"crashed ({r['signal']})"
        return f"crashed (exit code {r.get('exit_code')}" + (f": {r['error']})" if r.get("error") else ")")
    if r.get("status") == "timed out":
        return f"timed out after {r.get('timeout_s', 0):.0f} s"
    return f"{r.get('status', 'not run')}" + (f": {r['error']}" if r.get("error") else "")


def build_flags(system_info: str) -> list[str]:
    """The CPU features llama.cpp was compiled with, from its system info string ('AVX512 = 1 | ...')."""
    flags = []
    for item in system_info.split("|"):
        name, _, value = item.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and value.strip() == "1":
            flags.append(name)
    return flags


# -- the parent ------------------------------------------------------------------------------------------------------------
def missing_packages() -> list[str]:
    return [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]


def run(settings: dict[str, Any], cache: Path, progress) -> dict[str, Any]:
    missing = missing_packages()
    if missing:
        return {"status": "not installed", "error": f"{' and '.join(missing)} not importable; install: {INSTALL}"}
    import torch

    threads = torch.get_num_threads()
    found = run_child({"probe": True}, 120)
    if found["status"] != "measured":
        progress(f"llama.cpp: {outcome(found)}")
        return {**found, "status": "crashed" if found.get("crashed") else found["status"], "stage": "probe"}
    out: dict[str, Any] = {"status": "measured", "threads": threads, "version": found["version"]}
    out["system_info"], out["build_flags"] = found["system_info"], build_flags(found["system_info"])
    progress(f"llama.cpp {out['version']}: built with {' '.join(out['build_flags'])}")
    cache.mkdir(parents=True, exist_ok=True)
    for arch, s in settings["models"].items():
        widths = gguf_models.TINY[arch] if settings.get("tiny") else getattr(gguf_models, arch.upper())
        record: dict[str, Any] = {"model": gguf_models.MODELS[arch], "widths": widths}
        if settings.get("tiny"):
            record["model"] = f"tiny {arch} (quick run)"
        for kind in settings["types"]:
            path = cache / f"{arch}-{'tiny' if settings.get('tiny') else 'full'}-random-{kind}.gguf"
            if not path.exists():
                progress(f"llama.cpp: writing {path.name}")
                start = time.perf_counter()
                gguf_models.WRITERS[arch](path.with_suffix(".tmp"), kind, widths).rename(path)
                progress(f"llama.cpp: {path.name} written in {time.perf_counter() - start:.0f} s")
            task = {"gguf": str(path), "arch": arch, "threads": threads, "repeats": s["repeats"]}
            task.update(contexts=s["contexts"], seed_tokens=s.get("prefill_tokens", 256))
            task.update(time_prefill="prefill_tokens" in s, prefill_repeats=s.get("prefill_repeats", 1))
            result = run_child(task, s["seconds"])
            record[kind] = result
            if result["status"] != "measured":
                progress(f"llama.cpp {arch} {kind}: {outcome(result)}")
                continue
            result["file_bytes"] = path.stat().st_size
            progress(
                f"llama.cpp {arch} {kind}: "
                + ", ".join(f"{p['median_s'] * 1e3:.1f} ms at {p['context']}" for p in result["decode"])
                + (f", prefill {result['prefill']['tokens_per_s']:.1f} tok/s" if "prefill" in result else "")
            )
        if arch == "qwen2":  # the layout of the records before the hybrid: the Transformer's types at the top
            out.update({k: v for k, v in record.items() if k != "widths"})
        else:
            out[arch] = record
    return out


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    print(json.dumps(probe() if job.get("probe") else worker(job)))
