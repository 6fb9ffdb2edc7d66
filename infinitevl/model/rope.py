"""Multimodal RoPE: the (temporal, height, width) position of every token, and the rotation of q and k.

Text tokens get three equal indices from a running counter; a vision block starting at counter s gets
t = s + (its temporal offset), h = s + row, w = s + col on the merged grid (images: t = s). In a stream the counter
simply continues across chunks (`start`), which is what the state carries.

Two conventions exist for videos (config `rope_index_mode`):
  official      the released checkpoints' code: seconds-per-grid truncated to an integer before multiplying (0.5 s
                -> all frames share t), text after a block resumes at max(position) + 1.
  transformers  transformers >= 5: seconds-per-grid kept fractional, text resumes at s + max(h, w).

Live frames (a session's `append_frame`, and training samples written as `{"frames", "interval"}`, which imitate
them) are placed by their timestamps in both modes: frame i of a block gets the temporal offset
floor((timestamp_i - timestamp_0) * tokens_per_second) (`live_frame_offset`), never decreasing, and text after the
block resumes at max(position) + 1. The official truncation would put every frame of a stream sampled faster than
one per second at one temporal position forever, and resuming at s + max(h, w) would number a question before the
frames it follows; a stream has no whole-video length to number against.

Positions are produced a slice at a time (`PositionPlan.take`), so an input of any length is numbered in pieces of
bounded size; `rope_index` is the whole-input form. Angles are computed in fp64 (`rope_cos_sin`): in fp32,
position * inv_freq loses the angle's low bits (a cos error of 0.06 at position 1M, identical encodings for p and
p + 1 from 2^24).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class VisionGridError(ValueError):
    """Vision placeholder tokens and grids (image_grid_thw / video_grid_thw) disagree."""


def live_frame_offset(timestamp: float, first_timestamp: float, tokens_per_second: float) -> int:
    """The temporal offset of a live frame within its block: floor((timestamp - first) * tokens_per_second).
    The one rule for live sessions and for training samples made of timed frames."""
    # 1e-9 absorbs the rounding of timestamps such as i * 0.1, so that an exact product is not floored below itself
    return math.floor((float(timestamp) - float(first_timestamp)) * float(tokens_per_second) + 1e-9)


def live_frame_offsets(timestamps: Sequence[float], tokens_per_second: float) -> list[int]:
    """Offsets of a block of live frames (non-decreasing, as a session enforces)."""
    out, last = [], 0
    for ts in timestamps:
        last = max(last, live_frame_offset(ts, timestamps[0], tokens_per_second))
        out.append(last)
    return out


@dataclass
class _Piece:
    """A run of tokens of one row: text (grid None) or one vision block, starting at running index `start`."""

    length: int
    start: int
    grid: tuple[int, int, int] | None = None  # merged (t, h, w)
    t_offsets: torch.Tensor | None = None  # [t] temporal offset of each grid step

    def positions(self, lo: int, hi: int, device) -> torch.Tensor:
        """[3, hi - lo] positions of the piece's tokens lo..hi-1."""
        j = torch.arange(lo, hi, device=device)
        if self.grid is None:
            return (j + self.start).expand(3, -1)
        _, lh, lw = self.grid
        t = self.t_offsets.to(device)[j // (lh * lw)]
        return torch.stack([t, (j // lw) % lh, j % lw]) + self.start


class PositionPlan:
    """The multimodal positions of a [B, T] input, handed out in order a slice of columns at a time.

    Construction validates the vision grids against the placeholders (raising `VisionGridError`) and knows the next
    running index of every row (`next_position`, [B]) without building the [3, B, T] positions; `take(n)` returns
    the next n columns' positions [3, B, n] (padding gets 0). Grids are consumed in order across the batch, as in
    Qwen2.5-VL. `start` [B] continues a stream. `video_timestamps` gives, per video, the timestamps of its temporal
    steps when it is made of live frames (placed by `live_frame_offsets`), or None for a video file."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        *,
        image_token_id: int,
        video_token_id: int,
        spatial_merge_size: int,
        tokens_per_second: float,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
        video_timestamps: Sequence[Sequence[float] | None] | None = None,
        attention_mask: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
        mode: str = "official",
    ):
        B, T = input_ids.shape
        self.device = input_ids.device
        self.attention_mask = attention_mask
        self.shape = (B, T)
        grids = {1: _rows(image_grid_thw), 2: _rows(video_grid_thw)}
        n_videos = len(grids[2])
        seconds = [1.0] * n_videos if second_per_grid_ts is None else [float(s) for s in second_per_grid_ts]
        if len(seconds) < n_videos:
            raise VisionGridError(f"{n_videos} videos but only {len(seconds)} second_per_grid_ts values")
        stamps = list(video_timestamps) if video_timestamps is not None else [None] * n_videos
        stamps += [None] * (n_videos - len(stamps))
        self._used = {1: 0, 2: 0}
        kinds_all = (input_ids == image_token_id).long() + 2 * (input_ids == video_token_id).long()
        starts = start.tolist() if start is not None else [0] * B
        self.rows: list[list[_Piece]] = []
        next_position = []
        for b in range(B):
            kinds = kinds_all[b] if attention_mask is None else kinds_all[b][attention_mask[b].bool()]
            cur = int(starts[b])
            pieces: list[_Piece] = []
            for s, e, kind in _runs(kinds):
                if kind == 0:
                    pieces.append(_Piece(e - s, cur))
                    cur += e - s
                    continue
                covered = 0
                while covered < e - s:
                    piece = self._vision_piece(
                        kind,
                        grids,
                        seconds,
                        stamps,
                        e - s - covered,
                        covered,
                        cur,
                        spatial_merge_size,
                        tokens_per_second,
                        mode,
                    )
                    pieces.append(piece)
                    lt, lh, lw = piece.grid
                    top = max(int(piece.t_offsets.max()), lh - 1, lw - 1)
                    live = kind == 2 and stamps[self._used[2] - 1] is not None
                    cur = cur + top + 1 if mode == "official" or live else cur + max(lh, lw)
                    covered += piece.length
            self.rows.append(pieces)
            next_position.append(cur)
        for kind, what in ((1, "image"), (2, "video")):
            if self._used[kind] != len(grids[kind]):
                raise VisionGridError(
                    f"{len(grids[kind])} {what} grids were given but the input has placeholders for {self._used[kind]}"
                )
        self.next_position = torch.tensor(next_position, dtype=torch.long, device=self.device)
        self._cursor = [(0, 0)] * B  # per row: (piece index, tokens of that piece already handed out)
        self._column = 0

    def _vision_piece(self, kind, grids, seconds, stamps, left, covered, cur, merge, tokens_per_second, mode):
        what = "image" if kind == 1 else "video"
        index = self._used[kind]
        if index >= len(grids[kind]):
            raise VisionGridError(
                f"the input has {left + covered} {what} placeholder tokens in a row but the {len(grids[kind])} "
                f"{what}_grid_thw rows given leave {left} of them without a grid (grids cover {covered})"
            )
        t, h, w = grids[kind][index]
        lt, lh, lw = t, h // merge, w // merge
        count = lt * lh * lw
        if count > left:
            raise VisionGridError(
                f"{what} {index}: the prompt has {left} {what} placeholder tokens where its grid {(t, h, w)} "
                f"needs {count} ({t} x {lh} x {lw} merged patches)"
            )
        if kind == 2 and stamps[index] is not None:
            if len(stamps[index]) != lt:
                raise VisionGridError(f"video {index} has {lt} temporal steps but {len(stamps[index])} timestamps")
            offsets = torch.tensor(live_frame_offsets(stamps[index], tokens_per_second), dtype=torch.long)
        else:
            if kind == 1:
                step = 1.0 if mode == "transformers" else 0.0
            elif mode == "official":
                step = float(int(seconds[index])) * tokens_per_second
            else:
                step = float(torch.tensor(seconds[index], dtype=torch.float32) * tokens_per_second)
            # float32, as both reference implementations compute it (exact for the official integer steps)
            offsets = (torch.arange(lt) * torch.tensor(step, dtype=torch.float32)).long()
        self._used[kind] += 1
        return _Piece(count, cur, (lt, lh, lw), offsets)

    def take(self, n: int) -> torch.Tensor:
        """Positions [3, B, n] of the next n columns."""
        B, T = self.shape
        s, e = self._column, min(self._column + n, T)
        out = torch.zeros(3, B, e - s, dtype=torch.long, device=self.device)
        for b in range(B):
            if self.attention_mask is None:
                cols, k = None, e - s
            else:
                cols = self.attention_mask[b, s:e].bool()
                k = int(cols.sum())
            parts = []
            index, done = self._cursor[b]
            while k > 0:
                piece = self.rows[b][index]
                m = min(k, piece.length - done)
                parts.append(piece.positions(done, done + m, self.device))
                k -= m
                done += m
                if done == piece.length:
                    index, done = index + 1, 0
            self._cursor[b] = (index, done)
            if parts:
                pos = torch.cat(parts, dim=1)
                if cols is None:
                    out[:, b] = pos
                else:
                    out[:, b, cols] = pos
        self._column = e
        return out


def config_args(config) -> dict:
    """The arguments of `PositionPlan` / `rope_index` that a model config fixes (an `InfiniteVLConfig`)."""
    return dict(
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        spatial_merge_size=config.vision.spatial_merge_size,
        tokens_per_second=config.vision.tokens_per_second,
        mode=config.rope_index_mode,
    )


def rope_index(input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [3, B, T] of a whole input (padding gets 0) and the next running index per row [B]; the arguments
    are `PositionPlan`'s."""
    plan = PositionPlan(input_ids, **kwargs)
    return plan.take(input_ids.shape[1]), plan.next_position


def _rows(grid: torch.Tensor | None) -> list[tuple[int, int, int]]:
    return [] if grid is None else [tuple(int(x) for x in row) for row in grid.tolist()]


def _runs(kinds: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values of a 1-D tensor: (start, end, value), found without a Python loop over tokens."""
    if kinds.numel() == 0:
        return []
    cuts = ((kinds[1:] != kinds[:-1]).nonzero().squeeze(1) + 1).tolist()
    bounds = [0, *cuts, kinds.numel()]
    values = kinds[bounds[:-1]].tolist()
    return list(zip(bounds[:-1], bounds[1:], values))


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] from positions [3, B, T]: frequency section c takes stream c % 3 (twice over).

    The inverse frequencies are the fp32 values the checkpoints were trained with; the angles position * inv_freq
    and their cos/sin are computed in fp64, then cast, so that they stay exact at any stream position."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    freqs = positions.double().unsqueeze(-1) * inv_freq.double()  # [3, B, T, hd/2]
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
