"""The measured configurations, both models built from them, and contexts produced by filling state or cache.

    4b    InfiniteVL-4B's official widths (SPEC); the baseline is then Qwen2.5-VL-3B's text model
    mini  the same structure scaled down so that a CPU sweep takes minutes: hidden 512, 8 layers (2 sliding-window
          attention + 6 Gated DeltaNet, i % 4 == 0 as in the 4B), 8/2 heads of 64, GDN 8 heads Dk 64 Dv 128, MLP
          ratio and window 8192 as in the 4B, vocabulary 32768; a vision tower of depth 8 and width 256 (the real
          one costs ~1.3 TFLOP per 448x448 frame, far too slow for a CPU stream)
    tiny  `config.tiny_config()`, the test model

The baseline is transformers' `Qwen2_5_VLTextModel` (SDPA attention, full attention in every layer, its own
`DynamicCache`) with an `lm_head` tied to its embeddings, of the same widths, depth, heads and vocabulary: the
teacher architecture InfiniteVL was distilled from.

Weights are random (fp32): for speed and memory only the shapes matter. Models are built on the meta device and
then materialised and filled in place, so that a 15 GB model takes seconds, not minutes, and only the parts a
section uses take memory. A context of N tokens is produced by filling: the sliding-window rings get random keys
and values at stream positions N - cap .. N - 1 and the GDN memories random values (InfiniteVL), or the cache gets
N random keys and values per layer (baseline). A decode step's work is the same as after a real prefill of N
tokens, which is what makes this equivalent for timing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ..config import InfiniteVLConfig, TextConfig, VisionConfig, tiny_config
from ..state import AttentionLayerState, InfiniteVLState
from . import CONFIG_NAMES

MINI_VOCAB = 32768


def mini_config() -> InfiniteVLConfig:
    base = MINI_VOCAB - 14  # special tokens at the top of the vocabulary, as in the tiny config
    text = TextConfig(
        vocab_size=MINI_VOCAB,
        hidden_size=512,
        intermediate_size=2752,  # 5.375 x hidden, as 11008 / 2048
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        mrope_section=[8, 12, 12],
        sliding_window=8192,
        num_linear_heads=8,
        num_linear_key_value_heads=8,
        linear_head_dim=64,
        expand_v=2,
    )
    vision = VisionConfig(
        depth=8,
        hidden_size=256,
        intermediate_size=684,  # 2.67 x hidden, as 3420 / 1280
        num_heads=4,
        window_size=112,
        fullatt_block_indexes=[3, 7],
        out_hidden_size=text.hidden_size,
    )
    return InfiniteVLConfig(
        text=text,
        vision=vision,
        image_token_id=base,
        video_token_id=base + 1,
        vision_start_token_id=base + 2,
        vision_end_token_id=base + 3,
        vision_token_id=base + 4,
        bos_token_id=base + 10,
        eos_token_id=base + 11,
        torch_dtype="float32",
    )


def byte_tokenizer(config: InfiniteVLConfig):
    """A byte-level tokenizer whose special tokens sit at the config's ids (tiny and mini configs)."""
    from ..defaults import tiny_tokenizer
    from ..processing.tokenizer import byte_level_tokenizer

    if config.text.vocab_size != MINI_VOCAB:
        return tiny_tokenizer(config)
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id")
    ids = {k: getattr(config, k) for k in (*names, "bos_token_id", "eos_token_id")}
    return byte_level_tokenizer(MINI_VOCAB, ids, im_start_id=MINI_VOCAB - 9)


def infinitevl_config(name: str) -> InfiniteVLConfig:
    if name == "4b":
        return InfiniteVLConfig(torch_dtype="float32")
    if name == "mini":
        return mini_config()
    if name == "tiny":
        return tiny_config()
    raise ValueError(f"unknown benchmark config {name!r}; known: {list(CONFIG_NAMES)}")


def baseline_config(config: InfiniteVLConfig):
    """transformers' Qwen2.5-VL text config with InfiniteVL's widths, depth, heads and vocabulary (full attention)."""
    from transformers.models.qwen2_5_vl import Qwen2_5_VLTextConfig

    t = config.text
    hf = Qwen2_5_VLTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        use_sliding_window=False,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
        bos_token_id=None,
        eos_token_id=None,
    )
    hf._attn_implementation = "sdpa"
    return hf


def describe_config(name: str, config: InfiniteVLConfig, vision: bool = False) -> dict[str, Any]:
    """The JSON record of a measured configuration: InfiniteVL's decoder and the matching baseline."""
    t = config.text
    text = {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name not in ("extra", "layer_types")}
    text["layers"] = {kind: t.layer_types.count(kind) for kind in sorted(set(t.layer_types))}
    out = {
        "name": name,
        "dtype": "float32",
        "infinitevl": text,
        "infinitevl_decoder_params": decoder_params(config),
        "baseline": {
            "model": "transformers Qwen2_5_VLTextModel + tied lm_head, sdpa attention, DynamicCache",
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "vocab_size": t.vocab_size,
            "attention": "full (every layer)",
        },
        "baseline_params": baseline_params(config),
    }
    if vision:
        out["vision"] = {f.name: getattr(config.vision, f.name) for f in dataclasses.fields(config.vision)}
        out["vision"].pop("extra")
    return out


# -- sizes (from the configs alone, before anything is built) ---------------------------------------------------------
_PARAMS: dict[tuple[str, str], int] = {}  # (model, config JSON) -> parameter count: meta builds take seconds


def decoder_params(config: InfiniteVLConfig) -> int:
    key = ("infinitevl", config.to_json())
    if key not in _PARAMS:
        from ..model.decoder import InfiniteVLTextModel

        with torch.device("meta"):
            _PARAMS[key] = sum(p.numel() for p in InfiniteVLTextModel(config.text).parameters())
    return _PARAMS[key]


def baseline_params(config: InfiniteVLConfig) -> int:
    key = ("baseline", config.to_json())
    if key not in _PARAMS:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

        with torch.device("meta"):
            _PARAMS[key] = sum(p.numel() for p in Qwen2_5_VLTextModel(baseline_config(config)).parameters())
    return _PARAMS[key]


def kv_bytes_per_token(config: InfiniteVLConfig, dtype_bytes: int = 4) -> int:
    """The baseline's cache growth per token: keys and values of every layer."""
    t = config.text
    return t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * dtype_bytes


def state_bytes(config: InfiniteVLConfig, dtype: torch.dtype = torch.float32) -> int:
    with torch.device("meta"):
        return InfiniteVLState.allocate(config, 1, dtype, "meta").nbytes


# -- building ----------------------------------------------------------------------------------------------------------
POOL_SIZE = 2**20 + 7  # not a multiple of any width: the tiled pattern does not line up with rows


def _tile_(p: torch.Tensor, pool: torch.Tensor) -> None:
    flat = p.view(-1)
    n = pool.numel()
    for s in range(0, flat.numel(), n):
        e = min(s + n, flat.numel())
        flat[s:e].copy_(pool[: e - s])


@torch.no_grad()
def fill_random_(module: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Random values in place: N(0, std) weights, unit norm weights, zero biases, InfiniteVL's gate initialisation
    for A_log / dt_bias and a uniform depthwise conv kernel. Never NaN or inf, whatever the memory held before.
    Large matrices are tiled from a pool of ~1M random values (at memory speed: a 15 GB model fills in seconds,
    where drawing every value takes minutes on 2 cores); for timing and memory only the shapes matter."""
    from ..model.gdn import GatedDeltaNet
    from ..model.vlm import init_gdn_gates

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    gen = torch.Generator(device=device).manual_seed(seed)  # on the weights' device: a GPU model fills in place
    pool = torch.empty(POOL_SIZE, device=device).normal_(0.0, std, generator=gen)
    for sub in module.modules():
        if isinstance(sub, GatedDeltaNet):
            init_gdn_gates(sub)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("A_log", "dt_bias"):
            continue
        if "conv1d" in name:
            bound = 1 / math.sqrt(p.shape[-1])
            p.uniform_(-bound, bound, generator=gen)
        elif p.dim() == 1 and ("norm" in name or "ln_q" in name):
            p.fill_(1.0)
        elif p.dim() == 1:
            p.zero_()
        elif p.numel() > POOL_SIZE:
            _tile_(p, pool)
        else:
            p.normal_(0.0, std, generator=gen)
    return module


def build_infinitevl(
    config: InfiniteVLConfig, vision: bool = False, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32
):
    """InfiniteVL with random weights (fp32 on the CPU unless told otherwise); without `vision` the tower stays on
    the meta device (no memory)."""
    from ..model import InfiniteVLForConditionalGeneration
    from ..model.vision import reset_rotary

    with torch.device("meta"):
        model = InfiniteVLForConditionalGeneration(config).to(dtype)
    parts = [model.model.language_model] + ([model.model.visual] if vision else [])
    for part in parts:
        part.to_empty(device=device)
        fill_random_(part, seed)
    if vision:
        reset_rotary(model.model.visual)
    model.tie_weights()
    if not config.text.tie_word_embeddings:
        model.lm_head.to_empty(device=device)
        fill_random_(model.lm_head, seed + 1)
    return model.eval()


class BaselineLM(nn.Module):
    """transformers' Qwen2.5-VL text model with a tied lm_head: the Transformer InfiniteVL replaces."""

    def __init__(self, hf_config):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

        super().__init__()
        self.config = hf_config
        self.model = Qwen2_5_VLTextModel(hf_config)
        self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.config)

    @torch.no_grad()
    def prefill(self, cache, input_ids=None, inputs_embeds=None, position_ids=None) -> torch.Tensor:
        """Append tokens (ids [B, T] or embeddings [B, T, d]) to `cache`; the logits of the last position."""
        out = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return self.lm_head(out.last_hidden_state[:, -1])

    @torch.no_grad()
    def decode_step(self, cache, token_ids: torch.Tensor) -> torch.Tensor:
        """One token per row ([B]) at the next position; logits [B, vocab]."""
        n = cache.get_seq_length()
        B = token_ids.shape[0]
        positions = torch.full((3, B, 1), n, dtype=torch.long, device=token_ids.device)
        return self.prefill(cache, input_ids=token_ids.view(B, 1), position_ids=positions)


def build_baseline(
    config: InfiniteVLConfig, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32
) -> BaselineLM:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    hf = baseline_config(config)
    with torch.device("meta"):
        model = BaselineLM(hf).to(dtype)
    model.to_empty(device=device)
    model.lm_head.weight = model.model.embed_tokens.weight  # to_empty unties: tie before filling
    fill_random_(model, seed)
    # its frequencies are a non-persistent buffer
    model.model.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=hf).to(device)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct materialised parameters (a tied matrix counts once; meta tensors not at all)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.device.type == "meta" or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


# -- contexts by filling -----------------------------------------------------------------------------------------------
@torch.no_grad()
def fill_state(state: InfiniteVLState, n_tokens: int, seed: int = 0) -> InfiniteVLState:
    """Make `state` look like a stream of `n_tokens` tokens (rings full up to the window, random memories)."""
    gen = torch.Generator(device=state.device).manual_seed(seed)  # on the state's device (a GPU state too)
    n = n_tokens
    for layer in state.layers:
        if isinstance(layer, AttentionLayerState):
            cap = layer.capacity
            layer.keys.normal_(generator=gen)
            layer.values.normal_(generator=gen)
            positions = torch.arange(max(0, n - cap), n, device=state.device)
            layer.positions.fill_(-1)
            layer.positions[:, positions % cap] = positions
        else:
            layer.memory.normal_(0.0, 0.05, generator=gen)
            for tail in (layer.conv_q, layer.conv_k, layer.conv_v):
                tail.normal_(0.0, 0.5, generator=gen)
    state.num_tokens.fill_(n)
    state.next_position.fill_(n)
    return state


@torch.no_grad()
def filled_cache(model: BaselineLM, n_tokens: int, seed: int = 0, block: int = 1024):
    """A DynamicCache holding `n_tokens` random keys and values per layer (a random block tiled: fast to make), on
    the model's device and in its dtype."""
    hf = model.config
    KV, hd = hf.num_key_value_heads, hf.hidden_size // hf.num_attention_heads
    weight = model.lm_head.weight
    gen = torch.Generator().manual_seed(seed)
    width = max(1, min(block, n_tokens))
    tiles = [torch.randn(1, KV, width, hd, generator=gen).to(weight) for _ in range(2)]
    cache = model.new_cache()
    for layer in cache.layers:
        kv = []
        for tile in tiles:
            full = torch.empty(1, KV, n_tokens, hd, dtype=weight.dtype, device=weight.device)
            for s in range(0, n_tokens, width):
                e = min(s + width, n_tokens)
                full[:, :, s:e].copy_(tile[:, :, : e - s])
            kv.append(full)
        layer.lazy_initialization(*kv)
        layer.keys, layer.values = kv
    return cache


def cache_bytes(cache) -> int:
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
    )
