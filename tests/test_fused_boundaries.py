"""The edges of the fused decode kernels (ops/fused.py, ops/csrc/decode.cpp): public torch ops refuse inputs that do
not fit before touching memory, trace under torch.compile / torch.export, and come from a cache that loads only a
library this user built."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from infinitevl.ops import fused

pytestmark = pytest.mark.usefixtures("kernels")


@pytest.fixture
def kernels():
    """Without a compiler these tests have nothing to check (conftest: a failure under CI=true)."""
    from conftest import require_compiler

    require_compiler()
    assert fused.library() is not None, fused.status(torch.bfloat16)
    return torch.ops.infinitevl


def gdn_args(B=2, H=2, KVh=1, Dk=4, Dv=4, d=8, K=4, dtype=torch.float32) -> dict:
    """Valid gdn_decode arguments (gate projections given, not projected)."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt)

    return dict(
        q=r(B, H * Dk), k=r(B, KVh * Dk), v=r(B, KVh * Dv), a=r(B, H), b=r(B, H), x=r(B, d), project_ab=False,
        gate=r(B, H * Dv), wq=r(H * Dk, 1, K), wk=r(KVh * Dk, 1, K), wv=r(KVh * Dv, 1, K),
        tail_q=r(B, H * Dk, K - 1), tail_k=r(B, KVh * Dk, K - 1), tail_v=r(B, KVh * Dv, K - 1),
        memory=r(B, H, Dk, Dv, dt=torch.float32), A_log=r(H), dt_bias=r(H), norm_weight=r(Dv), eps=1e-6, scale=0.5,
    )  # fmt: skip


def swa_args(B=2, KV=1, G=2, cap=5, D=8, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return dict(
        q=r(B, KV * G * D), k=r(B, KV * D), v=r(B, KV * D), cos=r(B, D), sin=r(B, D), ring_k=r(B, KV, cap, D),
        ring_v=r(B, KV, cap, D), ring_pos=torch.full((B, cap), -1), past=torch.zeros(B, dtype=torch.long), scale=0.3,
    )  # fmt: skip


def linear_args(rows=2, n=8, k=40) -> dict:
    return dict(x=torch.randn(rows, k).bfloat16(), weight=torch.randn(n, k).bfloat16(), bias=torch.randn(n).bfloat16())


GDN_REFUSALS = {  # each: a change to valid arguments, and the words the error must contain
    "projections for batch 1, memory for batch 2": (
        lambda a: a.update(q=a["q"][:1], k=a["k"][:1], v=a["v"][:1], gate=a["gate"][:1], a=a["a"][:1], b=a["b"][:1]),
        "q has shape",
    ),
    "A_log too short": (lambda a: a.update(A_log=a["A_log"][:1]), "A_log"),
    "dt_bias too long": (lambda a: a.update(dt_bias=torch.zeros(5)), "dt_bias"),
    "norm_weight too short": (lambda a: a.update(norm_weight=a["norm_weight"][:2]), "norm_weight"),
    "tail of another width": (lambda a: a.update(tail_k=a["tail_k"][:, :, :2].contiguous()), "tail_k"),
    "tail not contiguous": (lambda a: a.update(tail_q=a["tail_q"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
    "memory in bf16": (lambda a: a.update(memory=a["memory"].bfloat16()), "memory"),
    "gate of another dtype": (lambda a: a.update(gate=a["gate"].double()), "gate"),
    "conv weight of another width": (lambda a: a.update(wv=a["wv"][:2]), "wv"),
    "a of the wrong width": (lambda a: a.update(a=a["a"][:, :1]), "a has shape"),
    "projected a/b weights of another width": (
        lambda a: a.update(project_ab=True, a=torch.zeros(2, 7), b=torch.zeros(2, 8)),
        "a (weight)",
    ),
}  # fmt: skip

SWA_REFUSALS = {
    "cos/sin of batch 1 for batch 2": (lambda a: a.update(cos=a["cos"][:1], sin=a["sin"][:1]), "cos has shape"),
    "ring_pos [1, cap] for batch 2": (lambda a: a.update(ring_pos=a["ring_pos"][:1]), "ring_pos"),
    "past of batch 1": (lambda a: a.update(past=a["past"][:1]), "past"),
    "negative past": (lambda a: a.update(past=torch.tensor([0, -3])), "negative"),
    "ring values of another shape": (lambda a: a.update(ring_v=a["ring_v"][:, :, :3].contiguous()), "ring_v"),
    "int32 positions": (lambda a: a.update(ring_pos=a["ring_pos"].int()), "ring_pos"),
    "k for another head count": (lambda a: a.update(k=torch.zeros(2, 16)), "k has shape"),
    "odd head width": (lambda a: a.update(ring_k=torch.zeros(2, 1, 5, 7), ring_v=torch.zeros(2, 1, 5, 7)), "even"),
    "ring keys not contiguous": (lambda a: a.update(ring_k=a["ring_k"].transpose(2, 3).contiguous().transpose(2, 3)), "contiguous"),
}  # fmt: skip

LINEAR_REFUSALS = {
    "bias shorter than the weight's rows": (lambda a: a.update(bias=a["bias"][:5]), "bias"),
    "x of another width": (lambda a: a.update(x=a["x"][:, :7]), "x [..., K=40]"),
    "fp32 weight": (lambda a: a.update(weight=a["weight"].float()), "weight"),
}

NORM_REFUSALS = {
    "weight of another width": (lambda a: a.update(weight=a["weight"][:3]), "weight has shape"),
    "residual of another shape": (lambda a: a.update(residual=a["residual"][:1]), "residual"),
    "weight of another dtype": (lambda a: a.update(weight=a["weight"].bfloat16()), "weight"),
}


def test_valid_arguments_run(kernels):
    """The baselines the refusals below alter are themselves accepted."""
    kernels.gdn_decode(**gdn_args())
    kernels.swa_decode(**swa_args())
    kernels.add_rms_norm(torch.randn(2, 6), torch.randn(2, 6), torch.randn(6), 1e-6)
    if "avx512_bf16" in fused.features():
        kernels.linear_bf16(**linear_args())


@pytest.mark.parametrize("case", list(GDN_REFUSALS))
def test_gdn_decode_refuses(kernels, case):
    args = gdn_args()
    change, words = GDN_REFUSALS[case]
    change(args)
    before = {k: v.clone() for k, v in args.items() if k in ("memory", "tail_q", "tail_k", "tail_v")}
    with pytest.raises(RuntimeError, match="gdn_decode") as e:
        kernels.gdn_decode(**args)
    assert words in str(e.value)
    assert all(torch.equal(args[k], v) for k, v in before.items())  # nothing written before the refusal


@pytest.mark.parametrize("case", list(SWA_REFUSALS))
def test_swa_decode_refuses(kernels, case):
    args = swa_args()
    change, words = SWA_REFUSALS[case]
    change(args)
    with pytest.raises(RuntimeError, match="swa_decode") as e:
        kernels.swa_decode(**args)
    assert words in str(e.value)


@pytest.mark.parametrize("case", list(LINEAR_REFUSALS))
def test_linear_bf16_refuses(kernels, case):
    args = linear_args()
    change, words = LINEAR_REFUSALS[case]
    change(args)
    with pytest.raises(RuntimeError, match="linear_bf16") as e:
        kernels.linear_bf16(**args)
    assert words in str(e.value)


@pytest.mark.parametrize("case", list(NORM_REFUSALS))
def test_add_rms_norm_refuses(kernels, case):
    args = dict(x=torch.randn(2, 6), residual=torch.randn(2, 6), weight=torch.randn(6), eps=1e-6)
    change, words = NORM_REFUSALS[case]
    change(args)
    with pytest.raises(RuntimeError, match="add_rms_norm") as e:
        kernels.add_rms_norm(**args)
    assert words in str(e.value)


def test_the_ops_pass_torch_opcheck(kernels):
    """Schema (no undeclared aliasing or mutation), fake kernels against the real ones, and autograd registration,
    as torch.library.opcheck tests them."""
    x, res, w = torch.randn(3, 6), torch.randn(3, 6), torch.randn(6)
    cases = [
        (kernels.rms_norm.default, (x, w, 1e-6)),
        (kernels.add_rms_norm.default, (x, res, w, 1e-6)),
        (kernels.silu_mul.default, (x, res)),
        (kernels.gdn_decode.default, tuple(gdn_args().values())),
        (kernels.swa_decode.default, tuple(swa_args().values())),
    ]
    if "avx512_bf16" in fused.features():
        cases.append((kernels.linear_bf16.default, tuple(linear_args().values())))
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_a_decode_layer_traces_under_torch_compile_and_export(kernels):
    """The ops' fake kernels let dynamo and export trace a call without running it."""

    class Block(torch.nn.Module):
        def forward(self, x, h, w, gate, up):
            normed, total = kernels.add_rms_norm(x, h, w, 1e-6)
            return total + kernels.silu_mul(gate, up) * normed

    args = (torch.randn(2, 6), torch.randn(2, 6), torch.randn(6), torch.randn(2, 6), torch.randn(2, 6))
    want = Block()(*args)
    compiled = torch.compile(Block(), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), want)
    exported = torch.export.export(Block(), args)
    names = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"infinitevl.add_rms_norm.default", "infinitevl.silu_mul.default"} <= names
    torch.testing.assert_close(exported.module()(*args), want)


def test_the_source_builds_without_warnings(tmp_path, kernels):
    """-Wall -Wextra (fused.FLAGS) say nothing about decode.cpp itself (torch's headers are system headers)."""
    compiler = os.environ.get("CXX", "g++")
    command = fused._compile_command(compiler, fused.SOURCE, tmp_path / "decode.so")
    assert "-w" not in command and "-Wall" in command
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith(str(fused.SOURCE)) and "warning" in line]
    assert not ours, "\n".join(ours)


# -- the cache ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_compiler(monkeypatch):
    """fused._compile writes a stand-in library (no compiler run) and records where it was asked to write."""
    calls = []

    def compile_(compiler, out):
        calls.append(out)
        assert out.exists() and not out.is_symlink() and (out.stat().st_mode & 0o777) == 0o600  # mkstemp's file
        out.write_bytes(b"\x7fELF stand-in library " * 64)

    monkeypatch.setattr(fused, "_compile", compile_)
    return calls


def test_the_cache_folder_is_created_private(tmp_path, fake_compiler):
    folder = tmp_path / "cache" / "kernels"
    target = fused.prepare(folder, "g++")
    assert (folder.stat().st_mode & 0o777) == 0o700
    assert target.parent == folder and fused.trusted(target)
    assert (target.stat().st_mode & 0o077) == 0
    assert len(fake_compiler) == 1 and fake_compiler[0].parent == folder and fake_compiler[0] != target
    fused.prepare(folder, "g++")  # built once
    assert len(fake_compiler) == 1


def test_a_truncated_library_is_rebuilt(tmp_path, fake_compiler):
    target = fused.prepare(tmp_path / "k", "g++")
    whole = target.read_bytes()
    target.write_bytes(whole[:100])
    assert not fused.trusted(target)
    assert fused.prepare(tmp_path / "k", "g++") == target
    assert len(fake_compiler) == 2 and target.read_bytes() == whole and fused.trusted(target)
    assert fake_compiler[0] != fake_compiler[1]  # a fresh temporary name per build


def test_a_library_others_can_write_is_rebuilt_not_trusted(tmp_path, fake_compiler):
    target = fused.prepare(tmp_path / "k", "g++")
    target.chmod(0o666)
    assert not fused.trusted(target)
    fused.prepare(tmp_path / "k", "g++")
    assert len(fake_compiler) == 2 and fused.trusted(target)


@pytest.mark.parametrize("where", ["the folder", "a folder above"])
def test_a_cache_others_can_write_is_refused(tmp_path, fake_compiler, where):
    shared = tmp_path / "shared"
    folder = shared / "infinitevl" / "kernels"
    folder.mkdir(parents=True)
    (folder if where == "the folder" else shared).chmod(0o777)
    with pytest.raises(fused.KernelCacheError, match="other users"):
        fused.prepare(folder, "g++")
    assert not fake_compiler


def test_stale_builds_are_removed(tmp_path, fake_compiler):
    folder = tmp_path / "k"
    folder.mkdir(mode=0o700)
    stale = [folder / "decode-0123456789abcdef.so", folder / "decode-0123456789abcdef.sha256"]
    stale += [folder / "decode-0123456789abcdef.so.lock", folder / "decode-0123456789abcdef.so.x1.tmp"]
    for path in stale:
        path.write_bytes(b"old")
    old = time.time() - 2 * fused.STALE_TEMP_S
    os.utime(stale[-1], (old, old))
    in_progress = folder / "decode-fedcba9876543210.so.x2.tmp"  # another build's, just started: kept
    in_progress.write_bytes(b"new")
    target = fused.prepare(folder, "g++")
    assert not any(path.exists() for path in stale) and in_progress.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [target.name, target.with_suffix(".sha256").name, f"{target.name}.lock", in_progress.name]
    )


def _tiny_library(tmp_path, body: str):
    source = tmp_path / "lib.cpp"
    source.write_text(body)
    out = tmp_path / "lib.so"
    compiler = os.environ.get("CXX", "g++")
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(out)], check=True)
    return out


def _status_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = "import torch; from infinitevl.ops import fused; print(fused.status(torch.bfloat16))"
    env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_a_library_planted_in_a_world_writable_cache_never_runs(tmp_path):
    """XDG_CACHE_HOME on a folder anyone can write: a library placed there under the expected name is not loaded
    (it would write a marker file when loaded), and decoding says why it takes the plain path."""
    marker = tmp_path / "planted-code-ran"
    planted = _tiny_library(
        tmp_path,
        f'#include <cstdio>\n__attribute__((constructor)) static void run() {{ std::fopen("{marker}", "w"); }}\n',
    )
    shared = tmp_path / "shared"
    folder = shared / "infinitevl" / "kernels"
    folder.mkdir(parents=True)
    shared.chmod(0o777)
    target = folder / f"decode-{fused._build_key(os.environ.get('CXX', 'g++'))}.so"
    target.write_bytes(planted.read_bytes())
    target.with_suffix(".sha256").write_text(fused._digest(target))
    env = {"XDG_CACHE_HOME": str(shared), "INFINITEVL_KERNEL_DIR": ""}
    proc = _status_in_subprocess(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    assert "other users" in proc.stdout and "plain ops" in proc.stdout


def test_a_library_without_the_ops_leaves_the_plain_path(tmp_path):
    """A loadable library of the expected name that registers no kernels: status() says so instead of raising."""
    empty = _tiny_library(tmp_path, "int infinitevl_nothing_here() { return 0; }\n")
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o700)
    target = folder / f"decode-{fused._build_key(os.environ.get('CXX', 'g++'))}.so"
    target.write_bytes(empty.read_bytes())
    target.with_suffix(".sha256").write_text(fused._digest(target))
    proc = _status_in_subprocess({"INFINITEVL_KERNEL_DIR": str(folder)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lacks the ops" in proc.stdout and "plain ops" in proc.stdout


# -- tests that exist for the kernels do not go green without them under CI -----------------------------------
def _pytest_without_compiler(tmp_path, ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "CI": ci, "INFINITEVL_KERNEL_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", __file__]
    command += ["-k", "test_valid_arguments_run"]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_missing_compiler_skips_with_a_summary_and_fails_under_ci(tmp_path, ci):
    proc = _pytest_without_compiler(tmp_path, ci)
    if ci:
        assert proc.returncode == 1 and ("1 failed" in proc.stdout or "1 error" in proc.stdout), proc.stdout[-3000:]
        assert "CI=true: a missing tool is a failure" in proc.stdout
    else:
        assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout[-3000:]
        summary = proc.stdout.split("skipped, by reason", 1)[1]
        assert "1  no C++ compiler" in summary
