"""One-token decode steps, sampling, and generation as a token iterator (prefill in chunks is `prefill.py`, and is
importable from here too).

Everything works on an `InfiniteVLState`, so the cost of a decode step does not depend on how many tokens came
before it, and a prompt of any length is processed in chunks of bounded size with results equal to one full pass.
Batches are left-padded. This module holds no model code: it only drives `InfiniteVLForConditionalGeneration`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..state import InfiniteVLState
from .prefill import DEFAULT_CHUNK, prefill, prefill_steps  # noqa: F401 (part of this module's API)


@dataclass
class SamplingParams:
    """temperature 0 means greedy (and so does any temperature below GREEDY_BELOW); top_k 0, top_p 1 and min_p 0
    disable those filters."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def with_stops(self, token_ids) -> SamplingParams:
        """A copy that also stops at `token_ids` (e.g. the model's end-of-turn tokens)."""
        return SamplingParams(**{**self.__dict__, "stop_token_ids": tuple(set(self.stop_token_ids) | set(token_ids))})

    def validate(self) -> SamplingParams:
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1] (got {self.min_p})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@torch.no_grad()
def decode_step(model, state: InfiniteVLState, token_ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per stream ([B]) and return the next-token logits [B, vocab]. Work and memory are the same
    at any stream length."""
    token_ids = token_ids.to(model.device).view(-1, 1)
    B = token_ids.shape[0]
    positions = state.next_position.view(1, B, 1).expand(3, B, 1)
    hidden, _ = model.language_model(model.language_model.embed_tokens(token_ids), positions, None, state)
    state.next_position += 1
    return model.lm_head(hidden[:, -1])


@dataclass
class Sampler:
    """Turns logits into the next token; keeps its own RNG so that a seed reproduces a run."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.params.validate()
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def __call__(self, logits: torch.Tensor, history: list[list[int]] | None = None) -> torch.Tensor:
        """logits [B, V] -> token ids [B]; `history` (per row) feeds the repetition penalty. Any parameters that
        validate give a token: extreme ones (a temperature of 1e-300, a penalty that overflows the logits) never
        reach the multinomial as NaN or an all-zero row, and the most likely token always stays a candidate."""
        p = self.params
        logits = logits.float().clone()
        if p.repetition_penalty != 1.0 and history:
            for b, seen in enumerate(history):
                if seen:
                    idx = torch.tensor(sorted(set(seen)), device=logits.device)
                    vals = logits[b, idx]
                    logits[b, idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        logits = logits.nan_to_num(nan=float("-inf"))  # overflowed penalties become +-inf, never NaN
        if p.temperature < GREEDY_BELOW:
            return logits.argmax(-1)
        logits = logits / p.temperature
        if p.top_k:
            kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = _probabilities(logits)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # drop a token when the tokens ranked before it already cover top_p (the top one always stays)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            drop[..., 0] = False
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), 0.0)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(logits.device)


GREEDY_BELOW = 1e-5  # a smaller temperature samples the top token anyway (and 1/temperature would overflow)


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension that stays a distribution for any logits: +inf logits share the mass, and a
    row whose logits are all -inf (every token masked) falls back to its first token."""
    top = logits.amax(-1, keepdim=True)
    shifted = (logits - top.clamp(min=torch.finfo(logits.dtype).min)).exp()
    probs = torch.where(top.isposinf(), (logits == top).to(logits.dtype), shifted)
    probs = probs.nan_to_num(nan=0.0)
    empty = probs.sum(-1, keepdim=True) <= 0
    probs[..., :1] = torch.where(empty, 1.0, probs[..., :1])
    return probs / probs.sum(-1, keepdim=True)


class TokenGenerator:
    """Iterate new token ids one by one for a single stream (B = 1), starting from the prompt's last logits.

    Stops at `max_new_tokens`, a stop token (not yielded) or a stop string (needs `decode_text(ids) -> str`; the
    tokens completing it are not yielded). Afterwards `finish_reason` is "stop" or "length", `produced` holds
    every generated token (yielded or not) and `unfed` the ones not yet fed into the state: feed them to continue
    the stream with the answer in it."""

    def __init__(
        self,
        model,
        state: InfiniteVLState,
        first_logits: torch.Tensor,
        params: SamplingParams,
        decode_text=None,
        prompt_ids: list[int] | None = None,
    ):
        self.model, self.state, self.params = model, state, params
        self.sampler = Sampler(params)
        self.decode_text = decode_text
        self.history = list(prompt_ids or [])
        self.logits = first_logits
        self.produced: list[int] = []
        self.fed = 0
        self.finish_reason: str | None = None

    @property
    def unfed(self) -> list[int]:
        return self.produced[self.fed :]

    def __iter__(self) -> Iterator[int]:
        p = self.params
        held: list[int] = []  # tokens that might be the start of a stop string
        for _ in range(p.max_new_tokens):
            if self.produced and self.fed < len(self.produced):
                self.logits = decode_step(self.model, self.state, torch.tensor([self.produced[-1]]))
                self.fed = len(self.produced)
            token = int(self.sampler(self.logits, [self.history])[0])
            if token in p.stop_token_ids:
                self.finish_reason = "stop"
                return
            self.produced.append(token)
            self.history.append(token)
            if p.stop_strings and self.decode_text is not None:
                held.append(token)
                text = self.decode_text(self.produced)
                if any(s in text for s in p.stop_strings):
                    self.finish_reason = "stop"
                    return
                if held_back(text, p.stop_strings) == 0:
                    yield from held
                    held.clear()
            else:
                yield token
        self.finish_reason = "length"
        yield from held


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not safe to release yet: an unfinished UTF-8 character, or what may be the
    beginning of a stop string."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        held = max([held] + [k for k in range(1, len(s)) if text.endswith(s[:k])])
    return held


@torch.no_grad()
def greedy_generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    attention_mask=None,
    chunk_size: int = DEFAULT_CHUNK,
    stop_token_ids=None,
    **vision,
) -> torch.Tensor:
    """Greedy continuation of a batch of (left-padded) prompts: [B, max_new_tokens] (rows stop early at a stop
    token and are then padded with it)."""
    B = input_ids.shape[0]
    state = model.new_state(B)
    logits = prefill(model, state, input_ids, attention_mask, chunk_size=chunk_size, **vision)
    stops = set(model.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
    out, done = [], torch.zeros(B, dtype=torch.bool)
    for step in range(max_new_tokens):
        token = logits.argmax(-1).cpu()
        token = torch.where(done, out[-1] if out else token, token)
        out.append(token)
        done |= torch.tensor([int(t) in stops for t in token])
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        logits = decode_step(model, state, token)
    return torch.stack(out, dim=1) if out else input_ids.new_zeros(B, 0)
