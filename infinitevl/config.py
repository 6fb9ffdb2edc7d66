"""Configuration of the InfiniteVL model: plain dataclasses that read and write the official `config.json`.

The official file is flat (text fields at the top level, `vision_config` nested, `model_type` `infinite_vl`);
checkpoints re-saved by transformers also carry a nested `text_config`. Both are read. Unknown keys are kept in
`extra` so that a config read and written again loses nothing. This module only describes shapes and options;
it builds no modules.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

LINEAR = "linear_attention"
SLIDING = "sliding_attention"
FULL = "full_attention"
# The paper's v2 variants of the softmax layers (docs/variants.md): attention sinks plus a sliding window (Online),
# and parameter-free block-sparse attention over 32-token chunks (Offline). Both keep full attention's weights.
SINK = "sink_sliding_attention"
SPARSE = "block_sparse_attention"
LAYER_TYPES = (LINEAR, SLIDING, FULL, SINK, SPARSE)
SOFTMAX_TYPES = (SLIDING, FULL, SINK, SPARSE)
# Fields that only mean something when a layer of that type exists: written, and part of a state's fingerprint,
# only then (so that configs and snapshots of models without them are unchanged).
SINK_FIELDS = ("num_sink_tokens",)
SPARSE_FIELDS = (
    "sparse_chunk_size",
    "sparse_top_k",
    "sparse_init_chunks",
    "sparse_local_tokens",
    "sparse_dense_threshold",
)

# How a video's seconds-per-grid enters the temporal RoPE index (SPEC section 6).
# "official": the released checkpoints' code truncates it to an integer before multiplying (0.5 s -> 0), and text
#             after a vision block resumes at max(position) + 1.
# "transformers": recent transformers multiplies in floating point and resumes text at start + max(h, w).
ROPE_INDEX_MODES = ("official", "transformers")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""


@dataclass
class VisionConfig:
    """The Qwen2.5-VL vision tower and patch merger (identical to Qwen2.5-VL-3B's by default)."""

    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    window_size: int = 112
    out_hidden_size: int = 2048
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def patch_dim(self) -> int:
        """Length of one row of the processor's flattened patch matrix (3 * 2 * 14 * 14 = 1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision fullatt_block_indexes {bad} are outside 0..{self.depth - 1}")


@dataclass
class TextConfig:
    """The hybrid decoder: Gated DeltaNet layers and sliding-window attention layers (defaults: InfiniteVL-4B)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 128000
    initializer_range: float = 0.02
    # softmax-attention layers
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    use_sliding_window: bool = True
    sliding_window: int | None = 8192
    attention_dropout: float = 0.0
    layer_types: list[str] | None = None
    # sink_sliding_attention layers (Online): keys at positions < num_sink_tokens stay visible forever, the others
    # within `sliding_window`
    num_sink_tokens: int = 256
    # block_sparse_attention layers (Offline, after InfLLM-V2): a query at position i sees the first
    # `sparse_init_chunks` chunks, the last `sparse_local_tokens` tokens (itself included) and the `sparse_top_k`
    # earlier chunks of `sparse_chunk_size` tokens whose mean-pooled keys score highest for its key/value group;
    # queries at positions < `sparse_dense_threshold` attend to everything before them.
    sparse_chunk_size: int = 32
    sparse_top_k: int = 64
    sparse_init_chunks: int = 1
    sparse_local_tokens: int = 2048
    sparse_dense_threshold: int = 8192
    # Gated DeltaNet layers
    num_linear_heads: int = 16
    num_linear_key_value_heads: int = 16
    linear_head_dim: int = 128
    expand_v: float = 2
    conv_size: int = 4
    use_gate: bool = True
    use_short_conv: bool = True
    conv_bias: bool = False
    norm_eps: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            # The official rule: layer i is softmax (sliding) attention when i % 4 == 0, Gated DeltaNet otherwise.
            self.layer_types = [SLIDING if i % 4 == 0 else LINEAR for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        self.mrope_section = list(self.mrope_section)

    # -- derived sizes -------------------------------------------------------------------------------------------
    @property
    def window(self) -> int | None:
        """Keys a sliding-window query sees, itself included; None when the window is disabled (full attention)."""
        return self.sliding_window if self.use_sliding_window else None

    @property
    def linear_value_head_dim(self) -> int:
        return int(self.linear_head_dim * self.expand_v)

    @property
    def linear_key_dim(self) -> int:
        return self.num_linear_key_value_heads * self.linear_head_dim

    @property
    def linear_value_dim(self) -> int:
        return int(self.linear_key_dim * self.expand_v)

    def layer_window(self, layer_idx: int) -> int | None:
        """The attention window of softmax layer `layer_idx` (None: unbounded). Sink layers always have one."""
        kind = self.layer_types[layer_idx]
        if kind == SINK:
            return self.sliding_window
        return self.window if kind == SLIDING else None

    def variant_fields(self) -> tuple[str, ...]:
        """The option fields of the layer types this config uses (SINK_FIELDS / SPARSE_FIELDS)."""
        return (SINK_FIELDS if SINK in self.layer_types else ()) + (SPARSE_FIELDS if SPARSE in self.layer_types else ())

    def validate(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if unknown:
            raise ConfigError(f"unknown layer types {unknown}; known: {list(LAYER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_attention_heads * self.head_dim != self.hidden_size:
            # The official attention derives head_dim from hidden_size / heads; a config disagreeing with it would
            # load with silently different shapes there.
            raise ConfigError(
                f"head_dim {self.head_dim} x num_attention_heads {self.num_attention_heads} != hidden_size "
                f"{self.hidden_size}"
            )
        if self.num_linear_heads % self.num_linear_key_value_heads:
            raise ConfigError(
                f"num_linear_key_value_heads {self.num_linear_key_value_heads} must divide "
                f"num_linear_heads {self.num_linear_heads}"
            )
        if self.linear_head_dim * self.expand_v != int(self.linear_head_dim * self.expand_v):
            raise ConfigError(f"expand_v {self.expand_v} x linear_head_dim {self.linear_head_dim} is not an integer")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ConfigError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")
        if SLIDING in self.layer_types and self.use_sliding_window and (self.sliding_window or 0) < 2:
            raise ConfigError(f"sliding_window must be >= 2, got {self.sliding_window}")
        self._validate_variants()
        if not self.use_short_conv:
            raise ConfigError("use_short_conv=False is not supported: every released checkpoint uses the short conv")
        if self.conv_bias:
            raise ConfigError("conv_bias=True is not supported: the released checkpoints have no conv bias")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (silu only)")

    def _validate_variants(self) -> None:
        if SINK in self.layer_types:
            if self.sliding_window is None or self.sliding_window < 2:
                raise ConfigError(f"sink_sliding_attention needs sliding_window >= 2, got {self.sliding_window}")
            if self.num_sink_tokens < 0:
                raise ConfigError(f"num_sink_tokens must be >= 0, got {self.num_sink_tokens}")
        if SPARSE in self.layer_types:
            for name in ("sparse_chunk_size", "sparse_top_k"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
            for name in ("sparse_init_chunks", "sparse_dense_threshold"):
                if getattr(self, name) < 0:
                    raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
            if self.sparse_local_tokens < self.sparse_chunk_size:
                # the chunk a query is in is not complete yet, so it cannot be selected: the local set must hold it
                raise ConfigError(
                    f"sparse_local_tokens {self.sparse_local_tokens} must be >= sparse_chunk_size "
                    f"{self.sparse_chunk_size}"
                )


_TOKEN_FIELDS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_token_id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Keys of the official file that describe the runtime, not the model; read and written back, never used.
_IGNORED = {
    "attn_implementation",
    "_attn_implementation",
    "use_cache",
    "max_window_layers",
    "mode",
    "auto_map",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "model_type",
    "rope_scaling",
    "rope_parameters",
    "text_config",
    "vision_config",
}


@dataclass
class InfiniteVLConfig:
    """The whole model: decoder, vision tower, special tokens and the RoPE-index convention."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    rope_index_mode: str = "official"
    torch_dtype: str | None = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.text.validate()
        self.vision.validate()
        if self.rope_index_mode not in ROPE_INDEX_MODES:
            raise ConfigError(f"rope_index_mode {self.rope_index_mode!r} unknown; known: {list(ROPE_INDEX_MODES)}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size {self.text.hidden_size}"
            )
        for name in ("image_token_id", "video_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise ConfigError(
                    f"{name} {getattr(self, name)} is outside the vocabulary (size {self.text.vocab_size})"
                )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # -- reading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InfiniteVLConfig:
        """Read the official flat layout, a nested `text_config`, or a mix (nested values win over flat ones)."""
        raw = json.loads(json.dumps(raw))  # deep copy, JSON types only
        flat = {k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}
        text_raw = {**flat, **(raw.get("text_config") or {})}
        text = _build(TextConfig, text_raw, _text_aliases(text_raw))
        vision = _build(VisionConfig, dict(raw.get("vision_config") or {}), {})
        top = {k: flat[k] for k in _TOKEN_FIELDS if k in flat}
        for k in _TOKEN_FIELDS:  # token ids may also sit only in text_config
            if k not in top and k in (raw.get("text_config") or {}):
                top[k] = raw["text_config"][k]
        text_field_names = {f.name for f in fields(TextConfig)} | set(_text_aliases(text_raw))
        known = set(_TOKEN_FIELDS) | text_field_names | _IGNORED | {"rope_index_mode"}
        extra = {k: v for k, v in flat.items() if k not in known}
        dtype = raw.get("torch_dtype", raw.get("dtype"))
        cfg = cls(
            text=text,
            vision=vision,
            rope_index_mode=raw.get("rope_index_mode", "official"),
            torch_dtype=dtype,
            extra={**extra, **{k: raw[k] for k in ("architectures", "auto_map") if k in raw}},
            **top,
        )
        # keep the runtime keys of the official file so that writing it back reproduces them
        cfg.extra.update({k: raw[k] for k in ("attn_implementation", "use_cache", "max_window_layers") if k in raw})
        text.extra = {}
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> InfiniteVLConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(raw)

    # -- writing -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The official flat layout (loadable by the official configuration class), plus our own options."""
        t = self.text
        out: dict[str, Any] = {
            "architectures": ["InfiniteVLQwen2_5_VLForConditionalGeneration"],
            "model_type": "infinite_vl",
        }
        unused = set(SINK_FIELDS + SPARSE_FIELDS) - set(t.variant_fields())
        for f in fields(TextConfig):
            if f.name in ("extra", "mrope_section", "rope_theta") or f.name in unused:
                continue
            out[f.name] = getattr(t, f.name)
        out["rope_theta"] = t.rope_theta
        out["rope_scaling"] = {"mrope_section": list(t.mrope_section), "rope_type": "default", "type": "default"}
        for k in _TOKEN_FIELDS:
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.rope_index_mode != "official":
            out["rope_index_mode"] = self.rope_index_mode
        vision = {f.name: getattr(self.vision, f.name) for f in fields(VisionConfig) if f.name != "extra"}
        vision.update(
            {
                "model_type": "infinite_vl",
                "in_chans": self.vision.in_channels,
                "spatial_patch_size": self.vision.patch_size,
            }
        )
        vision.update(self.vision.extra)
        out["vision_config"] = vision
        out.update(self.extra)
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "config.json"
        path.write_text(self.to_json() + "\n")
        return path

    def replace(self, **text_changes: Any) -> InfiniteVLConfig:
        """A copy with some decoder fields changed (e.g. `layer_types`); validated."""
        text = dataclasses.replace(self.text, **text_changes)
        return dataclasses.replace(self, text=text)

    def fingerprint(self) -> dict[str, Any]:
        """What a saved inference state depends on: every shape of the decoder, and how positions are numbered
        (the sliding-window caches hold keys already rotated, and the running RoPE index continues the stream)."""
        t = self.text
        return {
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_hidden_layers,
            "layer_types": list(t.layer_types),
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "sliding_window": t.window,
            "num_linear_heads": t.num_linear_heads,
            "num_linear_key_value_heads": t.num_linear_key_value_heads,
            "linear_head_dim": t.linear_head_dim,
            "expand_v": t.expand_v,
            "conv_size": t.conv_size,
            "vocab_size": t.vocab_size,
            "rope_theta": float(t.rope_theta),
            "mrope_section": list(t.mrope_section),
            "rope_index_mode": self.rope_index_mode,
            "tokens_per_second": self.vision.tokens_per_second,
            **{name: getattr(t, name) for name in t.variant_fields()},
        }


def _text_aliases(raw: dict[str, Any]) -> dict[str, Any]:
    """Official keys whose meaning lives in a differently named field here."""
    out: dict[str, Any] = {}
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if "mrope_section" in rope:
        out["mrope_section"] = rope["mrope_section"]
    if "rope_theta" in rope and "rope_theta" not in raw:
        out["rope_theta"] = rope["rope_theta"]
    return out


def _build(cls, raw: dict[str, Any], overrides: dict[str, Any]):
    names = {f.name for f in fields(cls)} - {"extra"}
    kwargs = {k: v for k, v in raw.items() if k in names}
    kwargs.update(overrides)
    if cls is VisionConfig:
        if "in_chans" in raw and "in_channels" not in raw:
            kwargs["in_channels"] = raw["in_chans"]
        extra = {
            k: v
            for k, v in raw.items()
            if k not in names and k not in ("in_chans", "spatial_patch_size", "model_type", "torch_dtype", "dtype")
        }
        return cls(**kwargs, extra=extra)
    return cls(**kwargs)


def tiny_config(**text_overrides: Any) -> InfiniteVLConfig:
    """A small random-weight configuration for tests, examples and the CPU demo (same structure as the 4B)."""
    text = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mrope_section=[2, 3, 3],
        rope_theta=10000.0,
        sliding_window=24,
        num_linear_heads=4,
        num_linear_key_value_heads=4,
        linear_head_dim=16,
        expand_v=2,
    )
    text.update(text_overrides)
    vision = VisionConfig(
        depth=4,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        window_size=56,
        fullatt_block_indexes=[1, 3],
        out_hidden_size=text["hidden_size"],
    )
    return InfiniteVLConfig(
        text=TextConfig(**text),
        vision=vision,
        image_token_id=370,
        video_token_id=371,
        vision_start_token_id=372,
        vision_end_token_id=373,
        vision_token_id=374,
        bos_token_id=380,
        eos_token_id=381,
        torch_dtype="float32",
    )
