"""InfiniteVL: the vision tower feeding the hybrid decoder, with a tied LM head.

Module names equal the in-memory checkpoint spelling (`model.visual.*`, `model.language_model.*`, `lm_head`), so
the state dict needs no renaming beyond the legacy on-disk spelling handled in `checkpoint.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import InfiniteVLConfig
from ..ops.linear import Linear
from ..ops.quant import (
    INT4_ROW_BLOCK,
    QuantConfig,
    QuantizationError,
    QuantizedEmbedding,
    QuantizedLinear,
    TiedQuantizedHead,
    fits,
)
from ..state import InfiniteVLState
from .decoder import InfiniteVLTextModel, RMSNorm
from .gdn import GatedDeltaNet, OutputNorm, ShortConv
from .rope import PositionPlan, VisionGridError, config_args
from .vision import build_vision_tower, encode


@dataclass
class InfiniteVLOutput:
    logits: torch.Tensor  # [B, T or logits_to_keep, vocab]
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    position_ids: torch.Tensor | None = None  # [3, B, T]
    next_position: torch.Tensor | None = None  # [B]: RoPE index of the next token


class InfiniteVLModel(nn.Module):
    def __init__(self, config: InfiniteVLConfig):
        super().__init__()
        self.visual = build_vision_tower(config.vision)
        self.language_model = InfiniteVLTextModel(config.text)


class InfiniteVLForConditionalGeneration(nn.Module):
    def __init__(self, config: InfiniteVLConfig):
        super().__init__()
        self.config = config
        self.model = InfiniteVLModel(config)
        t = config.text
        self.lm_head = Linear(t.hidden_size, t.vocab_size, bias=False)
        self.quantization: QuantConfig | None = None
        self.tie_weights()

    # -- construction --------------------------------------------------------------------------------------------
    def tie_weights(self) -> None:
        if self.config.text.tie_word_embeddings:
            embed = self.model.language_model.embed_tokens
            if isinstance(embed, QuantizedEmbedding):
                self.lm_head = TiedQuantizedHead(embed)
            else:
                self.lm_head.weight = embed.weight

    @classmethod
    def from_config(
        cls, config: InfiniteVLConfig, dtype: torch.dtype = torch.float32, device="cpu", seed: int | None = None
    ) -> InfiniteVLForConditionalGeneration:
        """A randomly initialised model (the official GDN initialisation, std `initializer_range` elsewhere)."""
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config)
        model.init_weights()
        return model.to(device=device, dtype=dtype).eval()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.text.initializer_range
        for module in self.model.language_model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (RMSNorm, OutputNorm)):
                nn.init.ones_(module.weight)
            elif isinstance(module, ShortConv):
                # as nn.Conv1d (flash-linear-attention's ShortConvolution) initialises a depthwise kernel
                bound = 1 / math.sqrt(module.weight.shape[-1])
                nn.init.uniform_(module.weight, -bound, bound)
            elif isinstance(module, GatedDeltaNet):
                init_gdn_gates(module)
        self.tie_weights()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        quantize: str | QuantConfig | None = None,
        group_size: int | None = None,
        embeddings: str | None = None,
        **config_overrides,
    ) -> InfiniteVLForConditionalGeneration:
        """Load a local folder (config.json + model.safetensors or a sharded index) or a resolvable hub id,
        strictly, one tensor at a time; see `checkpoint.load_pretrained`. `quantize` ("int8" / "int4", see
        `quantize`) quantizes each weight as it is read, so the float model is never in memory; a folder written
        from a quantized model loads quantized without it."""
        from ..checkpoint import load_pretrained

        return load_pretrained(
            cls,
            path,
            dtype=dtype,
            device=device,
            quantize=quantize,
            group_size=group_size,
            embeddings=embeddings,
            **config_overrides,
        )

    @torch.no_grad()
    def quantize(
        self,
        method: str | QuantConfig = "int4",
        group_size: int | None = None,
        embeddings: str = "int8",
        _keep: tuple[str, ...] | None = None,
    ) -> QuantConfig:
        """Weight-only quantization in place (see `ops/quant.py`): the decoder's linear layers to int8 (one scale
        per row) or int4 (groups of `group_size`, default 128); the tied embedding / LM head to one int8 table
        (`embeddings="none"` keeps it). The vision tower, norms, convs, gates and the small per-head gate
        projections (a_proj, b_proj) keep the model's dtype. Returns the config, which `save_pretrained` writes
        into config.json as `quantization_config`. On a meta model only the modules are swapped."""
        from ..checkpoint import to_disk_name

        if self.quantization is not None:
            raise QuantizationError(f"the model is already quantized ({self.quantization.describe()})")
        config = method if isinstance(method, QuantConfig) else QuantConfig(method, group_size, embeddings)
        keep = set(_keep) if _keep is not None else None
        kept = ["visual"]
        layers = self.model.language_model.layers
        for name, module in list(layers.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            disk = to_disk_name(f"model.language_model.layers.{name}")
            size = (module.out_features, module.in_features, config.group_size)
            wanted = disk not in keep if keep is not None else module.out_features >= INT4_ROW_BLOCK
            if not wanted or (keep is None and not fits(config.method, *size)):
                kept.append(disk)
                continue
            layers.set_submodule(name, QuantizedLinear.from_float(module, config))
        lm = self.model.language_model
        if config.embeddings == "int8":
            lm.embed_tokens = QuantizedEmbedding.from_float(lm.embed_tokens)
            if self.config.text.tie_word_embeddings:
                self.tie_weights()
            elif fits("int8", self.lm_head.out_features, self.lm_head.in_features, None):
                self.lm_head = QuantizedLinear.from_float(self.lm_head, QuantConfig("int8"))
            else:  # a width the int8 kernel cannot take: the untied head stays in the model's dtype
                kept.append("lm_head")
        else:
            kept += ["model.embed_tokens", "lm_head"]
        self.quantization = dataclasses.replace(config, modules_to_not_convert=tuple(kept))
        self.config = dataclasses.replace(
            self.config, extra={**self.config.extra, "quantization_config": self.quantization.to_json()}
        )
        return self.quantization

    def use_int8_products(self, min_rows: int | None = None) -> int:
        """int8 x int8 products (ops/int8_products.py) for the vision tower's and the decoder layers' linear layers
        when they are called with `min_rows` rows or more (default 32): the tower's patches, a prefill's tokens. A
        decode step keeps the layers' own products; so do the LM head (one row per prefill) and the per-head gate
        projections (a_proj, b_proj: a few outputs each). CPU only. Returns how many layers take the int8 path."""
        from ..ops import int8_products as i8

        served = (nn.Linear, QuantizedLinear)
        layers = [m for m in self.model.visual.modules() if isinstance(m, served)]
        layers += [
            m for m in self.model.language_model.layers.modules() if isinstance(m, served) and m.out_features >= 64
        ]
        return i8.enable(layers, i8.DEFAULT_MIN_ROWS if min_rows is None else min_rows)

    def save_pretrained(
        self, path: str | Path, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None
    ) -> Path:
        """Write the official format (legacy key spelling, tied lm_head omitted, sharded above the limit)."""
        from ..checkpoint import save_pretrained

        return save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations, the state and every weight that is not quantized."""
        return self.model.language_model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.language_model.norm.weight.device

    @property
    def language_model(self) -> InfiniteVLTextModel:
        return self.model.language_model

    def new_state(self, batch_size: int = 1, max_context: int | None = None) -> InfiniteVLState:
        """A zeroed inference state for this model, in its dtype and device."""
        return InfiniteVLState.allocate(self.config, batch_size, self.dtype, self.device, max_context)

    # -- inputs --------------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """[n_patches, 1176] -> [n_tokens, hidden]: what replaces the image placeholder tokens, in order."""
        return encode(self.model.visual, pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> torch.Tensor:
        return encode(self.model.visual, pixel_values_videos, video_grid_thw)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        image_embeds=None,
        video_embeds=None,
    ) -> torch.Tensor:
        """Token embeddings with the vision features scattered into the image/video placeholder positions."""
        embeds = self.model.language_model.embed_tokens(input_ids)
        c = self.config
        if pixel_values is not None and image_embeds is None:
            image_embeds = self.get_image_features(pixel_values, image_grid_thw)
        if pixel_values_videos is not None and video_embeds is None:
            video_embeds = self.get_video_features(pixel_values_videos, video_grid_thw)
        for token_id, feats, what in (
            (c.image_token_id, image_embeds, "image"),
            (c.video_token_id, video_embeds, "video"),
        ):
            mask = input_ids == token_id
            n_tokens = int(mask.sum())
            n_feats = 0 if feats is None else feats.shape[0]
            if n_tokens != n_feats:
                raise VisionGridError(
                    f"the input has {n_tokens} {what} placeholder tokens but the {what} inputs give "
                    f"{n_feats} {what} features"
                )
            if n_tokens:
                embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    def rope_index(self, input_ids, *args, **kwargs):
        """Multimodal positions [3, B, T] and the next running index [B] (see `rope.rope_index`); the arguments are
        `position_plan`'s."""
        plan = self.position_plan(input_ids, *args, **kwargs)
        return plan.take(input_ids.shape[1]), plan.next_position

    def position_plan(
        self,
        input_ids,
        attention_mask=None,
        image_grid_thw=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        start=None,
        mode=None,
        video_timestamps=None,
    ) -> PositionPlan:
        """The same positions handed out a slice at a time (`rope.PositionPlan`), for inputs of any length."""
        return PositionPlan(
            input_ids,
            **{**config_args(self.config), **({"mode": mode} if mode else {})},
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            video_timestamps=video_timestamps,
            attention_mask=attention_mask,
            start=start,
        )

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        state: InfiniteVLState | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        image_embeds: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        video_timestamps: list | None = None,
    ) -> InfiniteVLOutput:
        """One pass over [B, T] tokens. With `state`, the tokens continue that stream (positions, windows and
        memories carry over) and the state is updated in place. Padding (attention_mask 0) is on the left."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.embed(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, image_embeds, video_embeds
            )
        next_position = None
        if position_ids is None:
            if segment_ids is not None:
                raise ValueError("packed rows (segment_ids) need position_ids: each sample's own positions")
            if input_ids is None:
                raise ValueError("position_ids are required with inputs_embeds")
            start = state.next_position if state is not None else None
            position_ids, next_position = self.rope_index(
                input_ids,
                attention_mask,
                image_grid_thw,
                video_grid_thw,
                second_per_grid_ts,
                start=start,
                video_timestamps=video_timestamps,
            )
        hidden, hiddens = self.model.language_model(
            inputs_embeds, position_ids, attention_mask, state, output_hidden_states, segment_ids
        )
        if state is not None:
            if next_position is None:
                pos = position_ids.amax(0)
                if attention_mask is not None:
                    pos = pos.masked_fill(~attention_mask.bool(), -1)
                next_position = torch.maximum(pos.amax(-1) + 1, state.next_position)
            state.next_position.copy_(next_position)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return InfiniteVLOutput(
            logits=logits, loss=loss, hidden_states=hiddens, position_ids=position_ids, next_position=next_position
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Greedy continuation [B, n] of a prompt with optional vision inputs; see `engine.generation` for sampling,
        stop conditions and streaming."""
        from ..engine.generation import greedy_generate

        return greedy_generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over labels that are not `ignore_index`."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=ignore_index
    )


@torch.no_grad()
def init_gdn_gates(layer: GatedDeltaNet) -> None:
    """The official initialisation of A_log (log U(0, 16)) and dt_bias (inverse softplus of dt ~ logU(1e-3, 0.1))."""
    H = layer.A_log.shape[0]
    layer.A_log.copy_(torch.empty(H).uniform_(0, 16).clamp_(min=1e-4).log())
    dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
    layer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
