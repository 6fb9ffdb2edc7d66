"""Prefill: append an input of any length to the streams in a state, one chunk of bounded size at a time.

Nothing the size of the whole input is built besides the token ids: each chunk is embedded on its own, its
multimodal positions come from a `PositionPlan` that hands them out a slice at a time, and the vision tower runs
per vision block (long videos per group of frames) when the first chunk reaches that block; its features are
dropped once their placeholders are consumed. Peak memory therefore depends on the chunk size and the largest
vision block, not on the input's length. The result equals one full pass (the tests check it at every split).

`prefill_steps` runs one chunk per `next()`, so a caller (the server's scheduler) can interleave other work between
chunks; `prefill` runs them all. This module holds no model code: it only drives
`InfiniteVLForConditionalGeneration`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import torch

from ..model.rope import VisionGridError
from ..model.vision import encode
from ..state import InfiniteVLState

DEFAULT_CHUNK = 2048


class _VisionFeatures:
    """The features of one kind of placeholder (images or videos), computed a group of frames at a time.

    Feature index i is the i-th placeholder of that kind in row-major order over the batch (the order of the grids
    and of a full pass's `masked_scatter`). A block with several temporal steps is cut into groups of at most
    `tokens_per_group` tokens (whole steps): the tower attends within a temporal step only, so the features are the
    same as the whole block's."""

    def __init__(self, model, pixels, grids, precomputed, tokens_per_group: int):
        self.model, self.pixels, self.precomputed = model, pixels, precomputed
        merge = model.config.vision.spatial_merge_size**2
        self.groups: list[tuple[int, int, int, torch.Tensor]] = []  # (first token, first patch row, tokens, grid)
        token, patch = 0, 0
        for t, h, w in [] if grids is None else grids.tolist():
            per_step = h * w // merge
            steps = max(1, tokens_per_group // max(per_step, 1))
            for t0 in range(0, t, steps):
                n = min(steps, t - t0)
                self.groups.append((token, patch, n * per_step, torch.tensor([[n, h, w]])))
                token += n * per_step
                patch += n * h * w
        self.total = precomputed.shape[0] if precomputed is not None else token
        self._starts = [g[0] for g in self.groups]
        self._cache: dict[int, torch.Tensor] = {}

    def take(self, start: int, count: int) -> torch.Tensor:
        """Features [count, d] of placeholders start .. start + count - 1 (each asked for exactly once)."""
        if self.precomputed is not None:
            return self.precomputed[start : start + count]
        parts, end = [], start + count
        g = bisect.bisect_right(self._starts, start) - 1
        while start < end:
            first, patch, n, grid = self.groups[g]
            if g not in self._cache:
                rows = grid.prod().item()
                self._cache[g] = encode(self.model.model.visual, self.pixels[patch : patch + rows], grid)
            stop = min(end, first + n)
            parts.append(self._cache[g][start - first : stop - first])
            if stop == first + n:  # the group's last placeholder: nothing will ask for it again
                del self._cache[g]
            start, g = stop, g + 1
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def prefill_steps(
    model,
    state: InfiniteVLState,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts=None,
    video_timestamps=None,
    image_embeds: torch.Tensor | None = None,
    video_embeds: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    all_logits: bool = False,
    position_ids: torch.Tensor | None = None,
    next_position: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> Iterator[torch.Tensor | None]:
    """Append [B, T] tokens (with their vision inputs) to the streams in `state`, one chunk per `next()`.

    Each step yields that chunk's logits [B, n, vocab] with `all_logits`; otherwise None, except the last step,
    which yields the logits of the last position [B, vocab]. The inputs are checked before anything runs (a
    mismatch of placeholders and vision inputs raises `VisionGridError` here, not at the first step); the state
    changes with every step and its RoPE index is advanced after the last. Explicit `position_ids` [3, B, T] with
    `next_position` [B] replace the computed positions (live frames placed by their timestamps), and
    `inputs_embeds` [B, T, d] the embedding (a vision block split between calls)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"prefill needs input_ids [B, T] with T >= 1 (got shape {tuple(input_ids.shape)})")
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    c = model.config
    features = {}
    if inputs_embeds is None:
        for token_id, what, pixels, grids, given in (
            (c.image_token_id, "image", pixel_values, image_grid_thw, image_embeds),
            (c.video_token_id, "video", pixel_values_videos, video_grid_thw, video_embeds),
        ):
            per_row = (input_ids == token_id).sum(1)
            feats = _VisionFeatures(model, pixels, grids, given, tokens_per_group=chunk_size)
            n_tokens = int(per_row.sum())
            if n_tokens != feats.total:
                raise VisionGridError(
                    f"the input has {n_tokens} {what} placeholder tokens but the {what} inputs give "
                    f"{feats.total} {what} features"
                )
            if n_tokens:
                offsets = (per_row.cumsum(0) - per_row).tolist()  # first feature index of each row
                features[token_id] = (feats, offsets)
    if position_ids is None:
        plan = model.position_plan(
            input_ids,
            attention_mask,
            image_grid_thw,
            video_grid_thw,
            second_per_grid_ts,
            start=state.next_position,
            video_timestamps=video_timestamps,
        )
        next_position = plan.next_position
    elif next_position is None:
        raise ValueError("explicit position_ids need next_position too")
    else:
        plan = None
        position_ids = position_ids.to(device)
    return _run(
        model,
        state,
        input_ids,
        attention_mask,
        features,
        plan,
        position_ids,
        next_position,
        inputs_embeds,
        chunk_size,
        all_logits,
    )


def _run(
    model,
    state,
    input_ids,
    attention_mask,
    features,
    plan,
    position_ids,
    next_position,
    inputs_embeds,
    chunk_size,
    all_logits,
) -> Iterator[torch.Tensor | None]:
    T = input_ids.shape[1]
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        with torch.no_grad():  # not around the yield: grad mode is thread state and the caller runs in between
            if inputs_embeds is not None:
                embeds = inputs_embeds[:, s:e].to(model.device)
            else:
                embeds = _embed_chunk(model, input_ids[:, s:e], features)
            positions = plan.take(e - s) if plan is not None else position_ids[:, :, s:e]
            mask = attention_mask[:, s:e] if attention_mask is not None else None
            hidden, _ = model.language_model(embeds, positions, mask, state)
            if e == T:
                state.next_position.copy_(next_position)
            if all_logits:
                logits = model.lm_head(hidden)
            else:
                logits = model.lm_head(hidden[:, -1]) if e == T else None
        yield logits


def _embed_chunk(model, ids: torch.Tensor, features: dict) -> torch.Tensor:
    """Token embeddings of one chunk [B, n, d] with its share of vision features in place."""
    embeds = model.language_model.embed_tokens(ids)
    for token_id, (feats, offsets) in features.items():
        mask = ids == token_id
        for b, count in enumerate(mask.sum(1).tolist()):
            if count:
                embeds[b, mask[b]] = feats.take(offsets[b], count).to(embeds.dtype)
                offsets[b] += count
    return embeds


def prefill(
    model,
    state: InfiniteVLState,
    input_ids: torch.Tensor,
    attention_mask=None,
    *,
    return_all_logits: bool = False,
    **kwargs,
) -> torch.Tensor:
    """Run every step of `prefill_steps` (same arguments). Returns the logits of the last position [B, vocab], or
    with `return_all_logits` of every position [B, T, vocab] (T x vocab in memory: for tests and short inputs;
    consume `prefill_steps(..., all_logits=True)` chunk by chunk for long ones)."""
    out = []
    for logits in prefill_steps(model, state, input_ids, attention_mask, all_logits=return_all_logits, **kwargs):
        if logits is not None:
            out.append(logits)
    return torch.cat(out, dim=1) if return_all_logits else out[-1]
