"""Multimodal RoPE: the (temporal, height, width) position of every token, and the rotation of q and k.

Text tokens get three equal indices from a running counter; a vision block starting at counter s gets
t = s + floor(frame * seconds_per_grid * tokens_per_second), h = s + row, w = s + col on the merged grid (images:
t = s). In a stream the counter simply continues across chunks (`start`), which is what the state carries.

Two conventions exist (config `rope_index_mode`):
  official      the released checkpoints' code: seconds-per-grid truncated to an integer before multiplying (0.5 s
                -> all frames share t), text after a block resumes at max(position) + 1.
  transformers  transformers >= 5: seconds-per-grid kept fractional, text resumes at s + max(h, w).
"""

from __future__ import annotations

import torch


class VisionGridError(ValueError):
    """Vision placeholder tokens and grids (image_grid_thw / video_grid_thw) disagree."""


def rope_index(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | list[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
    mode: str = "official",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [3, B, T] (padding gets 0) and the next running index per row [B].

    Grids are consumed in order across the batch, as in Qwen2.5-VL. `start` [B] continues a stream.
    """
    B, T = input_ids.shape
    device = input_ids.device
    positions = torch.zeros(3, B, T, dtype=torch.long, device=device)
    next_position = torch.zeros(B, dtype=torch.long, device=device)
    grids = {1: _rows(image_grid_thw), 2: _rows(video_grid_thw)}
    used = {1: 0, 2: 0}
    seconds = [1.0] * len(grids[2]) if second_per_grid_ts is None else [float(s) for s in second_per_grid_ts]
    if len(seconds) < len(grids[2]):
        raise VisionGridError(f"{len(grids[2])} videos but only {len(seconds)} second_per_grid_ts values")
    kinds_all = (input_ids == image_token_id).long() + 2 * (input_ids == video_token_id).long()
    starts = start.tolist() if start is not None else [0] * B
    for b in range(B):
        real = torch.arange(T, device=device) if attention_mask is None else attention_mask[b].nonzero().squeeze(1)
        kinds = kinds_all[b, real]
        cur = int(starts[b])
        pieces = []
        for s, e, kind in _runs(kinds.tolist()):
            if kind == 0:
                pieces.append(torch.arange(cur, cur + e - s, device=device).expand(3, -1))
                cur += e - s
                continue
            covered = 0
            while covered < e - s:
                if used[kind] >= len(grids[kind]):
                    what = "image" if kind == 1 else "video"
                    raise VisionGridError(
                        f"the input has {e - s} {what} placeholder tokens in a row but the "
                        f"{len(grids[kind])} {what}_grid_thw rows given leave {e - s - covered} "
                        f"of them without a grid (grids cover {covered})"
                    )
                t, h, w = grids[kind][used[kind]]
                lt, lh, lw = t, h // spatial_merge_size, w // spatial_merge_size
                count = lt * lh * lw
                if covered + count > e - s:
                    what = "image" if kind == 1 else "video"
                    raise VisionGridError(
                        f"{what} {used[kind]}: the prompt has {e - s - covered} {what} placeholder tokens where its "
                        f"grid {(t, h, w)} needs {count} ({t} x {lh} x {lw} merged patches)"
                    )
                step = (
                    0.0
                    if kind == 1
                    else float(torch.tensor(seconds[used[kind]], dtype=torch.float32) * tokens_per_second)
                )
                if kind == 2 and mode == "official":
                    step = float(int(seconds[used[kind]])) * tokens_per_second
                if kind == 1 and mode == "transformers":
                    step = 1.0
                block = _block_positions(lt, lh, lw, step, cur, device)
                pieces.append(block)
                cur = int(block.max()) + 1 if mode == "official" else cur + max(lh, lw)
                used[kind] += 1
                covered += count
        if pieces:
            positions[:, b, real] = torch.cat(pieces, dim=1)
        next_position[b] = cur
    for kind, what in ((1, "image"), (2, "video")):
        if used[kind] != len(grids[kind]):
            raise VisionGridError(
                f"{len(grids[kind])} {what} grids were given but the input has placeholders for {used[kind]}"
            )
    return positions, next_position


def _rows(grid: torch.Tensor | None) -> list[tuple[int, int, int]]:
    return [] if grid is None else [tuple(int(x) for x in row) for row in grid.tolist()]


def _runs(kinds: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values: (start, end, value)."""
    out, s = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[s]:
            out.append((s, i, kinds[s]))
            s = i
    return out


def _block_positions(lt: int, lh: int, lw: int, step: float, start: int, device) -> torch.Tensor:
    # float32, as both reference implementations compute it (exact for the official integer steps)
    t = (torch.arange(lt, device=device) * torch.tensor(step, dtype=torch.float32, device=device)).long()
    tt = t.view(-1, 1, 1).expand(lt, lh, lw)
    hh = torch.arange(lh, device=device).view(1, -1, 1).expand(lt, lh, lw)
    ww = torch.arange(lw, device=device).view(1, 1, -1).expand(lt, lh, lw)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] from positions [3, B, T]: frequency section c takes stream c % 3 (twice over)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [3, B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [3, B, T, hd]
    sections = emb.split(list(mrope_section) * 2, dim=-1)
    picked = torch.cat([sec[i % 3] for i, sec in enumerate(sections)], dim=-1)  # [B, T, hd]
    return picked.cos().to(dtype), picked.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by cos, sin [B, T, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin
