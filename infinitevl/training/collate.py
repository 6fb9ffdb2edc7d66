"""Batches: right-padded rows, or several samples packed into each row with segment ids.

A padded batch has `attention_mask`; a packed batch has `segment_ids` (-1 on padding) and each sample keeps its own
positions, so that no attention, GDN memory or conv history crosses samples (see `TokenLayout`). Labels are aligned
with the inputs (the loss shifts them); the first token of every packed sample is never a target.
"""

from __future__ import annotations

import torch

from .data import IGNORE, Sample

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "position_ids",
    "segment_ids",
)


def _vision(samples: list[Sample]) -> dict:
    out: dict = {}
    images = [v for s in samples for v in s.images]
    videos = [v for s in samples for v in s.videos]
    if images:
        out["pixel_values"] = torch.cat([v.pixel_values for v in images])
        out["image_grid_thw"] = torch.cat([v.grid_thw for v in images])
    if videos:
        out["pixel_values_videos"] = torch.cat([v.pixel_values for v in videos])
        out["video_grid_thw"] = torch.cat([v.grid_thw for v in videos])
        out["second_per_grid_ts"] = torch.tensor([v.second_per_grid or 1.0 for v in videos])
    return out


def pad_batch(samples: list[Sample], pad_id: int) -> dict:
    """Right padding to the longest sample."""
    T = max(len(s) for s in samples)
    B = len(samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(3, B, T, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s)
        ids[b, :n] = torch.tensor(s.input_ids)
        labels[b, :n] = torch.tensor(s.labels)
        mask[b, :n] = 1
        pos[:, b, :n] = s.position_ids
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos, **_vision(samples)}


def pack_batch(samples: list[Sample], pad_id: int, max_length: int) -> dict:
    """Greedy first-fit packing of samples (in order) into rows of at most `max_length` tokens."""
    rows: list[list[Sample]] = []
    for s in samples:
        if len(s) > max_length:
            raise ValueError(f"a sample of {len(s)} tokens does not fit max_length {max_length}")
        for row in rows:
            if sum(len(x) for x in row) + len(s) <= max_length:
                row.append(s)
                break
        else:
            rows.append([s])
    T = max(sum(len(x) for x in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(3, B, T, dtype=torch.long)
    ordered: list[Sample] = []
    for b, row in enumerate(rows):
        t = 0
        for k, s in enumerate(row):
            n = len(s)
            ids[b, t : t + n] = torch.tensor(s.input_ids)
            labels[b, t : t + n] = torch.tensor(s.labels)
            labels[b, t] = IGNORE  # nothing predicts a sample's first token from the previous sample
            seg[b, t : t + n] = k
            pos[:, b, t : t + n] = s.position_ids
            t += n
            ordered.append(s)
    # vision inputs in token order: row by row, sample by sample
    return {"input_ids": ids, "labels": labels, "segment_ids": seg, "position_ids": pos, **_vision(ordered)}


def collate(samples: list[Sample], pad_id: int, pack: bool = False, max_length: int | None = None) -> dict:
    if pack:
        return pack_batch(samples, pad_id, max_length or max(len(s) for s in samples))
    return pad_batch(samples, pad_id)


def valid_mask(batch: dict) -> torch.Tensor:
    """[B, T] bool: real tokens (not padding)."""
    if "segment_ids" in batch:
        return batch["segment_ids"] >= 0
    return batch["attention_mask"].bool()


def model_inputs(batch: dict, exclude: tuple[str, ...] = ()) -> dict:
    """The entries of a batch that the model's forward takes (labels and bookkeeping left out)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch and k not in exclude}
