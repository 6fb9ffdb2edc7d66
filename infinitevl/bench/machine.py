"""The machine: what it is (CPU, cores, RAM, software versions, date) and what it can do at most (memory bandwidth
and fp32 matmul throughput), measured with plain torch operations.

Bandwidth is probed on tensors far larger than the last-level cache: a copy (counted as bytes read plus bytes
written), a sum (bytes read), and matrix-vector products (the matrix's bytes: the access pattern of a decode step)
in `nn.Linear`'s [out, in] layout with all threads and with one, and in the [in, out] layout (`x @ W`). The decode
floor uses the highest of them, so the floor is the strictest one the machine has been seen to allow; the GEMV
probes show how much of it torch's matrix-vector path reaches.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from .timing import measure


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    except OSError:
        pass
    return []


def describe() -> dict[str, Any]:
    """The facts every section records next to its numbers."""
    import transformers

    vm = psutil.virtual_memory()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": vm.total,
        "ram_available_bytes": vm.available,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _copy_probe(src: torch.Tensor, repeats: int) -> dict[str, Any]:
    dst = torch.zeros_like(src)  # touched: page faults stay out of the timing
    return measure(lambda: dst.copy_(src), repeats, warmup=1)


def probe_bandwidth(nbytes: int, repeats: int) -> dict[str, Any]:
    """Memory bandwidth (bytes/s) by copy, sum and matrix-vector product over `nbytes`-sized fp32 tensors."""
    n = nbytes // 4
    src = torch.ones(n)
    copy = _copy_probe(src, repeats)
    total = measure(lambda: src.sum(), repeats, warmup=1)
    cols = 4096
    weight = src[: n - n % cols].view(-1, cols)  # [out, in] as nn.Linear holds it
    x = torch.ones(1, cols)
    gemv = measure(lambda: F.linear(x, weight), repeats, warmup=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gemv_1 = measure(lambda: F.linear(x, weight), repeats, warmup=1)
    finally:
        torch.set_num_threads(threads)
    # the same bytes read as an [in, out] matrix (x @ W): another BLAS path, often faster for one row
    by_input = weight.view(cols, -1)
    x_in = torch.ones(1, cols)
    gemv_t = measure(lambda: x_in @ by_input, repeats, warmup=1)
    # the decode path's own kernel (`infinitevl.ops.linear`): the weight's halves as one batched product
    from ..ops.linear import linear

    gemv_batched = measure(lambda: linear(x, weight), repeats, warmup=1)
    wbytes = weight.numel() * 4

    def rate(timing: dict, nbytes: int) -> dict:
        return {**timing, "bytes_moved": nbytes, "bandwidth": nbytes / timing["median_s"]}

    out = {
        "tensor_bytes": n * 4,
        "copy": rate(copy, 2 * n * 4),
        "sum": rate(total, n * 4),
        "gemv": rate(gemv, wbytes),
        "gemv_1_thread": rate(gemv_1, wbytes),
        "gemv_input_major": rate(gemv_t, wbytes),
        "gemv_batched_halves": rate(gemv_batched, wbytes),
    }
    probes = [k for k in out if isinstance(out[k], dict)]
    out["bandwidth"] = max(out[k]["bandwidth"] for k in probes)
    out["bandwidth_from"] = max(probes, key=lambda k: out[k]["bandwidth"])
    return out


def probe_matmul(size: int, repeats: int) -> dict[str, Any]:
    """fp32 GEMM throughput (FLOP/s) for square [size x size] operands, and for a decoder-shaped product."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    square = measure(lambda: a @ b, repeats, warmup=1)
    tokens, d_in, d_out = size, size, size * 5 // 2
    x, w = torch.randn(tokens, d_in), torch.randn(d_out, d_in)
    linear = measure(lambda: F.linear(x, w), repeats, warmup=1)
    sq_flop, lin_flop = 2 * size**3, 2 * tokens * d_in * d_out
    return {
        "square": {**square, "shape": [size, size, size], "flop": sq_flop, "flops": sq_flop / square["median_s"]},
        "linear": {
            **linear,
            "shape": [tokens, d_in, d_out],
            "flop": lin_flop,
            "flops": lin_flop / linear["median_s"],
        },
        "flops": max(sq_flop / square["median_s"], lin_flop / linear["median_s"]),
    }


def run(plan, progress) -> dict[str, Any]:
    progress(f"machine: bandwidth probe on {plan.bandwidth_bytes / 2**30:.2f} GiB tensors")
    bandwidth = probe_bandwidth(plan.bandwidth_bytes, plan.probe_repeats)
    progress(f"machine: {bandwidth['bandwidth'] / 1e9:.1f} GB/s ({bandwidth['bandwidth_from']}); matmul probe")
    matmul = probe_matmul(plan.matmul_size, plan.probe_repeats)
    progress(f"machine: {matmul['flops'] / 1e9:.0f} GFLOP/s fp32")
    return {"bandwidth": bandwidth, "matmul": matmul}
