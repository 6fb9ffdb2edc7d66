"""The teacher: a Qwen2.5-VL checkpoint (transformers) or an InfiniteVL one, run without gradients, with the input
and output of chosen decoder layers captured by hooks.

Both models get the same explicit multimodal positions as the student, so that the two see identical RoPE indices
whatever convention either library would have picked by itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .collate import model_inputs


@dataclass
class TeacherOutput:
    logits: torch.Tensor | None
    hidden: torch.Tensor | None = None  # [B, T, D] after the final norm: the logits are hidden @ head_weight.T
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)


def final_hidden_hook(model: torch.nn.Module, into: dict) -> torch.utils.hooks.RemovableHandle:
    """Keep the final normed hidden states [B, T, D] of a forward of `model` (InfiniteVL or transformers'
    Qwen2.5-VL, which share the layout `model.model.language_model.norm`) in `into["hidden"]`."""
    norm = model.model.language_model.norm
    return norm.register_forward_hook(lambda m, args, output: into.__setitem__("hidden", output))


class Teacher:
    def __init__(self, model: torch.nn.Module, kind: str):
        self.model = model.eval().requires_grad_(False)
        self.kind = kind

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> Teacher:
        from ..checkpoint import resolve

        path = resolve(path)
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") == "infinite_vl":
            from ..model import InfiniteVLForConditionalGeneration

            return cls(
                InfiniteVLForConditionalGeneration.from_pretrained(path, dtype=dtype, device=device), "infinitevl"
            )
        if config.get("model_type") != "qwen2_5_vl":
            raise ValueError(
                f"{path}: teacher must be a Qwen2.5-VL or InfiniteVL checkpoint "
                f"(model_type {config.get('model_type')!r})"
            )
        from transformers import Qwen2_5_VLForConditionalGeneration
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(path), dtype=dtype, attn_implementation="sdpa"
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(model.to(device), "qwen2_5_vl")

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def head_weight(self) -> torch.Tensor:
        """[V, D]: the LM head's weight."""
        return self.model.lm_head.weight

    def to(self, device) -> Teacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self, batch: dict, capture: set[int] = frozenset(), logits: bool = True, hidden: bool = False
    ) -> TeacherOutput:
        """Run on a padded batch; `capture` names the layers whose input/output to keep, `hidden` keeps the final
        hidden states (without `logits`, only the last position's logits are computed, and not returned)."""
        if "segment_ids" in batch:
            raise ValueError("the teacher runs on padded batches, not packed ones")
        out = TeacherOutput(None)
        hooks = []
        for i in capture:
            layer = self.layers[i]
            hooks.append(
                layer.register_forward_pre_hook(
                    lambda m, args, kwargs, i=i: out.layer_inputs.__setitem__(
                        i, (args[0] if args else kwargs["hidden_states"]).detach()
                    ),
                    with_kwargs=True,
                )
            )
            hooks.append(
                layer.register_forward_hook(
                    lambda m, args, output, i=i: out.layer_outputs.__setitem__(
                        i, (output[0] if isinstance(output, tuple) else output).detach()
                    )
                )
            )
        kept: dict = {}
        if hidden:
            hooks.append(final_hidden_hook(self.model, kept))
        inputs = model_inputs(batch, exclude=("segment_ids",))
        extra = {"use_cache": False} if self.kind == "qwen2_5_vl" else {}
        try:
            result = self.model(**inputs, **extra, logits_to_keep=0 if logits else 1)
        finally:
            for h in hooks:
                h.remove()
        out.logits = result.logits if logits else None
        out.hidden = kept.get("hidden")
        return out


def new_qwen_teacher(
    folder: str | Path,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    max_pixels: int = 448 * 448,
    spread: bool = True,
    tokenizer=None,
) -> Path:
    """A randomly initialised Qwen2.5-VL (transformers) in a folder, with the tiny byte-level tokenizer and a
    processor config: a stand-in teacher for tests, and the starting point of the miniature pipeline. `spread`
    uses `spread_init` (weights that all matter) instead of transformers' std-0.02 initialisation; `tokenizer`
    replaces the byte-level one (its special tokens must sit at `tiny_config`'s ids)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from ..config import tiny_config
    from ..defaults import tiny_tokenizer
    from ..processing.processor import Processor

    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    ours = tiny_config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        mrope_section=section,
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=ours.text.vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rms_norm_eps=1e-6,
            max_position_embeddings=1 << 20,
            tie_word_embeddings=True,
            bos_token_id=ours.bos_token_id,
            eos_token_id=ours.eos_token_id,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=2,
            out_hidden_size=hidden,
            window_size=56,
            fullatt_block_indexes=[vision_depth - 1],
            tokens_per_second=2,
        ),
        image_token_id=ours.image_token_id,
        video_token_id=ours.video_token_id,
        vision_start_token_id=ours.vision_start_token_id,
        vision_end_token_id=ours.vision_end_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
        if spread:
            from ..model.init import spread_init

            spread_init(model, seed)
        folder = Path(folder)
        model.save_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(verbosity)
    Processor(tokenizer or tiny_tokenizer(ours), ours, min_pixels=56 * 56, max_pixels=max_pixels).save_pretrained(
        folder
    )
    return folder
