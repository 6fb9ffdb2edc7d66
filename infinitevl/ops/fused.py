"""Fused C++ kernels for CPU decode steps (`csrc/decode.cpp`), built on first use, with the plain path as fallback.

A decode step's matrix products are few and large; everything between them (norms, casts, the conv step, gates,
the delta rule on the memory, RoPE, the ring write) is a few hundred small ops per layer, and on a CPU their
dispatch costs as much as a third of an int4 step. `csrc/decode.cpp` does that work in one call per layer and
norm, and (with AVX512-BF16) the bf16 matrix-vector products of a decode step, about 1.5x faster than torch's. It is
compiled once per machine with the system C++ compiler against the installed torch (a few seconds; no Python
headers, no ninja) into `~/.cache/infinitevl/kernels` (or INFINITEVL_KERNEL_DIR), keyed by the source,
torch version, compiler and CPU flags (it is built with -march=native: AVX-512 and AVX512-BF16 loops where the CPU
has them, portable loops otherwise), and loaded as `torch.ops.infinitevl.*`, with fake kernels for tracing.

The cache runs native code, so it trusts only what this user alone could have written: its folder is created 0700
and refused (plain path, with the reason in `status()`) when it, or a folder above it, is writable by others, or
when it belongs to another user; a library that is not the user's own, is writable by others or does not match
the digest written beside it at build time (truncated, replaced) is rebuilt. Builds go to a unique temporary name
and are renamed into place; older builds in the folder are removed.

When the kernels apply (INFINITEVL_FUSED_DECODE, read when a model decides its decode path: at its first decode
step and again when its dtype or device changes; `InfiniteVLTextModel.set_decode_path` overrides it):
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
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "decode.cpp"
FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-Wall", "-Wextra")
MODES = ("auto", "0", "1")
OPS = ("rms_norm", "add_rms_norm", "silu_mul", "linear_bf16", "gdn_decode", "swa_decode", "features")
STALE_TEMP_S = 3600  # a temporary build file this old was left by a build that died
_problem: str | None = None


class KernelCacheError(Exception):
    """The kernel cache cannot be trusted or written; the message says why and what to do."""


def mode() -> str:
    """INFINITEVL_FUSED_DECODE, checked. Read when a model decides its decode path, not per step."""
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
    # torch's headers are system headers: -Wall -Wextra then speak about decode.cpp alone
    includes = [
        "-isystem",
        str(root / "include"),
        "-isystem",
        str(root / "include" / "torch" / "csrc" / "api" / "include"),
    ]
    libs = [f"-L{root / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{root / 'lib'}"]
    return [compiler, *FLAGS, f"-march={arch()}", abi, *includes, str(source), *libs, "-o", str(out)]


def _build_key(compiler: str) -> str:
    from .precision import cpu_flags

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    parts = [SOURCE.read_text(), torch.__version__, *version, *FLAGS, arch(), *sorted(cpu_flags())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# -- the cache: a private folder, libraries checked against the digest their build wrote ---------------------------
def _loose(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def private_dir(folder: Path) -> Path:
    """`folder` created 0700 if missing, then checked: a real folder of this user's that nobody else can write, with
    no folder above it that another user could rename it out of. KernelCacheError otherwise."""
    folder = Path(os.path.abspath(folder))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise KernelCacheError(f"the kernel cache {folder} is not a folder (a link?)")
    if st.st_uid != os.getuid():
        raise KernelCacheError(f"the kernel cache {folder} belongs to another user (uid {st.st_uid})")
    if _loose(st):
        raise KernelCacheError(
            f"the kernel cache {folder} is writable by other users (mode {stat.filemode(st.st_mode)}): "
            f"chmod 700 it after checking its contents, or set INFINITEVL_KERNEL_DIR to a private folder"
        )
    for parent in folder.parents:  # a world-writable folder above (no sticky bit) lets others swap ours out
        pst = os.stat(parent)
        sticky = pst.st_mode & stat.S_ISVTX
        if pst.st_uid not in (0, os.getuid()) or (pst.st_mode & stat.S_IWOTH and not sticky):
            raise KernelCacheError(
                f"the kernel cache {folder} lies inside {parent}, which other users can write "
                f"(mode {stat.filemode(pst.st_mode)}, uid {pst.st_uid}): set INFINITEVL_KERNEL_DIR to a private folder"
            )
    return folder


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trusted(library: Path) -> bool:
    """Whether `library` is this user's regular file, writable by nobody else, and matches its build's digest."""
    record = library.with_suffix(".sha256")
    try:
        for path in (library, record):
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or _loose(st):
                return False
        return record.read_text().strip() == _digest(library)
    except OSError:
        return False


def _write_private(folder: Path, target: Path, write) -> None:
    """write(path) into a fresh unique file in `folder`, then renamed onto `target` (readers see old or new)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o700)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _compile(compiler: str, out: Path) -> None:
    proc = subprocess.run(_compile_command(compiler, SOURCE, out), capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        tail = (errors or proc.stderr.strip().splitlines() or ["no output"])[0]
        raise KernelCacheError(f"building the fused decode kernels failed ({tail})")


def _remove_stale(folder: Path, keep: str) -> None:
    """Other builds (another source, torch or compiler) and temporary files of builds that died."""
    for path in folder.glob("decode-*"):
        if path.name.startswith(keep):
            continue
        old_temp = path.suffix == ".tmp" and time.time() - path.stat().st_mtime > STALE_TEMP_S
        if path.suffix in (".so", ".sha256", ".lock") or old_temp:
            path.unlink(missing_ok=True)


def prepare(folder: Path, compiler: str, rebuild: bool = False) -> Path:
    """The library for this machine in `folder`, built unless a trusted one is there (or `rebuild`). Not loaded."""
    folder = private_dir(folder)
    target = folder / f"decode-{_build_key(compiler)}.so"
    fd = os.open(folder / f"{target.name}.lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as lock:  # one build at a time (parallel test workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rebuild or not trusted(target):
            print(f"infinitevl: building the fused decode kernels for this machine (once) in {folder}", file=sys.stderr)
            target.with_suffix(".sha256").unlink(missing_ok=True)
            _write_private(folder, target, lambda out: _compile(compiler, out))
            _write_private(folder, target.with_suffix(".sha256"), lambda out: out.write_text(_digest(target)))
            _remove_stale(folder, keep=target.stem)
    return target


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
    try:
        target = prepare(kernel_dir(), compiler)
        try:
            torch.ops.load_library(str(target))
        except OSError:  # trusted yet unloadable (a build against a since-replaced torch): once more, from source
            target = prepare(kernel_dir(), compiler, rebuild=True)
            torch.ops.load_library(str(target))
    except (OSError, KernelCacheError) as e:
        _problem = f"the fused decode kernels could not be built or loaded ({e}): decoding uses the plain ops"
        return None
    missing = [name for name in OPS if not hasattr(torch.ops.infinitevl, name)]
    if missing:
        _problem = f"the kernel library {target} lacks the ops {missing}: decoding uses the plain ops"
        return None
    _register_fakes()
    return target


def _register_fakes() -> None:
    """Output shapes without computing, so that the ops trace under torch.compile and torch.export."""
    fake = torch.library.register_fake
    fake("infinitevl::rms_norm")(lambda x, weight, eps: x.new_empty(x.shape))
    fake("infinitevl::add_rms_norm")(lambda x, residual, weight, eps: (x.new_empty(x.shape), x.new_empty(x.shape)))
    fake("infinitevl::silu_mul")(lambda gate, up: gate.new_empty(gate.shape))
    fake("infinitevl::linear_bf16")(lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0])))

    @fake("infinitevl::gdn_decode")
    def _(q, k, v, a, b, x, project_ab, gate, wq, wk, wv, tq, tk, tv, memory, A_log, dt_bias, norm_weight, eps, scale):
        return q.new_empty((memory.shape[0], memory.shape[1] * memory.shape[3]))

    @fake("infinitevl::swa_decode")
    def _(q, k, v, cos, sin, ring_k, ring_v, ring_pos, past, scale):
        return q.new_empty(q.shape)


def decides(dtype: torch.dtype, device: torch.device | str, requested: str | None = None) -> bool:
    """Whether decode steps of a model in `dtype` on `device` take the fused kernels under `requested` (a MODES
    entry; None reads INFINITEVL_FUSED_DECODE). Builds the kernels when they would apply."""
    m = mode() if requested is None else requested
    if m not in MODES:
        raise ValueError(f"decode path {m!r} is not one of {list(MODES)}")
    if m == "0" or torch.device(device).type != "cpu":
        return False
    if dtype != torch.bfloat16 and not (m == "1" and dtype == torch.float32):
        return False
    return library() is not None


@functools.cache
def features() -> frozenset[str]:
    """What the loaded kernels were built with ("avx512", "avx512_bf16"); empty without the kernels."""
    return frozenset(torch.ops.infinitevl.features()) if library() is not None else frozenset()


def linear_applies(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """Whether a bf16 linear layer on `x` (at most `max_rows` rows, no autograd) can take `linear_bf16`; the caller
    has decided that its model decodes with the kernels."""
    return (
        x.dtype == weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.numel() // x.shape[-1] <= max_rows
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and weight.is_contiguous()
        and "avx512_bf16" in features()
    )


def status(dtype: torch.dtype, requested: str | None = None) -> str:
    """One line for --verbose and /health: whether decode steps of a `dtype` model run the fused kernels."""
    m = mode() if requested is None else requested
    if decides(dtype, "cpu", m):
        gemv = ", bf16 linear layers of up to 16 rows on AVX512-BF16" if "avx512_bf16" in features() else ""
        return f"fused C++ decode kernels ({library().name}{gemv})"
    if m == "0":
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
    if residual is None:
        return kernels().rms_norm(x, weight, eps), x
    return kernels().add_rms_norm(x, residual, weight, eps)
