"""Fused C++ kernels for CPU decode steps (`csrc/decode.cpp`), built on first use, with the plain path as fallback.

A decode step's matrix products are few and large; everything between them (norms, casts, the conv step, gates,
the delta rule on the memory, RoPE, the ring write) is a few hundred small ops per layer, and on a CPU their
dispatch costs as much as a third of an int4 step. `csrc/decode.cpp` does that work in one call per layer and
norm, and (with AVX512-BF16) the bf16 matrix-vector products of a decode step, about 1.5x faster than torch's. It is
compiled once per machine with the system C++ compiler against the installed torch (a few seconds; no Python
headers, no ninja) into `~/.cache/infinitevl/kernels` (or INFINITEVL_KERNEL_DIR), keyed by the source,
torch version, compiler and CPU flags (it is built with -march=native: AVX-512 and AVX512-BF16 loops where the CPU
has them, portable loops otherwise), and loaded as `torch.ops.infinitevl.*`.

When the kernels apply (INFINITEVL_FUSED_DECODE):
    auto (default)  CPU decode steps of a bf16 model (which includes int8 / int4 models); fp32 stays the plain
                    path, the exact reference
    1               also fp32 (tests compare the two paths this way)
    0               never
If no compiler is found or the build fails, decoding uses the plain path and `status()` says why. The plain ops in
this package remain the reference: tests hold each kernel to them.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "decode.cpp"
FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w")
MODES = ("auto", "0", "1")
_problem: str | None = None


def mode() -> str:
    value = os.environ.get("INFINITEVL_FUSED_DECODE", "auto")
    if value not in MODES:
        raise ValueError(f"INFINITEVL_FUSED_DECODE={value!r} is not one of {list(MODES)}")
    return value


def kernel_dir() -> Path:
    if os.environ.get("INFINITEVL_KERNEL_DIR"):
        return Path(os.environ["INFINITEVL_KERNEL_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "infinitevl" / "kernels"


def arch() -> str:
    """The -march the kernels are built for: this CPU (`native`) unless INFINITEVL_KERNEL_ARCH names another (the
    tests build an AVX2-only variant this way, to run the paths of CPUs without AVX-512)."""
    return os.environ.get("INFINITEVL_KERNEL_ARCH", "native")


def _compile_command(compiler: str, source: Path, out: Path) -> list[str]:
    root = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    libs = [f"-L{root / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{root / 'lib'}"]
    return [compiler, *FLAGS, f"-march={arch()}", abi, *includes, str(source), *libs, "-o", str(out)]


def _build_key(compiler: str) -> str:
    from .precision import cpu_flags

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    parts = [SOURCE.read_text(), torch.__version__, *version, *FLAGS, arch(), *sorted(cpu_flags())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@functools.cache
def library() -> Path | None:
    """The built and loaded kernel library, or None (the reason is in `status()`). Builds it on first call."""
    global _problem
    if sys.platform != "linux":
        _problem = f"fused decode kernels are built on Linux only (this is {sys.platform})"
        return None
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        _problem = f"no C++ compiler ({compiler!r} not found; set CXX): decoding uses the plain PyTorch ops"
        return None
    folder = kernel_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"decode-{_build_key(compiler)}.so"
        with open(folder / f"{target.name}.lock", "w") as lock:  # one build at a time (parallel test workers)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                print(
                    f"infinitevl: building the fused decode kernels for this machine (once) in {folder}",
                    file=sys.stderr,
                )
                partial = target.with_suffix(f".{os.getpid()}.tmp")
                proc = subprocess.run(_compile_command(compiler, SOURCE, partial), capture_output=True, text=True)
                if proc.returncode != 0:
                    partial.unlink(missing_ok=True)
                    errors = [line for line in proc.stderr.splitlines() if "error" in line]
                    tail = (errors or proc.stderr.strip().splitlines() or ["no output"])[0]
                    _problem = f"building the fused decode kernels failed ({tail}): decoding uses the plain ops"
                    return None
                partial.replace(target)
        torch.ops.load_library(str(target))
    except OSError as e:
        _problem = f"the fused decode kernels could not be built or loaded ({e}): decoding uses the plain ops"
        return None
    return target


def applies(x: torch.Tensor) -> bool:
    """Whether a decode step on activations like `x` takes the fused kernels (builds them on first use)."""
    m = mode()
    if m == "0" or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if x.dtype != torch.bfloat16 and not (m == "1" and x.dtype == torch.float32):
        return False
    return library() is not None


@functools.cache
def features() -> frozenset[str]:
    """What the loaded kernels were built with ("avx512", "avx512_bf16"); empty without the kernels."""
    return frozenset(kernels().features()) if library() is not None else frozenset()


def linear_applies(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """Whether a bf16 linear layer on `x` (at most `max_rows` rows, no autograd) takes `linear_bf16`."""
    return (
        x.dtype == weight.dtype == torch.bfloat16
        and x.numel() // x.shape[-1] <= max_rows
        and not (torch.is_grad_enabled() and weight.requires_grad)
        and weight.is_contiguous()
        and applies(x)
        and "avx512_bf16" in features()
    )


def status(dtype: torch.dtype) -> str:
    """One line for --verbose and /health: whether decode steps of a `dtype` model run the fused kernels."""
    probe = torch.empty(0, dtype=dtype)
    if applies(probe):
        gemv = ", bf16 linear layers of up to 16 rows on AVX512-BF16" if "avx512_bf16" in features() else ""
        return f"fused C++ decode kernels ({library().name}{gemv})"
    if mode() == "0":
        return "plain PyTorch ops (INFINITEVL_FUSED_DECODE=0)"
    if _problem is not None:
        return _problem
    return f"plain PyTorch ops (the fused kernels serve bf16 models; this one is {str(dtype).removeprefix('torch.')})"


def kernels():
    """`torch.ops.infinitevl`, built and loaded (RuntimeError with the reason when they cannot be)."""
    if library() is None:
        raise RuntimeError(_problem)
    return torch.ops.infinitevl


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """(norm(x + residual) * weight, x + residual) or (norm(x) * weight, x); x, residual [..., d]."""
    residual = residual.contiguous() if residual is not None else None
    return kernels().rms_norm(x.contiguous(), weight, eps, residual)
