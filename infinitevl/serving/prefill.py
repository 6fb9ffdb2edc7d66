"""Prompts prefilled one chunk per scheduler step, so that the batched decode steps go on between two chunks.

`prompt_steps` wraps the engine's `prefill_steps` (each chunk embedded on its own, the vision tower run per block
when a chunk first reaches it) as a generator for the scheduler: each `next()` runs one chunk into a one-row state,
and its return value (`StopIteration.value`) is the last position's logits [1, vocab]. With `top_logprobs` it also
scores the prompt, from each chunk's logits in turn: for every token after the first, its log-probability and the
most likely tokens there (what `echo` with `logprobs` returns). Not here: the model itself.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from ..engine.prefill import prefill_steps
from ..state import InfiniteVLState
from .sampling import TokenInfo, token_info


def prompt_steps(
    model, row: InfiniteVLState, inputs: dict, chunk: int, top_logprobs: int | None = None
) -> Generator[None, None, torch.Tensor | tuple[torch.Tensor, list[TokenInfo | None]]]:
    """Prefill `inputs` (`Prompt.model_inputs()`: input_ids [1, T] and the vision tensors) into `row`. The inputs
    are checked when this is called (a `ValueError` then), the state changes from the first `next()` on."""
    ids = inputs["input_ids"]
    vision = {k: v for k, v in inputs.items() if k != "input_ids"}
    steps = prefill_steps(model, row, ids, chunk_size=chunk, all_logits=top_logprobs is not None, **vision)
    return _drive(steps, ids, top_logprobs)


def _drive(steps, ids: torch.Tensor, top_logprobs: int | None):
    T = ids.shape[1]
    scores: list[TokenInfo | None] = [None]
    done, last = 0, None
    for out in steps:
        if top_logprobs is None:
            last = out  # None until the last chunk
        else:
            logits = out[0]  # [n, vocab]: position done + j predicts token done + j + 1
            for j in range(logits.shape[0]):
                if done + j + 1 < T:
                    scores.append(token_info(logits[j], int(ids[0, done + j + 1]), top_logprobs))
            done += logits.shape[0]
            last = logits[-1:]
        yield
    return last if top_logprobs is None else (last, scores)


def text_steps(model, row: InfiniteVLState, ids: list[int], chunk: int) -> Generator[None, None, torch.Tensor]:
    """Prefill plain token ids into `row` (e.g. a question after a session's state), `chunk` tokens per step."""
    return prompt_steps(model, row, {"input_ids": torch.tensor([ids])}, chunk)
