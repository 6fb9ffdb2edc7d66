"""Random-weight GGUF files for the llama.cpp peer (bench/llamacpp.py): a Transformer and a Qwen3.5-style hybrid.

Written with the `gguf` package (optional: `make peer`); the weights are random, and every tensor of one shape is
the same random matrix, quantized once per shape: the work per token is the same as with trained weights, and a 4B
file is written in seconds of quantization instead of minutes.

`qwen2`: Qwen2.5-VL-3B's text model (Qwen2 with multimodal RoPE, which changes positions, not work): hidden 2048,
36 layers, 16 query / 2 key-value heads of 128, MLP 11008, vocabulary 151936, tied embeddings.

`qwen35`: llama.cpp's Qwen3.5 architecture (Gated DeltaNet layers and full-attention layers) at InfiniteVL-4B's
widths (`configs.infinitevl_config("4b")`): hidden 2048, 36 layers, MLP 11008, vocabulary 151936, tied embeddings;
the attention layers where ours are (i % 4 == 0: 9 of 36, through `attention.recurrent_layers`; Qwen3.5 itself puts
them at i % 4 == 3), 16 query / 2 key-value heads of 128, RoPE on all 128 dimensions in sections 16/24/24; GDN with
q/k 16 heads of 128, short convolution of 4. What llama.cpp's qwen35 graph fixes differently from ours:

  - its attention is full attention over the whole context (ours: a sliding window of 8192): the point of the
    comparison at 64K and 256K;
  - its attention is gated: the query projection also produces a per-channel output gate (2048 -> 4096 instead of
    2048 -> 2048), with RMSNorm on queries and keys and no q/k/v biases (ours: Qwen2.5's biases, no gate, no norms);
  - its GDN heads have key dimension = value dimension, so our 16 value heads of 256 become 32 of 128 (Qwen3.5's
    layout): the q / k / v / output-gate / output projections (2048 / 2048 / 4096 / 4096 / 4096 -> 2048) and the
    memory (16 x 128 x 256 = 32 x 128 x 128 floats per layer) are the same sizes; the decay and beta projections
    have 32 outputs instead of 16;
  - a post-attention RMSNorm before the MLP, as ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

QWEN2 = dict(vocab=151936, hidden=2048, layers=36, heads=16, kv_heads=2, head_dim=128, ffn=11008, theta=1e6)
QWEN35 = dict(
    vocab=151936,
    hidden=2048,
    layers=36,
    ffn=11008,
    heads=16,
    kv_heads=2,
    head_dim=128,
    theta=1e6,
    rope_sections=[16, 24, 24],
    attention_every=4,  # layer i is attention when i % attention_every == 0, as in InfiniteVL
    gdn_k_heads=16,
    gdn_v_heads=32,
    gdn_head_dim=128,
    conv=4,
)
# the quick plan's widths: every row a multiple of 32 (a Q8_0 / Q4_0 block)
TINY = {
    "qwen2": dict(QWEN2, vocab=512, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, ffn=256),
    "qwen35": dict(
        QWEN35,
        vocab=512,
        hidden=128,
        layers=4,
        ffn=256,
        heads=4,
        kv_heads=2,
        head_dim=32,
        rope_sections=[4, 6, 6],
        gdn_k_heads=2,
        gdn_v_heads=4,
        gdn_head_dim=32,
    ),
}
MODELS = {
    "qwen2": "Qwen2.5-VL-3B text widths (qwen2 architecture), random weights",
    "qwen35": "InfiniteVL-4B widths as a Qwen3.5-style hybrid (qwen35 architecture: 27 GDN + 9 full gated "
    "attention), random weights",
}


class _Writer:
    """A GGUFWriter whose matrices are one random matrix per shape, quantized once to `kind`."""

    def __init__(self, path: Path, arch: str, kind: str, w: dict[str, Any]):
        import gguf
        import numpy as np

        self.np, self.gguf = np, gguf
        self.qtype = getattr(gguf.GGMLQuantizationType, kind)
        self.rng = np.random.default_rng(0)
        self.cache: dict[tuple, Any] = {}
        self.out = gguf.GGUFWriter(str(path), arch)
        o = self.out
        o.add_context_length(1 << 20)
        o.add_embedding_length(w["hidden"])
        o.add_block_count(w["layers"])
        o.add_feed_forward_length(w["ffn"])
        o.add_head_count(w["heads"])
        o.add_head_count_kv(w["kv_heads"])
        o.add_rope_freq_base(w["theta"])
        o.add_layer_norm_rms_eps(1e-6)
        o.add_tokenizer_model("none")
        o.add_vocab_size(w["vocab"])

    def matrix(self, name: str, rows: int, cols: int) -> None:
        if (rows, cols) not in self.cache:
            values = self.rng.standard_normal((rows, cols), dtype=self.np.float32) * 0.02
            self.cache[(rows, cols)] = self.gguf.quants.quantize(values, self.qtype)
        self.out.add_tensor(name, self.cache[(rows, cols)], raw_dtype=self.qtype)  # shape: from the quantized bytes

    def vector(self, name: str, n: int, value: float = 1.0) -> None:
        self.out.add_tensor(name, self.np.full(n, value, dtype=self.np.float32))

    def mlp(self, p: str, w: dict[str, Any]) -> None:
        self.matrix(p + "ffn_gate.weight", w["ffn"], w["hidden"])
        self.matrix(p + "ffn_up.weight", w["ffn"], w["hidden"])
        self.matrix(p + "ffn_down.weight", w["hidden"], w["ffn"])

    def close(self, path: Path) -> Path:
        self.out.write_header_to_file()
        self.out.write_kv_data_to_file()
        self.out.write_tensors_to_file()
        self.out.close()
        return path


def write_qwen2(path: Path, kind: str, w: dict[str, Any] = QWEN2) -> Path:
    """A qwen2-architecture GGUF of widths `w` in `kind` (Q8_0 / Q4_0; norms and biases in F32)."""
    g = _Writer(path, "qwen2", kind, w)
    d, q, kv = w["hidden"], w["heads"] * w["head_dim"], w["kv_heads"] * w["head_dim"]
    g.out.add_key_length(w["head_dim"])
    g.out.add_value_length(w["head_dim"])
    g.matrix("token_embd.weight", w["vocab"], d)
    g.vector("output_norm.weight", d)
    for i in range(w["layers"]):
        p = f"blk.{i}."
        g.vector(p + "attn_norm.weight", d)
        g.vector(p + "ffn_norm.weight", d)
        g.matrix(p + "attn_q.weight", q, d)
        g.matrix(p + "attn_k.weight", kv, d)
        g.matrix(p + "attn_v.weight", kv, d)
        g.matrix(p + "attn_output.weight", d, q)
        g.vector(p + "attn_q.bias", q, 0.0)
        g.vector(p + "attn_k.bias", kv, 0.0)
        g.vector(p + "attn_v.bias", kv, 0.0)
        g.mlp(p, w)
    return g.close(path)


def recurrent_layers(w: dict[str, Any]) -> list[bool]:
    """Which layers are Gated DeltaNet (True) or attention (False): attention where i % attention_every == 0."""
    return [i % w["attention_every"] != 0 for i in range(w["layers"])]


def write_qwen35(path: Path, kind: str, w: dict[str, Any] = QWEN35) -> Path:
    """A qwen35-architecture GGUF of widths `w` in `kind` (norms, convolution, decay parameters in F32)."""
    g = _Writer(path, "qwen35", kind, w)
    o, arch = g.out, "qwen35"
    d, hd = w["hidden"], w["head_dim"]
    q, kv = w["heads"] * hd, w["kv_heads"] * hd
    dk = w["gdn_head_dim"]
    key_dim, value_dim = w["gdn_k_heads"] * dk, w["gdn_v_heads"] * dk
    o.add_key_length(hd)
    o.add_value_length(hd)
    o.add_rope_dimension_count(hd)
    o.add_rope_dimension_sections([*w["rope_sections"], 0])
    o.add_ssm_conv_kernel(w["conv"])
    o.add_ssm_inner_size(value_dim)
    o.add_ssm_state_size(dk)
    o.add_ssm_time_step_rank(w["gdn_v_heads"])
    o.add_ssm_group_count(w["gdn_k_heads"])
    o.add_array(f"{arch}.attention.recurrent_layers", recurrent_layers(w))
    g.matrix("token_embd.weight", w["vocab"], d)
    g.vector("output_norm.weight", d)
    for i, recurrent in enumerate(recurrent_layers(w)):
        p = f"blk.{i}."
        g.vector(p + "attn_norm.weight", d)
        g.vector(p + "post_attention_norm.weight", d)
        if recurrent:
            g.matrix(p + "attn_qkv.weight", 2 * key_dim + value_dim, d)
            g.matrix(p + "attn_gate.weight", value_dim, d)
            g.matrix(p + "ssm_beta.weight", w["gdn_v_heads"], d)
            g.matrix(p + "ssm_alpha.weight", w["gdn_v_heads"], d)
            conv = g.rng.standard_normal((2 * key_dim + value_dim, w["conv"]), dtype=g.np.float32) * 0.1
            o.add_tensor(p + "ssm_conv1d.weight", conv)
            g.vector(p + "ssm_dt.bias", w["gdn_v_heads"], 0.0)
            g.vector(p + "ssm_a", w["gdn_v_heads"], -1.0)  # -exp(A_log): a decay of softplus(alpha + dt) per token
            g.vector(p + "ssm_norm.weight", dk)
            g.matrix(p + "ssm_out.weight", d, value_dim)
        else:
            g.matrix(p + "attn_q.weight", 2 * q, d)  # query and output gate, interleaved per head
            g.matrix(p + "attn_k.weight", kv, d)
            g.matrix(p + "attn_v.weight", kv, d)
            g.matrix(p + "attn_output.weight", d, q)
            g.vector(p + "attn_q_norm.weight", hd)
            g.vector(p + "attn_k_norm.weight", hd)
        g.mlp(p, w)
    return g.close(path)


WRITERS = {"qwen2": write_qwen2, "qwen35": write_qwen35}
