"""One request's answers on the worker's side: sampling with the OpenAI adjustments, stops, log-probabilities, and
text released to the requester as it becomes safe to show.

A `Generation` is one request: its prompt is prefilled once (`prepare`), then its `n` choices each sample from a
branch of that state (a batch row of their own). Logit bias and the presence / frequency penalties adjust the
logits before the sampler (repetition penalty, temperature, top-k, top-p: `engine.generation.Sampler`); returned
log-probabilities are those of the model itself, before any adjustment (as vLLM reports them). The answer's text is
decoded incrementally (`TextStream`) and searched for stop strings incrementally (`StopMatcher`), so each token
costs the same however long the answer is. Events go to the requester's asyncio loop through a `GenerationHandle`. Not here: batching and scheduling (scheduler.py), HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream

from ..engine.generation import Sampler, SamplingParams
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
    """The requester's side of a generation: its events in order (on the requester's loop), and `cancel()`.

    `unread` counts the events posted and not yet taken: a streaming client that stops reading its socket stops
    taking them, which is how the scheduler sees it (and pauses, then drops, its answer)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.on_cancel: Callable[[], None] | None = None  # set by the scheduler: frees a queued place at once
        self._posted = 0  # written by the worker thread only
        self._taken = 0  # written by the requester's loop only

    @property
    def unread(self) -> int:
        return self._posted - self._taken

    def post(self, event: Event) -> None:
        """Called from the worker thread."""
        self._posted += 1
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next(self) -> Event:
        event = await self._events.get()
        self._taken += 1
        return event

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


class TextStream:
    """An answer's text, token by token, in work proportional to each token (not to the answer so far).

    With a `tokenizers` backend, `tokenizers.decoders.DecodeStream` turns each token into its new characters (none
    while a UTF-8 character is still incomplete); without one, the text is decoded again at every token. `rest()`
    at the end gives what the complete decode has beyond the pieces (an unfinished character's replacement)."""

    def __init__(self, decode_text: Callable[[list[int]], str], backend=None):
        self.decode_text, self.backend = decode_text, backend
        self.tokens: list[int] = []
        self.length = 0  # characters returned so far
        self._stream = DecodeStream(skip_special_tokens=True) if backend is not None else None
        self._complete = True  # every token so far ended on a character boundary

    def push(self, token: int) -> str:
        self.tokens.append(token)
        if self._stream is not None:
            piece = self._stream.step(self.backend, token)
            self._complete = piece is not None
            piece = piece or ""
        else:
            text = self.decode_text(self.tokens)
            text = text[: len(text) - (len(text) - len(text.rstrip("\ufffd")))]  # an unfinished character waits
            piece = text[self.length :]
        self.length += len(piece)
        return piece

    def rest(self) -> str:
        if self._stream is not None and self._complete:
            return ""
        full = self.decode_text(self.tokens)
        return full[self.length :] if len(full) > self.length else ""


def _failure(s: str) -> list[int]:
    """KMP: for each prefix s[:i+1], the length of its longest proper prefix that is also its suffix."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopMatcher:
    """Finds stop strings in text given piece by piece, in time linear in the text and the stops (one KMP automaton
    per stop), and says how many characters at the end may be the beginning of one (not safe to release yet)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self._fail = [_failure(s) for s in stops]
        self._state = [0] * len(stops)  # per stop: the length of its prefix that the text ends with
        self.fed = 0  # characters seen

    def feed(self, piece: str) -> int | None:
        """The position (in the whole text) where the earliest stop ending in `piece` begins, or None."""
        found = None
        for j, stop in enumerate(self.stops):
            k, fail = self._state[j], self._fail[j]
            for i, ch in enumerate(piece):
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    start = self.fed + i + 1 - k
                    found = start if found is None else min(found, start)
                    k = fail[k - 1]
            self._state[j] = k
        self.fed += len(piece)
        return found

    def held(self) -> int:
        return max(self._state, default=0)


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
        self.paused_since: float | None = None  # the scheduler's: when its client stopped reading
        self.text = TextStream(gen.decode_text, gen.backend)
        self.stops = StopMatcher(p.stop_strings)
        self._unreleased = ""  # text produced and not sent yet (what may begin a stop string)
        self._released = 0  # characters sent

    def accept(self, logits: torch.Tensor) -> None:
        """Sample the next token from logits [1, vocab]; either finish or set `next_token` to feed."""
        gen = self.gen
        raw = logits.float()
        adjusted = _adjust(raw, gen.adjust, self.counts)
        early = len(self.produced) < gen.min_tokens
        if early and gen.stop_token_ids and not gen.ignore_eos:
            adjusted = adjusted.clone()
            adjusted[0, list(gen.stop_token_ids)] = float("-inf")
        token = int(self.sampler(adjusted, [self.history])[0])
        if gen.top_logprobs is not None:
            self.pending_logprobs.append(token_info(raw[0], token, gen.top_logprobs))
        if token in gen.stop_token_ids and not gen.ignore_eos:
            return self._finish("stop", self._unreleased + self.text.rest())
        self.produced.append(token)
        self.history.append(token)
        self.counts[token] += 1
        piece = self.text.push(token)
        self._unreleased += piece
        hit = self.stops.feed(piece) if piece and self.stops.stops else None
        if hit is not None and not early:
            return self._finish("stop", self._unreleased[: hit - self._released])
        if len(self.produced) >= gen.params.max_new_tokens:
            return self._finish("length", self._unreleased + self.text.rest())
        safe = len(self._unreleased) - self.stops.held()
        if safe > 0:
            self._send(self._unreleased[:safe])
            self._unreleased = self._unreleased[safe:]
        self.next_token = token

    def cut(self, error: APIError) -> None:
        """End the answer early (the server is stopping, its client stopped reading, its request failed): what was
        released stays, then the error."""
        self.done = True
        self.gen.handle.post(Event("error", self.index, error=error))

    def _send(self, text: str) -> None:
        self.gen.handle.post(Event("text", self.index, text, logprobs=self.pending_logprobs))
        self._released += len(text)
        self.pending_logprobs = []

    def _finish(self, reason: str, text: str) -> None:
        if text or self.pending_logprobs:
            self._send(text)
        self._unreleased = ""
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
    backend: object | None = None  # the `tokenizers.Tokenizer` behind decode_text: incremental decoding
    min_tokens: int = 0  # no stop token or stop string ends the answer before this many tokens
    ignore_eos: bool = False  # the stop tokens are sampled like any other token
    request_id: str | None = None  # for errors and the log (the worker thread has no request context)
    failed: bool = False
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
