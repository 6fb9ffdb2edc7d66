"""One request's answers on the worker's side: sampling with the OpenAI adjustments, stops, log-probabilities, and
text released to the requester as it becomes safe to show.

A `Generation` is one request: its prompt is prefilled once (`prepare`), then its `n` choices each sample from a
branch of that state (a batch row of their own). Logit bias and the presence / frequency penalties adjust the
logits before the sampler (repetition penalty, temperature, top-k, top-p: `engine.generation.Sampler`); returned
log-probabilities are those of the model itself, before any adjustment (as vLLM reports them). Events go to the
requester's asyncio loop through a `GenerationHandle`. Not here: batching and scheduling (scheduler.py), HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..engine.generation import Sampler, SamplingParams, held_back
from .errors import APIError


@dataclass
class TokenInfo:
    """A token's log-probability and the most likely tokens at its position (ids; text is made by the responder)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    kind: str  # "started" | "text" | "done" | "error" | "cancelled"
    index: int = 0  # the choice
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenInfo] = field(default_factory=list)
    prompt_logprobs: list[TokenInfo | None] | None = None  # "started" of an echoed prompt: one per prompt token
    error: APIError | None = None


class GenerationHandle:
    """The requester's side of a generation: its events in order (on the requester's loop), and `cancel()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.on_cancel: Callable[[], None] | None = None  # set by the scheduler: frees a queued place at once

    def post(self, event: Event) -> None:
        """Called from the worker thread."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next(self) -> Event:
        return await self._events.get()

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel()


@dataclass
class Adjustments:
    """What a request changes in the logits before sampling (OpenAI's logit_bias and penalties)."""

    logit_bias: torch.Tensor | None = None  # [vocab]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class ChoiceState:
    """One of a request's `n` answers: its own sampler (seed + index), tokens, stop handling and released text."""

    def __init__(self, gen: Generation, index: int):
        self.gen, self.index = gen, index
        p = gen.params
        seed = None if p.seed is None else (p.seed + index) % 2**64
        self.sampler = Sampler(SamplingParams(**{**p.__dict__, "seed": seed}))
        self.history = list(gen.history)  # for the repetition penalty: prompt and answer
        self.counts: Counter[int] = Counter()  # for the presence and frequency penalties: the answer
        self.produced: list[int] = []
        self.pending_logprobs: list[TokenInfo] = []
        self.next_token: int | None = None
        self.done = False
        self._emitted = 0  # characters of the answer already sent

    def accept(self, logits: torch.Tensor) -> None:
        """Sample the next token from logits [1, vocab]; either finish or set `next_token` to feed."""
        gen = self.gen
        raw = logits.float()
        adjusted = _adjust(raw, gen.adjust, self.counts)
        token = int(self.sampler(adjusted, [self.history])[0])
        if gen.top_logprobs is not None:
            self.pending_logprobs.append(token_info(raw[0], token, gen.top_logprobs))
        if token in gen.stop_token_ids:
            return self._finish("stop", gen.decode_text(self.produced))
        self.produced.append(token)
        self.history.append(token)
        self.counts[token] += 1
        text = gen.decode_text(self.produced)
        stops = gen.params.stop_strings
        if stops:
            longest = max(len(s) for s in stops)
            hits = [i for i in (text.find(s, max(0, self._emitted - longest)) for s in stops) if i >= 0]
            if hits:
                return self._finish("stop", text[: min(hits)])
        if len(self.produced) >= gen.params.max_new_tokens:
            return self._finish("length", text)
        self._emit(text[: len(text) - held_back(text, stops)])
        self.next_token = token

    def cut(self, error: APIError) -> None:
        """End the answer early (the server is stopping): what was released stays, then the error."""
        self.done = True
        self.gen.handle.post(Event("error", self.index, error=error))

    def _emit(self, text: str) -> None:
        if len(text) > self._emitted:
            self.gen.handle.post(Event("text", self.index, text[self._emitted :], logprobs=self.pending_logprobs))
            self._emitted, self.pending_logprobs = len(text), []

    def _finish(self, reason: str, text: str) -> None:
        if len(text) > self._emitted or self.pending_logprobs:
            self.gen.handle.post(Event("text", self.index, text[self._emitted :], logprobs=self.pending_logprobs))
            self._emitted, self.pending_logprobs = len(text), []
        self.done = True
        self.gen.handle.post(
            Event(
                "done",
                self.index,
                finish_reason=reason,
                prompt_tokens=self.gen.prompt_tokens,
                completion_tokens=len(self.produced),
            )
        )


@dataclass
class Generation:
    """The worker's side of one request.

    `prepare(row)` fills a one-row state view with the prompt: it returns the last logits [1, vocab], or a generator
    that runs one prefill chunk per `next()` and returns them (then the scheduler decodes other requests between
    chunks). With `echo_logprobs` its result is `(logits, prompt_logprobs)`."""

    handle: GenerationHandle
    prepare: Callable
    params: SamplingParams
    decode_text: Callable[[list[int]], str]
    stop_token_ids: frozenset[int]
    n: int = 1
    adjust: Adjustments = field(default_factory=Adjustments)
    top_logprobs: int | None = None  # None: no log-probabilities; k: the token's own and the k most likely
    echo_logprobs: bool = False
    history: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    choices: list[ChoiceState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params.validate()
        self.choices = [ChoiceState(self, i) for i in range(self.n)]

    def score_only(self) -> bool:
        """max_tokens 0 (completions): the prompt's log-probabilities are the whole answer."""
        return self.params.max_new_tokens == 0

    def finish_unsampled(self) -> None:
        for c in self.choices:
            c._finish("length", "")


def _adjust(logits: torch.Tensor, adjust: Adjustments, counts: Counter[int]) -> torch.Tensor:
    if adjust.logit_bias is not None:
        logits = logits + adjust.logit_bias.to(logits.device)
    if counts and (adjust.presence_penalty or adjust.frequency_penalty):
        ids = torch.tensor(list(counts), device=logits.device)
        n = torch.tensor([counts[i] for i in counts], dtype=logits.dtype, device=logits.device)
        logits = logits.clone()
        logits[0, ids] -= n * adjust.frequency_penalty + adjust.presence_penalty
    return logits


def token_info(logits: torch.Tensor, token: int, k: int) -> TokenInfo:
    """logits [vocab] -> the log-probability of `token` and the `k` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if k:
        values, ids = logp.topk(min(k, logp.shape[-1]))
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenInfo(token, float(logp[token]), top)
