"""Build an InfiniteVL student from a Qwen2.5-VL teacher checkpoint (transformers format).

Everything the two architectures share is copied: vision tower, merger, embeddings, norms, MLPs, LM head, and the
softmax attention of the layers that stay softmax (sliding-window). The other layers become Gated DeltaNet layers,
initialised in one of two ways:

  teacher (default)  q_proj <- teacher q; k_proj <- teacher k with each key/value head repeated for the query heads
                     it serves (grouped-query attention, repeat_interleave order); v_proj <- teacher v repeated the
                     same way and duplicated `expand_v` times inside each head; o_proj <- teacher o with each head's
                     columns split evenly over the duplicates, so that o_proj(v) reproduces the teacher's map.
                     Convs start as identity (tap K-1 = 1), beta = 0.5 (b_proj = 0), slow decay exp(g) ~ 0.999
                     (a_proj = 0, A_log = 0, dt_bias = softplus^-1(1e-3)), o_norm = 1, g_proj ~ N(0, 0.02^2). The
                     teacher's q/k/v biases have no place in a GDN layer and are dropped.
  mimic              the official recipe: the same convs and gates, q/k/v/o/g randomly initialised.

The output is an official-format checkpoint (`save_pretrained`) that `from_pretrained` loads strictly; tokenizer and
processor files of the teacher folder are copied along.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..checkpoint import read_weights
from ..config import FULL, LINEAR, SLIDING, InfiniteVLConfig
from ..model import InfiniteVLForConditionalGeneration
from ..model.gdn import GatedDeltaNet

PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "video_preprocessor_config.json",
)


def hybrid_layer_types(num_layers: int, every: int = 4, softmax: str = SLIDING) -> list[str]:
    """The official pattern: layer i keeps softmax attention when i % every == 0."""
    return [softmax if i % every == 0 else LINEAR for i in range(num_layers)]


def student_config(
    teacher_config: dict,
    layer_types: list[str] | None = None,
    window: int | None = 8192,
    expand_v: float = 2,
    rope_index_mode: str = "official",
) -> InfiniteVLConfig:
    """An InfiniteVL config with the teacher's widths; GDN heads mirror the teacher's attention heads."""
    raw = json.loads(json.dumps(teacher_config))
    text = {
        **{k: v for k, v in raw.items() if k not in ("text_config", "vision_config")},
        **(raw.get("text_config") or {}),
    }
    layers = text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    layer_types = layer_types or hybrid_layer_types(layers)
    if len(layer_types) != layers:
        raise ValueError(f"{len(layer_types)} layer types for a {layers}-layer teacher")
    text.update(
        layer_types=list(layer_types),
        use_sliding_window=window is not None,
        sliding_window=window,
        num_linear_heads=heads,
        num_linear_key_value_heads=heads,
        linear_head_dim=head_dim,
        expand_v=expand_v,
        head_dim=head_dim,
    )
    raw["text_config"] = text
    raw["rope_index_mode"] = rope_index_mode
    for key in ("architectures", "model_type", "auto_map", "transformers_version"):
        raw.pop(key, None)
    return InfiniteVLConfig.from_dict(raw)


@torch.no_grad()
def init_gdn_from_attention(gdn: GatedDeltaNet, q_w, k_w, v_w, o_w, kv_heads: int, seed: int = 0) -> None:
    """Teacher attention weights -> GDN projections (see the module docstring)."""
    H, KVh, Dk, Dv = gdn.num_heads, gdn.num_kv_heads, gdn.head_k_dim, gdn.head_v_dim
    d = q_w.shape[1]
    if q_w.shape[0] != H * Dk:
        raise ValueError(f"teacher q_proj {tuple(q_w.shape)} does not fit {H} GDN heads of {Dk}")
    expand = Dv // Dk
    if Dv % Dk:
        raise ValueError(f"teacher initialisation needs the value head dim ({Dv}) to be a multiple of {Dk}")
    rep = KVh // kv_heads  # teacher key/value heads -> GDN key/value heads

    def heads(w, n, dim):
        return w.view(n, dim, d)

    k = heads(k_w, kv_heads, Dk).repeat_interleave(rep, dim=0)  # [KVh, Dk, d]
    v = heads(v_w, kv_heads, Dk).repeat_interleave(rep, dim=0)  # [KVh, Dk, d]
    v = v.repeat(1, expand, 1)  # each value head [v; v; ...] -> [KVh, Dv, d]
    gdn.q_proj.weight.copy_(q_w)
    gdn.k_proj.weight.copy_(k.reshape(KVh * Dk, d))
    gdn.v_proj.weight.copy_(v.reshape(KVh * Dv, d))
    o = o_w.view(d, H, Dk).repeat(1, 1, expand) / expand  # columns of each head split over its duplicates
    gdn.o_proj.weight.copy_(o.reshape(d, H * Dv))
    gen = torch.Generator().manual_seed(seed)
    gdn.g_proj.weight.copy_(torch.randn(gdn.g_proj.weight.shape, generator=gen) * 0.02)
    init_gdn_gates_mimic(gdn)


@torch.no_grad()
def init_gdn_gates_mimic(gdn: GatedDeltaNet) -> None:
    """Identity convs, beta = 0.5, decay ~0.999, unit output norm."""
    for conv in (gdn.q_conv1d, gdn.k_conv1d, gdn.v_conv1d):
        conv.weight.zero_()
        conv.weight[..., -1] = 1.0
    gdn.b_proj.weight.zero_()  # sigmoid(0) = 0.5
    gdn.a_proj.weight.zero_()
    gdn.A_log.zero_()  # A = 1
    dt = torch.tensor(1e-3)
    gdn.dt_bias.fill_(float(dt + torch.log(-torch.expm1(-dt))))  # softplus(dt_bias) = 1e-3 -> exp(g) ~ 0.999
    gdn.o_norm.weight.fill_(1.0)


@torch.no_grad()
def init_gdn_mimic(gdn: GatedDeltaNet, std: float = 0.02, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for lin in (gdn.q_proj, gdn.k_proj, gdn.v_proj, gdn.g_proj, gdn.o_proj):
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * std)
    init_gdn_gates_mimic(gdn)


def convert(
    teacher_dir: str | Path,
    out_dir: str | Path,
    init: str = "teacher",
    layer_types: list[str] | None = None,
    window: int | None = 8192,
    expand_v: float = 2,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    rope_index_mode: str = "official",
) -> Path:
    """Teacher folder -> student folder (official format). Returns the output folder."""
    if init not in ("teacher", "mimic"):
        raise ValueError(f"init must be 'teacher' or 'mimic', not {init!r}")
    from ..checkpoint import resolve

    teacher_dir, out_dir = resolve(teacher_dir), Path(out_dir)
    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    config = student_config(teacher_config, layer_types, window, expand_v, rope_index_mode)
    t = config.text
    teacher = read_weights(teacher_dir)  # in-memory names, either spelling
    with torch.device("meta"):
        student = InfiniteVLForConditionalGeneration(config)
    student = student.to_empty(device="cpu").float()
    from ..model.vision import reset_rotary

    reset_rotary(student.model.visual)
    own = student.state_dict()
    copied = set()
    for name in own:
        if name in teacher and not _is_gdn_param(name, t.layer_types):
            if own[name].shape != teacher[name].shape:
                raise ValueError(f"{name}: teacher {tuple(teacher[name].shape)} vs student {tuple(own[name].shape)}")
            own[name].copy_(teacher[name].float())
            copied.add(name)
    for i, kind in enumerate(t.layer_types):
        if kind != LINEAR:
            continue
        gdn = student.language_model.layers[i].self_attn
        prefix = f"model.language_model.layers.{i}.self_attn."
        if init == "teacher":
            init_gdn_from_attention(
                gdn,
                *(teacher[prefix + p + ".weight"].float() for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
                kv_heads=t.num_key_value_heads,
                seed=seed + i,
            )
        else:
            init_gdn_mimic(gdn, seed=seed + i)
        copied.update(prefix + k for k, _ in gdn.named_parameters())
    student.tie_weights()
    if config.text.tie_word_embeddings:
        copied.add("lm_head.weight")
    missing = sorted(set(own) - copied)
    if missing:
        raise ValueError(f"the teacher checkpoint lacks tensors the student needs: {', '.join(missing[:20])}")
    student.save_pretrained(out_dir, dtype=dtype)
    for fname in PROCESSOR_FILES:
        if (teacher_dir / fname).exists():
            shutil.copy(teacher_dir / fname, out_dir / fname)
    return out_dir


def _is_gdn_param(name: str, layer_types: list[str]) -> bool:
    parts = name.split(".")
    if len(parts) > 4 and parts[:3] == ["model", "language_model", "layers"] and parts[4] == "self_attn":
        return layer_types[int(parts[3])] == LINEAR
    return False


def parse_layer_types(spec: str | None, num_layers: int) -> list[str] | None:
    """'hybrid' (default rule), 'softmax' / 'none' (no GDN layers: every layer keeps full attention), or an explicit
    comma list of linear / sliding / full."""
    if spec in (None, "", "hybrid"):
        return None
    if spec in ("softmax", "none", "teacher"):
        return [FULL] * num_layers
    names = {"linear": LINEAR, "sliding": SLIDING, "full": FULL, LINEAR: LINEAR, SLIDING: SLIDING, FULL: FULL}
    items = [s.strip() for s in spec.split(",")]
    bad = [s for s in items if s not in names]
    if bad or len(items) != num_layers:
        raise ValueError(f"layer types {spec!r}: need {num_layers} of linear/sliding/full (bad: {bad})")
    return [names[s] for s in items]
