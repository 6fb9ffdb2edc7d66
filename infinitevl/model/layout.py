"""Where each token of a forward pass sits in its stream: shared by all layers of one call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLayout:
    """positions [B, T]: stream position of each token (-1 for padding); valid [B, T] bool or None (no padding);
    num_left_pad [B] or None. Padding must be on the left when a state is carried (the engine's convention);
    without a state, padding anywhere is masked out."""

    positions: torch.Tensor
    valid: torch.Tensor | None
    num_left_pad: torch.Tensor | None

    @classmethod
    def build(
        cls,
        attention_mask: torch.Tensor | None,
        batch: int,
        length: int,
        device: torch.device,
        past_tokens: torch.Tensor | None = None,
    ) -> TokenLayout:
        offset = past_tokens.view(-1, 1) if past_tokens is not None else 0
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(length, device=device).expand(batch, length) + offset
            return cls(positions, None, None)
        valid = attention_mask.bool()
        positions = torch.where(valid, valid.long().cumsum(-1) - 1 + offset, -1)
        left_padded = bool((valid[:, 1:] >= valid[:, :-1]).all())
        num_left_pad = (~valid).sum(-1) if left_padded else None
        if past_tokens is not None and not left_padded:
            raise ValueError("with a carried state, padding must be on the left (attention_mask 0s before the 1s)")
        return cls(positions, valid, num_left_pad)

    @property
    def is_single_token(self) -> bool:
        return self.positions.shape[1] == 1 and self.valid is None
