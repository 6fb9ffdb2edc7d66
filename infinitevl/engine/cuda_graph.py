"""Decode steps replayed from a CUDA graph: `decode_step` recorded once on a state's own buffers, then replayed as
one launch per token instead of about a thousand small kernel launches (a 4B step is launch-bound in eager mode).

The state is the graph's memory: every replay updates its tensors in place (they never move), so a graph recorded
on one state serves that state only. The token goes in through a static input buffer and the logits come out in a
static output buffer that the next replay overwrites (copy them to keep them). Nothing in a decode step reads
device values on the host while a graph records (`state.graph_capturing`): the sliding-window ring is read whole,
its empty slots masked, and written at `position % capacity`. Replayed and eager steps agree up to the summation
order over the ring's empty slots; `infinitevl.bench.gpu` checks it. CUDA only; one token per stream per step.
"""

from __future__ import annotations

import torch

from ..state import InfiniteVLState
from .generation import decode_step


class GraphedDecoder:
    """`decoder(token_ids [B]) -> logits [B, vocab]`, the same as `decode_step(model, state, token_ids)`."""

    def __init__(self, model, state: InfiniteVLState, warmup: int = 3):
        if state.device.type != "cuda" or model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model and the state on a CUDA device (got {state.device})")
        self.model, self.state = model, state
        self.tokens = torch.zeros(state.batch_size, dtype=torch.long, device=state.device)
        saved = state.clone()
        # warm-up on a side stream (library handles, allocator pools) as torch.cuda.graphs asks; then the state is
        # put back exactly as it was, since recording does not run the kernels
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                decode_step(model, state, self.tokens)
        torch.cuda.current_stream().wait_stream(side)
        state.copy_(saved)
        del saved
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_step(model, state, self.tokens)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(token_ids.reshape(-1), non_blocking=True)
        self.graph.replay()
        return self.logits
