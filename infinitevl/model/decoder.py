"""The hybrid decoder: pre-norm residual blocks whose mixer is Gated DeltaNet or sliding-window attention.

    h = x + mixer(input_layernorm(x));   y = h + mlp(post_attention_layernorm(h));   final `norm`

The mixer attribute is `self_attn` in both kinds of layer, as in the checkpoints. One forward serves training, a
full pass, chunked prefill and one-token decoding: the difference is only whether a state is passed. Whether decode
steps run the fused C++ kernels (ops/fused.py) is decided once per dtype and device (`set_decode_path`); each op of
a decode step is then the kernel or its plain reference (model/step.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import LINEAR, SINK, SPARSE, TextConfig
from ..ops import fused
from ..ops.linear import Linear
from ..ops.norm import rms_norm
from ..state import InfiniteVLState
from . import step
from .gdn import GatedDeltaNet
from .layout import TokenLayout
from .rope import rope_cos_sin
from .swa import SlidingWindowAttention
from .variant_attention import BlockSparseAttention, SinkWindowAttention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, kernels: bool = False) -> torch.Tensor:
        return self.down_proj(step.silu_mul(self.gate_proj(x), self.up_proj(x), kernels))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        mixer = {LINEAR: GatedDeltaNet, SINK: SinkWindowAttention, SPARSE: BlockSparseAttention}.get(
            self.layer_type, SlidingWindowAttention
        )
        self.self_attn = mixer(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, layout, layer_state=None, past_tokens=None, kernels=False) -> torch.Tensor:
        """`kernels`: a decode step through the fused kernels (the caller decided; model/step.py)."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h, _ = step.rms_norm(x, norm1.weight, norm1.eps, kernels=kernels)
        if self.layer_type == LINEAR:
            h = self.self_attn(h, layout, layer_state, kernels=kernels)
        else:
            h = self.self_attn(h, cos, sin, layout, layer_state, past_tokens, kernels=kernels)
        normed, x = step.rms_norm(x, norm2.weight, norm2.eps, residual=h, kernels=kernels)
        return x + self.mlp(normed, kernels)


class InfiniteVLTextModel(nn.Module):
    """Token embeddings, the decoder layers and the final norm (`model.language_model.*` in memory)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.decode_kernels = False  # see set_decode_path
        self._decode_request: str | None = None
        self._decided_for: tuple | None = None

    def set_decode_path(self, mode: str | None = None) -> bool:
        """Decide whether decode steps take the fused kernels (ops/fused.py): `mode` is one of fused.MODES, None for
        INFINITEVL_FUSED_DECODE. Decided for the current dtype and device; a later dtype or device change decides
        again with the same `mode`. Builds the kernels when they apply. Returns the decision."""
        weight = self.norm.weight
        self.decode_kernels = fused.decides(weight.dtype, weight.device, mode)
        self._decode_request, self._decided_for = mode, (weight.dtype, weight.device)
        gemv = self.decode_kernels and "avx512_bf16" in fused.features()
        for module in self.modules():
            if isinstance(module, Linear):
                module.kernel = gemv
        return self.decode_kernels

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: InfiniteVLState | None = None,
        output_hidden_states: bool = False,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """inputs_embeds [B, T, d], position_ids [3, B, T] -> (normed hidden [B, T, d], per-layer hiddens).

        With `state`, the tokens continue that stream and the state is updated in place (its RoPE index and token
        count are advanced by the caller, which knows the vision layout). `segment_ids` [B, T] packs several samples
        per row (training): no attention, memory or conv history crosses between them."""
        B, T, _ = inputs_embeds.shape
        past = state.num_tokens if state is not None else None
        layout = TokenLayout.build(attention_mask, B, T, inputs_embeds.device, past, segment_ids)
        c = self.config
        cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, inputs_embeds.dtype)
        x = inputs_embeds
        hiddens = [x] if output_hidden_states else None
        kernels = False
        if state is not None and layout.is_single_token and not (torch.is_grad_enabled() and x.requires_grad):
            if self._decided_for != (self.norm.weight.dtype, self.norm.weight.device):
                self.set_decode_path(self._decode_request)
            kernels = self.decode_kernels
        for i, layer in enumerate(self.layers):
            layer_state = state.layers[i] if state is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, layout, layer_state, past, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout, layer_state, past, kernels)
            if hiddens is not None and i < len(self.layers) - 1:
                hiddens.append(x)
        # the module itself unless fused: training's final_hidden_hook watches `norm`'s forward
        x = step.rms_norm(x, self.norm.weight, self.norm.eps, kernels=True)[0] if kernels else self.norm(x)
        if hiddens is not None:
            hiddens.append(x)  # as the official model: the last entry is after the final norm
        if state is not None:
            real = attention_mask.sum(-1) if attention_mask is not None else torch.full_like(state.num_tokens, T)
            state.num_tokens += real.to(state.num_tokens)
        return x, tuple(hiddens) if hiddens is not None else None
