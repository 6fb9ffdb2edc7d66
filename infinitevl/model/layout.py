"""Where each token of a forward pass sits in its stream: shared by all layers of one call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLayout:
    """positions [B, T]: stream position of each token (-1 for padding); valid [B, T] bool or None (no padding);
    num_left_pad [B] or None; segments [B, T] or None: packed training rows, the id of the sample each token belongs
    to (-1 for padding) — nothing crosses from one sample to another. Padding must be on the left when a state is
    carried (the engine's convention); without a state, padding anywhere is masked out."""

    positions: torch.Tensor
    valid: torch.Tensor | None
    num_left_pad: torch.Tensor | None
    segments: torch.Tensor | None = None

    def spans(self) -> list[tuple[int, int, int]]:
        """(row, start, end) of every packed sample (runs of one segment id >= 0)."""
        out = []
        for b, row in enumerate(self.segments.tolist()):
            start = 0
            for i in range(1, len(row) + 1):
                if i == len(row) or row[i] != row[start]:
                    if row[start] >= 0:
                        out.append((b, start, i))
                    start = i
        return out

    @classmethod
    def build(
        cls,
        attention_mask: torch.Tensor | None,
        batch: int,
        length: int,
        device: torch.device,
        past_tokens: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> TokenLayout:
        if segment_ids is not None:
            if past_tokens is not None:
                raise ValueError("packed samples (segment_ids) cannot continue a stream state")
            valid = segment_ids >= 0
            positions = torch.where(valid, torch.arange(length, device=device).expand(batch, length), -1)
            return cls(positions, None if bool(valid.all()) else valid, None, segment_ids)
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
