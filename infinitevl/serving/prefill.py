"""Prefill one chunk at a time, so that the scheduler can run a batched decode step between two chunks.

`prompt_steps` is a generator: each `next()` prefills at most `chunk` tokens of the prompt into a one-row state and
its return value (`StopIteration.value`) is the last position's logits [1, vocab]. The embeddings and RoPE positions
of the whole prompt are computed once, first (a vision block may straddle chunks), then every chunk goes through
`engine.generation.prefill` with its slice of them, which gives the same state as one call. With `top_logprobs`
it also scores the prompt: for each token after the first, its log-probability and the most likely tokens there
(what `echo` with `logprobs` returns), from the logits of one chunk at a time. Not here: the model itself.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from ..engine.generation import prefill
from ..state import InfiniteVLState
from .sampling import TokenInfo, token_info


@torch.no_grad()
def prompt_steps(
    model,
    row: InfiniteVLState,
    inputs: dict,
    chunk: int,
    engine_chunk: int,
    top_logprobs: int | None = None,
) -> Generator[None, None, torch.Tensor | tuple[torch.Tensor, list[TokenInfo | None]]]:
    """Prefill `inputs` (`Prompt.model_inputs()`: input_ids [1, T] and vision tensors) into `row`."""
    ids = inputs["input_ids"].to(model.device)
    embeds = model.embed(
        ids,
        inputs.get("pixel_values"),
        inputs.get("image_grid_thw"),
        inputs.get("pixel_values_videos"),
        inputs.get("video_grid_thw"),
        None,
        None,
    )
    positions, next_position = model.rope_index(
        ids,
        None,
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        inputs.get("second_per_grid_ts"),
        start=row.next_position,
    )
    T = ids.shape[1]
    scores: list[TokenInfo | None] = [None]
    last = None
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        out = prefill(
            model,
            row,
            ids[:, s:e],
            position_ids=positions[:, :, s:e],
            next_position=next_position,
            inputs_embeds=embeds[:, s:e],
            chunk_size=engine_chunk,
            return_all_logits=top_logprobs is not None,
        )
        if top_logprobs is None:
            last = out
        else:
            logits = out[0]  # [c, vocab]: position s + j predicts token s + j + 1
            for j in range(e - s):
                if s + j + 1 < T:
                    scores.append(token_info(logits[j], int(ids[0, s + j + 1]), top_logprobs))
            last = logits[-1:]
        if e < T:
            yield
    if top_logprobs is None:
        return last
    return last, scores


def text_steps(
    model, row: InfiniteVLState, ids: list[int], chunk: int, engine_chunk: int
) -> Generator[None, None, torch.Tensor]:
    """Prefill plain token ids into `row` (e.g. a question after a session's state), `chunk` tokens per step."""
    return prompt_steps(model, row, {"input_ids": torch.tensor([ids])}, chunk, engine_chunk)
