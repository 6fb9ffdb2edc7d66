"""The fused C++ decode kernels (ops/fused.py, ops/csrc/decode.cpp) against the plain PyTorch path they replace.

In fp32 (decode path "1") the two must agree to rounding: same arithmetic, other summation order. In bf16
both round differently from fp32, so the fused path is held to the plain bf16 path's own distance from fp32."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, require_compiler, tiny_model

from infinitevl.engine.generation import decode_step, prefill
from infinitevl.ops import fused
from infinitevl.ops.attention import attention_decode
from infinitevl.state import AttentionLayerState

# Configurations that take every branch: the fixture's widths (head_dim 16: the generic attention loop), 128-wide
# attention heads (the AVX512-BF16 loop where the CPU has it), grouped GDN key/value heads, full attention.
CONFIGS = {
    "tiny": {},
    "wide-heads": dict(
        hidden_size=1024, head_dim=128, mrope_section=[16, 24, 24], num_attention_heads=8, num_key_value_heads=1
    ),
    "gdn-gqa": dict(num_linear_heads=4, num_linear_key_value_heads=2, linear_head_dim=32),
    # a teacher-style full-attention layer keeps the plain attention step (and its bounded cache's checks)
    "full-attention": dict(layer_types=["full_attention", "linear_attention"] * 4),
}


@pytest.fixture
def kernels():
    """The tests below compare the kernels with the plain path: without them they would compare the plain path with
    itself. No compiler at all is a skip, and a failure under CI=true (`make test` installs g++ as root); a failed
    build is always a failure."""
    require_compiler()
    assert fused.library() is not None, fused.status(torch.bfloat16)


@pytest.mark.usefixtures("kernels")
def test_the_kernels_build_and_serve_bf16_models():
    assert fused.status(torch.bfloat16).startswith("fused C++ decode kernels")
    assert "plain PyTorch" in fused.status(torch.float32)


def run(model, mode: str, steps: int = 12):
    """Two left-padded streams (11 and 37 tokens: the 24-token window wraps in one of them), then `steps` decode
    steps fed fixed tokens on the decode path `mode`. Returns (logits [steps, 2, V] fp32, the state)."""
    assert model.language_model.set_decode_path(mode) == (mode == "1" or model.dtype == torch.bfloat16 and mode != "0")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (2, 37), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :26] = 0
    feed = torch.randint(0, 300, (steps, 2), generator=gen)
    state = model.new_state(2, max_context=64)
    with torch.no_grad():
        prefill(model, state, ids, mask, chunk_size=16)
        logits = [decode_step(model, state, t).float() for t in feed]
    return torch.stack(logits), state


def state_gap(a, b) -> float:
    ta, tb = a.tensors(), b.tensors()
    return max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_kernels_equal_the_plain_path(name):
    model = tiny_model(**CONFIGS[name])
    plain, s_plain = run(model, "0")
    got, s_got = run(model, "1")
    # measured (2026-12-01): logits differ by <= 4.3e-6 of their largest value (summation order); states <= 1.7e-5
    assert (got - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert state_gap(s_plain, s_got) < 1e-4
    assert torch.equal(s_plain.layers[0].positions, s_got.layers[0].positions)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_kernels_are_as_close_to_fp32_as_the_plain_bf16_path(name):
    model = tiny_model(**CONFIGS[name])
    reference, _ = run(model, "0")
    model.to(torch.bfloat16)
    plain, _ = run(model, "0")
    got, state = run(model, "auto")
    assert all(layer.memory.dtype == torch.float32 for layer in state.layers if hasattr(layer, "memory"))
    err_plain = (plain - reference).abs().mean().item()
    err_got = (got - reference).abs().mean().item()
    # measured (2026-12-01): mean |logit error| against fp32 0.19-0.86 (spread random weights), fused / plain 0.97-1.07
    assert err_got <= 1.5 * err_plain, f"fused {err_got:.4f} vs plain {err_plain:.4f}"
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= (
        plain.argmax(-1) == reference.argmax(-1)
    ).float().mean() - 0.1


@pytest.mark.usefixtures("kernels")
def test_bundled_model_decodes_as_well_fused_as_plain():
    """The trained bundled model in bf16, int8 and int4 (as users run it): 64 decode steps after a 300-token prompt,
    KL to fp32 per step and top-1 agreement, fused against plain."""
    from infinitevl.defaults import default_model_folder
    from infinitevl.model import InfiniteVLForConditionalGeneration as Model

    folder = default_model_folder()
    reference = Model.from_pretrained(folder)
    text_vocab = min(reference.config.vision_start_token_id, reference.config.image_token_id)
    gen = torch.Generator().manual_seed(0)
    prompt, feed = (
        torch.randint(0, text_vocab, (1, 300), generator=gen),
        torch.randint(0, text_vocab, (64,), generator=gen),
    )

    def steps(model, mode):
        model.language_model.set_decode_path(mode)
        state = model.new_state()
        with torch.no_grad():
            prefill(model, state, prompt)
            return torch.stack([decode_step(model, state, t.view(1))[0].float().log_softmax(-1) for t in feed])

    ref = steps(reference, "0")
    # measured (2026-12-01), KL per step plain / fused: bf16 1.9e-4 / 1.5e-4, int8 6.2e-4 / 6.5e-4, int4 9.0e-2 /
    # 8.8e-2 (random text is far from what this task model knows); top-1 64/64, 63 / 62, 52 / 53 of 64
    for kw in (dict(), dict(quantize="int8"), dict(quantize="int4")):
        model = Model.from_pretrained(folder, dtype=torch.bfloat16, **kw)
        plain, got = steps(model, "0"), steps(model, "auto")
        kl_plain, kl_got = ((ref.exp() * (ref - lp)).sum(-1).mean().item() for lp in (plain, got))
        top_plain, top_got = ((lp.argmax(-1) == ref.argmax(-1)).sum().item() for lp in (plain, got))
        assert kl_got <= 1.5 * kl_plain and top_got >= top_plain - 3, (kw, kl_plain, kl_got, top_plain, top_got)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_attention_kernel_against_the_plain_ops(dtype, head_dim):
    """One step for two rows, one with empty slots and one whose ring has wrapped around: output, ring and slot
    positions against attention_decode + AttentionLayerState.write (RoPE applied by the plain rope ops)."""
    from infinitevl.model.rope import apply_rope, rope_cos_sin

    gen = torch.Generator().manual_seed(0)
    B, KV, G, cap = 2, 2, 4, 19
    H, D = KV * G, head_dim
    seen = torch.tensor([7, 3 * cap + 5])  # tokens each stream has seen
    ring = AttentionLayerState(
        keys=torch.zeros(B, KV, cap, D, dtype=dtype),
        values=torch.zeros(B, KV, cap, D, dtype=dtype),
        positions=torch.full((B, cap), -1),
        window=cap + 1,
    )
    for b in range(B):  # fill the ring as a stream of seen[b] tokens would
        for p in range(max(0, int(seen[b]) - cap), int(seen[b])):
            ring.keys[b, :, p % cap] = torch.randn(KV, D, generator=gen).to(dtype)
            ring.values[b, :, p % cap] = torch.randn(KV, D, generator=gen).to(dtype)
            ring.positions[b, p % cap] = p
    q, k, v = (torch.randn(B, n * D, generator=gen).to(dtype) for n in (H, KV, KV))
    positions = seen.view(1, B, 1).expand(3, B, 1)
    cos, sin = rope_cos_sin(positions, D, 10000.0, _sections(D), dtype)
    qr = apply_rope(q.view(B, 1, H, D), cos, sin)
    kr = apply_rope(k.view(B, 1, KV, D), cos, sin)
    fused_ring = AttentionLayerState(ring.keys.clone(), ring.values.clone(), ring.positions.clone(), ring.window)
    ring_k, ring_v, ring_pos = ring.filled(seen)
    want = attention_decode(qr, ring_k, ring_v, ring_pos >= 0, kr, v.view(B, 1, KV, D)).reshape(B, H * D)
    ring.write(kr, v.view(B, 1, KV, D), seen.view(B, 1))
    got = fused.kernels().swa_decode(
        q, k, v, cos.view(B, D), sin.view(B, D), fused_ring.keys, fused_ring.values, fused_ring.positions, seen, D**-0.5
    )
    # measured (2026-12-01), max error / max |output|: fp32 1.8e-7 (D 16), 3.9e-7 (D 128); bf16 4.0e-3, 4.4e-3 (about
    # one bf16 step: the two paths round scores and probabilities to bf16 at different points)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    assert torch.equal(fused_ring.positions, ring.positions)
    assert torch.equal(fused_ring.values, ring.values)
    # rotated keys: bf16 rounds each product as the plain ops do (equal); fp32 differs in the last bit
    torch.testing.assert_close(
        fused_ring.keys,
        ring.keys,
        rtol=1e-6 if dtype == torch.float32 else 0,
        atol=1e-6 if dtype == torch.float32 else 0,
    )


def _sections(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("rows, n, k", [(1, 4096, 2048), (3, 37, 100), (16, 6, 33)])
def test_bf16_linear_kernel(rows, n, k):
    """bf16 products of few rows (a decode step's) against fp32 arithmetic, beside torch's bf16 F.linear; the model
    reaches it through ops/linear.py, so the decode comparisons above run it too."""
    import torch.nn.functional as F

    from infinitevl.ops.linear import MAX_ROWS, linear

    if "avx512_bf16" not in fused_cpu_flags() or fused.arch() != "native":
        pytest.skip(
            f"this CPU lacks AVX512-BF16 (or the kernels target -march={fused.arch()}): bf16 layers use F.linear"
        )
    assert "avx512_bf16" in fused.features(), "the CPU has AVX512-BF16 but the kernels were built without it"
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen).to(torch.bfloat16) for shape in ((rows, k), (n, k), (n,)))
    want = F.linear(x.float(), w.float(), b.float())
    plain = F.linear(x, w, b).float()
    assert fused.linear_applies(x, w, MAX_ROWS)
    got = linear(x, w, b, kernel=True).float()
    # measured (2026-12-01): the same max error as F.linear's (both are the final rounding to bf16)
    assert (got - want).abs().max() <= 1.5 * (plain - want).abs().max() + 1e-6
    assert not fused.linear_applies(torch.randn(MAX_ROWS + 1, k).to(torch.bfloat16), w, MAX_ROWS)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel(dtype):
    from infinitevl.ops.norm import rms_norm

    gen = torch.Generator().manual_seed(0)
    x, h = (torch.randn(3, 256, generator=gen).to(dtype) for _ in range(2))
    w = torch.randn(256, generator=gen).to(dtype)
    normed, same = fused.rms_norm(x, w, 1e-6)
    assert same is x and normed.data_ptr() != x.data_ptr()
    want = rms_norm(x, w, 1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (normed.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    normed, total = fused.rms_norm(x, w, 1e-6, residual=h)
    assert torch.equal(total, x + h)
    assert (normed.float() - rms_norm(x + h, w, 1e-6).float()).abs().max() <= tol * want.float().abs().max()


def test_without_a_compiler_decoding_takes_the_plain_path(tmp_path):
    """No C++ compiler: the model still decodes (plain ops) and --verbose says why."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "INFINITEVL_KERNEL_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "infinitevl.cli.main", "generate", "--dtype", "bfloat16", "--verbose"]
        + ["--max-new-tokens", "4", "hello"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no C++ compiler" in proc.stderr and "plain PyTorch ops" in proc.stderr
    assert not list(tmp_path.glob("*.so"))


@pytest.mark.usefixtures("kernels")
def test_the_portable_loops_without_avx512(tmp_path):
    """Laptop CPUs mostly lack AVX-512: the kernels built for AVX2 only (x86-64-v3) pass the same comparisons."""
    if "avx2" not in fused_cpu_flags():
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "INFINITEVL_KERNEL_ARCH": "x86-64-v3", "INFINITEVL_KERNEL_DIR": str(tmp_path)}
    tests = "test_fp32_kernels or test_bf16_kernels or test_attention_kernel or test_rms_norm or build_and_serve"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert len(list(tmp_path.glob("*.so"))) == 1  # built here, for that architecture
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def fused_cpu_flags() -> frozenset[str]:
    from infinitevl.ops.precision import cpu_flags

    return cpu_flags()


@pytest.mark.usefixtures("kernels")
def test_the_decode_path_is_decided_once_per_dtype(monkeypatch):
    """INFINITEVL_FUSED_DECODE is read when the model decides (its first decode step, then after a dtype change),
    not per step or per layer; the decision covers the layers' bf16 linear products too."""
    from infinitevl.ops.linear import Linear

    reads = []
    real_mode = fused.mode
    monkeypatch.setattr(fused, "mode", lambda: reads.append(1) or real_mode())
    model = tiny_model()
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))

    def decode(n: int):
        state = model.new_state()
        with torch.no_grad():
            prefill(model, state, ids)
            for t in ids[0, :n]:
                decode_step(model, state, t.view(1))

    decode(5)
    text = model.language_model
    assert len(reads) == 1 and not text.decode_kernels  # fp32 under auto: the plain path
    model.to(torch.bfloat16)
    decode(5)
    assert len(reads) == 2 and text.decode_kernels
    gemv = "avx512_bf16" in fused.features()
    assert all(m.kernel == gemv for m in text.modules() if isinstance(m, Linear))
    monkeypatch.setenv("INFINITEVL_FUSED_DECODE", "0")  # read only at the next decision
    decode(3)
    assert len(reads) == 2 and text.decode_kernels
    assert text.set_decode_path("0") is False and not any(m.kernel for m in text.modules() if isinstance(m, Linear))
