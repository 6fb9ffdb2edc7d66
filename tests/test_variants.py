"""The paper's v2 variants (docs/variants.md): Online (sinks + sliding window) and Offline (block-sparse attention).

Exactness against explicit masks and a plain statement of the chunk selection rule, chunked prefill against one
full pass at splits around chunks, sinks and windows, parameter-free equivalence with Base when the pattern covers
everything, and the caches in snapshots, branches, journal deltas and `infinitevl state`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from infinitevl.config import FULL, LINEAR, SINK, SPARSE, ConfigError, InfiniteVLConfig, tiny_config
from infinitevl.ops.sparse_attention import (
    SparsePattern,
    block_sparse_attention,
    block_sparse_attention_reference,
    chunk_means,
    select_chunks,
    sink_window_attention,
    sink_window_mask,
)
from infinitevl.state import BlockSparseLayerState, InfiniteVLState, SinkWindowLayerState

SINK_OPTS = dict(sliding_window=12, num_sink_tokens=5)
SPARSE_OPTS = dict(
    sparse_chunk_size=4, sparse_top_k=3, sparse_init_chunks=1, sparse_local_tokens=8, sparse_dense_threshold=16
)
OPTS = {SINK: SINK_OPTS, SPARSE: SPARSE_OPTS}
PATTERN = SparsePattern(4, 3, 1, 8, 16)


def kinds(kind: str, n: int = 8) -> list[str]:
    return [kind if i % 4 == 0 else LINEAR for i in range(n)]


def variant_model(kind: str, **overrides):
    return tiny_model(layer_types=kinds(kind), **{**OPTS[kind], **overrides})


def logits_in_pieces(model, ids, cuts, max_context=256):
    """Logits of `ids` fed to one state in pieces ending at `cuts`, then one token at a time."""
    state = model.new_state(max_context=max_context)
    out, start = [], 0
    with torch.no_grad():
        for end in [*cuts, *range(cuts[-1] + 1, ids.shape[1] + 1)]:
            out.append(model(input_ids=ids[:, start:end], state=state).logits)
            start = end
    return torch.cat(out, dim=1), state


# -- configuration ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [SINK, SPARSE])
def test_config_round_trip(tmp_path, kind):
    cfg = tiny_config(layer_types=kinds(kind), **OPTS[kind])
    raw = cfg.to_dict()
    for name, value in OPTS[kind].items():
        assert raw[name] == value
    again = InfiniteVLConfig.from_file(cfg.save(tmp_path))
    assert again.text == cfg.text and again.to_dict() == raw
    assert again.fingerprint() == cfg.fingerprint()
    changed = {SINK: "num_sink_tokens", SPARSE: "sparse_top_k"}[kind]
    other = tiny_config(layer_types=kinds(kind), **{**OPTS[kind], changed: 9})
    assert other.fingerprint() != cfg.fingerprint()  # a snapshot of one does not load into the other


def test_plain_configs_carry_no_variant_fields():
    raw, fp = tiny_config().to_dict(), tiny_config().fingerprint()
    for name in ("num_sink_tokens", "sparse_chunk_size", "sparse_top_k", "sparse_dense_threshold"):
        assert name not in raw and name not in fp


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(layer_types=kinds(SPARSE), sparse_local_tokens=2, sparse_chunk_size=4), "sparse_local_tokens"),
        (dict(layer_types=kinds(SPARSE), sparse_top_k=0), "sparse_top_k"),
        (dict(layer_types=kinds(SINK), num_sink_tokens=-1), "num_sink_tokens"),
        (dict(layer_types=kinds(SINK), sliding_window=1), "sliding_window"),
    ],
)
def test_bad_variant_options_are_named(overrides, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(**overrides)


# -- Online: sinks + window ------------------------------------------------------------------------------------------
def _random(B, Tq, Tk, H=4, KV=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Tq, H, D, generator=g),
        torch.randn(B, Tk, KV, D, generator=g),
        torch.randn(B, Tk, KV, D, generator=g),
    )


def _dense(q, k, v, mask):
    """Plain softmax attention under an explicit mask [B, (KV,) Tq, Tk]; rows without a visible key give 0."""
    B, Tq, H, D = q.shape
    KV = k.shape[2]
    s = torch.einsum("bqkgd,btkd->bkgqt", q.view(B, Tq, KV, H // KV, D), k) * D**-0.5
    mask = mask if mask.dim() == 4 else mask.unsqueeze(1)
    p = s.masked_fill(~mask.unsqueeze(2), float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bkgqt,btkd->bqkgd", p, v).reshape(B, Tq, H, D), torch.logsumexp(
        s.masked_fill(~mask.unsqueeze(2), float("-inf")), -1
    )


def test_sink_window_matches_the_explicit_mask():
    """M_ij = 1 iff j <= i and (j < sinks or i - j < W), with a left-padded row and blocks that cut the window."""
    B, T, window, sinks = 2, 70, 12, 5
    q, k, v = _random(B, T, T)
    pos = torch.arange(T).expand(B, T).clone()
    pos[1] = torch.where(torch.arange(T) < 9, -1, torch.arange(T) - 9)  # row 1: 9 padding tokens on the left
    mask = sink_window_mask(pos, pos, window, sinks)
    explicit = (pos[0, :, None] >= pos[0, None, :]) & (
        (pos[0, None, :] < sinks) | (pos[0, :, None] - pos[0, None, :] < window)
    )
    assert torch.equal(mask[0], explicit)
    want, want_lse = _dense(q, k, v, mask)
    real = pos >= 0
    for lse in (False, True):
        got = sink_window_attention(q, k, v, pos, pos, window, sinks, block_size=16, return_lse=lse)
        if lse:
            got, got_lse = got
            torch.testing.assert_close(got_lse[real], want_lse.permute(0, 3, 1, 2).reshape(B, T, -1)[real])
        torch.testing.assert_close(got[real], want[real])


def test_online_equals_base_while_the_window_covers_everything():
    """Parameter-free: the same weights as Base; with the window longer than the input nothing is dropped."""
    base = tiny_model(layer_types=kinds(FULL))
    online = variant_model(SINK, sliding_window=64)
    online.load_state_dict(base.state_dict())
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(online(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        short = variant_model(SINK)  # window 12 < 40: the sinks and the window now differ from Base
        short.load_state_dict(base.state_dict())
        assert not torch.allclose(short(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


# -- Offline: block-sparse -------------------------------------------------------------------------------------------
def _plain_selection(q, means, q_pos, p: SparsePattern):
    """The selection rule written out per query and key/value group (the docstring of ops/sparse_attention.py)."""
    B, T, H, D = q.shape
    KV, n = means.shape[1], means.shape[2]
    G = H // KV
    out = torch.zeros(B, KV, T, n, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            i = int(q_pos[b, t])
            if i < 0:
                continue
            cands = [c for c in range(n) if c >= p.init_chunks and c * p.chunk_size <= i - p.local_tokens]
            for g in range(KV):
                if not cands:
                    continue
                if i < p.dense_threshold:
                    out[b, g, t, cands] = True
                    continue
                total = torch.zeros(len(cands))
                for h in range(g * G, (g + 1) * G):
                    scores = torch.stack([q[b, t, h] @ means[b, g, c] * D**-0.5 for c in cands])
                    total += scores.softmax(0)
                best = sorted(range(len(cands)), key=lambda j: -float(total[j]))[: p.top_k]
                out[b, g, t, [cands[j] for j in best]] = True
    return out


def test_selection_matches_the_plain_rule():
    q, k, _ = _random(2, 60, 60, seed=3)
    pos = torch.arange(60).expand(2, 60).clone()
    pos[1] -= 7  # row 1 starts later in its stream: different candidates at the same index
    pos[1, :7] = -1
    means = chunk_means(k, PATTERN.chunk_size)
    assert torch.equal(select_chunks(q, means, pos, PATTERN), _plain_selection(q, means, pos, PATTERN))


@pytest.mark.parametrize("cached", [0, 37])
def test_block_sparse_matches_the_reference(cached):
    """The chunk-batched computation equals dense attention under the explicit mask, with keys before the
    queries (a cache), left padding and small tiles and steps."""
    B, T = 2, 90
    q, k, v = _random(B, T - cached, T, seed=4)
    kpos = torch.arange(T).expand(B, T).clone()
    kpos[1, T - 5 :] = -1  # row 1 is shorter: its last slots are empty
    qpos = kpos[:, cached:].clone()
    qpos[1] = torch.where(qpos[1] >= 0, qpos[1], -1)
    want = block_sparse_attention_reference(q, k, v, qpos, kpos, PATTERN)
    got = block_sparse_attention(q, k, v, qpos, kpos, PATTERN, query_tile=16, pairs_per_step=20)
    torch.testing.assert_close(got, want)
    mask = torch.zeros(1)  # the reference itself against an independent dense attention
    from infinitevl.ops.sparse_attention import block_sparse_mask

    mask = block_sparse_mask(q, chunk_means(k, 4), qpos, kpos, PATTERN)
    torch.testing.assert_close(want, _dense(q, k, v, mask)[0])


def test_block_sparse_is_dense_when_top_k_covers_every_chunk():
    q, k, v = _random(1, 80, 80, seed=5)
    pos = torch.arange(80)[None]
    wide = SparsePattern(4, 1000, 1, 8, 0)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(block_sparse_attention(q, k, v, pos, pos, wide), want)
    narrow = block_sparse_attention(q, k, v, pos, pos, SparsePattern(4, 2, 1, 8, 0))
    assert not torch.allclose(narrow, want, atol=1e-3)


def test_offline_equals_base_when_top_k_covers_every_chunk():
    base = tiny_model(layer_types=kinds(FULL))
    offline = variant_model(SPARSE, sparse_top_k=1000, sparse_dense_threshold=0)
    offline.load_state_dict(base.state_dict())
    ids = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(offline(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    cached, _ = logits_in_pieces(offline, ids, [13, 30])
    torch.testing.assert_close(cached, base(input_ids=ids).logits.detach(), rtol=1e-4, atol=1e-4)


# -- streaming -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [SINK, SPARSE])
def test_chunked_prefill_and_decode_equal_one_pass(kind):
    """Splits inside and at the edges of chunks (4), the sinks (5), the local set (8), the window (12) and the dense
    threshold (16), then token-by-token decoding."""
    model = variant_model(kind)
    ids = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
    for cuts in ([3, 5, 6, 13, 17, 30, 31, 50], [4, 12, 16, 45, 56]):
        pieces, _ = logits_in_pieces(model, ids, cuts)
        # fp32 rounding against the logits' scale (max |logit| about 14 here): a 3-row piece's products and the 60-row
        # pass's round differently, by CPU (1.6e-4 on an AVX2-only EPYC, under 1e-4 on AVX-512 machines)
        torch.testing.assert_close(pieces, full, rtol=1e-4, atol=3e-5 * full.abs().max().item())


@pytest.mark.parametrize("kind", [SINK, SPARSE])
def test_state_snapshot_branch_and_journal_delta(tmp_path, kind):
    from infinitevl.serving.scheduler import rows
    from infinitevl.serving.store import apply_delta, delta

    model = variant_model(kind)
    ids = torch.randint(0, 300, (1, 50), generator=torch.Generator().manual_seed(6))
    whole, state = logits_in_pieces(model, ids, [33])
    _, early = logits_in_pieces(model, ids[:, :33], [33])
    kind_cls = SinkWindowLayerState if kind == SINK else BlockSparseLayerState
    loaded = InfiniteVLState.load(state.save(tmp_path / "s.safetensors"), model.config)
    for state_copy in (loaded, state.clone(), rows(state, 0, 1)):
        assert isinstance(state_copy.layers[0], kind_cls)
        assert state_copy.tensors().keys() == state.tensors().keys()
        assert all(torch.equal(a, b) for a, b in zip(state_copy.tensors().values(), state.tensors().values()))
    replayed = early.clone()
    apply_delta(replayed, delta(early, state))  # a durable session's journal record
    assert all(torch.equal(a, b) for a, b in zip(replayed.tensors().values(), state.tensors().values()))
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        a = model(input_ids=nxt, state=loaded).logits
        b = model(input_ids=nxt, state=state).logits
    torch.testing.assert_close(a, b)
    assert whole.shape[1] == 50


def test_state_report_shows_the_kinds_and_growing_offline_memory(tmp_path):
    from infinitevl.cli.state import describe

    sizes = []
    for kind in (SINK, SPARSE):
        model = variant_model(kind)
        for n in (20, 60):
            _, state = logits_in_pieces(model, torch.randint(0, 300, (1, n)), [n])
            info = describe(state.save(tmp_path / f"{kind}-{n}.safetensors"))
            layer = info["layers"][0]
            assert layer["kind"] == ("sink_attention" if kind == SINK else "block_sparse_attention")
            sizes.append((info["bytes"], layer.get("bytes_used")))
    (sink20, _), (sink60, _), (sparse20, used20), (sparse60, used60) = sizes
    _, plain = logits_in_pieces(tiny_model(), torch.randint(0, 300, (1, 30)), [30])  # v1's layers still described
    info = describe(plain.save(tmp_path / "plain.safetensors"))
    assert {layer["kind"] for layer in info["layers"]} == {"attention", "gated_deltanet"}
    assert "variants" not in info["extra"]
    assert sink20 == sink60  # Online: fixed
    assert sparse20 == sparse60 and used20 < used60  # Offline: allocated up front, used grows with the stream


def test_online_session_runs_100k_tokens_in_constant_state():
    """100K tokens in large prefill chunks: the state's byte count never changes, the sinks stay, the ring holds
    exactly the latest W - 1 later positions."""
    from infinitevl.engine.prefill import prefill

    model = tiny_model(num_hidden_layers=2, layer_types=[SINK, LINEAR], **SINK_OPTS)
    state = model.new_state()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prefill(model, state, torch.randint(0, 300, (1, 10), generator=g))
        start_bytes = state.nbytes
        total = 10
        while total < 100_000:
            n = min(16_384, 100_000 - total)
            logits = prefill(model, state, torch.randint(0, 300, (1, n), generator=g), chunk_size=16_384)
            total += n
            assert state.nbytes == start_bytes
    assert state.tokens_seen == 100_000 and torch.isfinite(logits).all()
    layer = state.layers[0]
    ns, W = SINK_OPTS["num_sink_tokens"], SINK_OPTS["sliding_window"]
    assert layer.positions[0, :ns].tolist() == list(range(ns))
    assert sorted(layer.positions[0, ns:].tolist()) == list(range(100_000 - (W - 1), 100_000))


# -- gradients (long-sequence fine-tuning trains under these patterns) ----------------------------------------------
def test_block_sparse_gradients_equal_the_reference_past_the_dense_threshold():
    """Training an Offline model backpropagates through the chunked top-k path: its gradients equal those of dense
    attention under the explicit mask (the selection itself is a discrete choice, the same in both)."""
    gen = torch.Generator().manual_seed(5)
    T = 61  # past the dense threshold (16), with chunks selected beyond the local span
    q, k, v = (torch.randn(1, T, n, 8, generator=gen, dtype=torch.float64) for n in (4, 2, 2))
    pos = torch.arange(T).unsqueeze(0)
    grads = []
    for op in (block_sparse_attention, block_sparse_attention_reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        weight = torch.randn(1, T, 4, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        (op(*leaves, pos, pos, PATTERN) * weight).sum().backward()
        grads.append([t.grad for t in leaves])
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)  # the chunked path computes in fp32


@pytest.mark.parametrize("sharpness", [1.0, 30.0])
def test_block_sparse_is_exact_and_finite_under_sharp_attention(sharpness):
    """Sharp attention (a query's best key outscoring its own by far more than fp32's e^-87) is what trained models
    do: the local part's log-sum-exp must stay exact there, forward and backward (no NaN from log(0))."""
    gen = torch.Generator().manual_seed(8)
    T = 200
    q = torch.randn(2, T, 4, 16, generator=gen) * sharpness
    k, v = (torch.randn(2, T, 2, 16, generator=gen) for _ in range(2))
    pos = torch.arange(T).expand(2, T)
    pattern = SparsePattern(4, 8, 1, 32, 64)
    grads, outs = [], []
    for op in (block_sparse_attention, block_sparse_attention_reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = op(*leaves, pos, pos, pattern)
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    for mine, ref in zip(*grads):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-3 * max(1.0, float(ref.abs().max())))


def test_block_sparse_padding_queries_are_zero_and_padding_keys_unseen():
    """Left padding: padding queries (position -1) get zeros, and padding keys lying inside a selectable chunk are
    never attended to (key index = stream position, the rest padding)."""
    gen = torch.Generator().manual_seed(9)
    T = 150
    q = torch.randn(2, T, 4, 8, generator=gen)
    k, v = (torch.randn(2, T, 2, 8, generator=gen) for _ in range(2))
    q_pos = torch.arange(T).repeat(2, 1)
    q_pos[1, :7] = -1  # row 1: padding queries first, and its keys at indices 0..6 are padding
    out = block_sparse_attention(q, k, v, q_pos, q_pos, PATTERN)
    assert out[1, :7].abs().max() == 0
    torch.testing.assert_close(out, block_sparse_attention_reference(q, k, v, q_pos, q_pos, PATTERN))
    garbage = v.clone()
    garbage[1, :7] = 1e3  # the padding keys' values changed: nothing any query sees may move
    torch.testing.assert_close(block_sparse_attention(q, k, garbage, q_pos, q_pos, PATTERN), out)


# -- conversion and long-sequence training ----------------------------------------------------------------------------
def test_convert_base_to_variants_and_train_one_under_its_mask(tmp_path):
    """`infinitevl convert --variant` changes only config.json; `sft-long` then trains the variant (its own mask:
    packed samples one at a time, sinks and window inside each)."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import MEDIA
    from safetensors.torch import load_file

    from infinitevl.model import InfiniteVLForConditionalGeneration as Model
    from infinitevl.training.config import load_config
    from infinitevl.training.convert import convert
    from infinitevl.training.loop import Trainer
    from infinitevl.training.teacher import new_qwen_teacher

    teacher = new_qwen_teacher(tmp_path / "teacher", seed=0)
    base = convert(teacher, tmp_path / "base", layer_types=[FULL, LINEAR, LINEAR, LINEAR], window=None)
    exe = Path(sys.executable).with_name("infinitevl")
    args = ["convert", "--variant", "online", "--base", base, "--out", tmp_path / "online"]
    args += ["--option", "num_sink_tokens=4", "--option", "sliding_window=16"]
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    online = Model.from_pretrained(tmp_path / "online")
    assert online.config.text.layer_types[0] == SINK and online.config.text.num_sink_tokens == 4
    weights = {p.name for p in base.glob("*.safetensors")}
    for name in weights:  # parameter-free: the same tensors, byte for byte
        a, b = load_file(base / name), load_file(tmp_path / "online" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from infinitevl.training.variants import make_variant

    offline = make_variant(base, tmp_path / "offline", "offline", sparse_chunk_size=4, sparse_local_tokens=8)
    assert Model.from_pretrained(offline).config.text.layer_types[0] == SPARSE
    with pytest.raises(ConfigError, match="unknown option"):
        make_variant(base, tmp_path / "bad", "online", num_sinks=3)

    lines = (MEDIA / "wiki_demo.txt").read_text().splitlines()
    (tmp_path / "train.txt").write_text("\n".join(lines[:12]))
    raw = ["data.max_length=96", "batch_size=2", "optim.warmup_ratio=0.0", "log_every=100", "data.pack=true"]
    raw.append(f"data.train={tmp_path / 'train.txt'}")
    cfg = load_config(
        None, raw, stage="sft-long", student=str(tmp_path / "online"), out=str(tmp_path / "run"), max_steps=3
    )
    trainer = Trainer(cfg)
    assert trainer.student.config.text.layer_types[0] == SINK
    final = trainer.fit()
    assert trainer.step == 3 and all(torch.isfinite(torch.tensor(v)) for v in final.values() if isinstance(v, float))
    assert (tmp_path / "run" / "adapters").exists()
