"""One worker thread owns the model; every request that runs it goes through this scheduler.

Jobs wait in one bounded FIFO queue (submitting to a full queue raises a 429 `APIError`). A job is either a task
(any callable, e.g. appending frames to a session) or a generation. A generation is admitted when a batch row is
free: its prompt is prefilled straight into that row of a pooled state of `max_batch` rows, and from then on all
active generations advance together, one batched `decode_step` per scheduler step. Every active request gets one
token per step (round robin by construction) and B streams cost little more than one, because the per-stream state
has a fixed size. Rows stay contiguous: a finished or cancelled generation's row is overwritten by the last active
row. Each step runs at most one queued job before decoding, so neither a queue of frames or long prompts nor a full
batch of decodes starves the other.

Generations report to the requester's asyncio loop as `Event`s: "started", text pieces, then "done" (or "error" /
"cancelled"). A requester that goes away calls `GenerationHandle.cancel()` and its row is freed at the next step.
Not here: HTTP, media decoding, sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..engine.generation import Sampler, SamplingParams, decode_step, held_back
from ..state import AttentionLayerState, InfiniteVLState, LinearLayerState
from .errors import APIError

log = logging.getLogger("infinitevl.serving")


def rows(state: InfiniteVLState, start: int, stop: int) -> InfiniteVLState:
    """A view of batch rows [start, stop) of `state`: the model updates it in place, and so the pooled state."""
    layers: list[LinearLayerState | AttentionLayerState] = []
    for layer in state.layers:
        fields = {k: v[start:stop] for k, v in layer.tensors().items()}
        if isinstance(layer, AttentionLayerState):
            layers.append(AttentionLayerState(**fields, window=layer.window))
        else:
            layers.append(LinearLayerState(**fields))
    return InfiniteVLState(layers, state.next_position[start:stop], state.num_tokens[start:stop], state.fingerprint)


@dataclass
class Event:
    kind: str  # "started" | "text" | "done" | "error" | "cancelled"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: APIError | None = None


class GenerationHandle:
    """The requester's side of a generation: its events in order (on the requester's loop), and `cancel()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False

    def post(self, event: Event) -> None:
        """Called from the worker thread."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next(self) -> Event:
        return await self._events.get()

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Generation:
    """The worker's side of one request: prefill, sampling, stop handling, and text released as it is safe.

    `prepare(row)` fills a one-row state view with the prompt and returns the last logits [1, vocab]."""

    handle: GenerationHandle
    prepare: Callable[[InfiniteVLState], torch.Tensor]
    params: SamplingParams
    decode_text: Callable[[list[int]], str]
    stop_token_ids: frozenset[int]
    logit_bias: torch.Tensor | None = None  # [vocab]
    history: list[int] = field(default_factory=list)  # for the repetition penalty
    produced: list[int] = field(default_factory=list)
    next_token: int | None = None
    prompt_tokens: int = 0
    done: bool = False
    _emitted: int = 0  # characters of the answer already sent

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)  # validates the parameters

    def accept(self, logits: torch.Tensor) -> None:
        """Sample the next token from logits [1, vocab]; either finish or set `next_token` to feed."""
        if self.logit_bias is not None:
            logits = logits.float() + self.logit_bias.to(logits.device)
        token = int(self.sampler(logits, [self.history])[0])
        if token in self.stop_token_ids:
            return self._finish("stop", self.decode_text(self.produced))
        self.produced.append(token)
        self.history.append(token)
        text = self.decode_text(self.produced)
        stops = self.params.stop_strings
        if stops:
            longest = max(len(s) for s in stops)
            hits = [i for i in (text.find(s, max(0, self._emitted - longest)) for s in stops) if i >= 0]
            if hits:
                return self._finish("stop", text[: min(hits)])
        if len(self.produced) >= self.params.max_new_tokens:
            return self._finish("length", text)
        self._emit(text[: len(text) - held_back(text, stops)])
        self.next_token = token

    def _emit(self, text: str) -> None:
        if len(text) > self._emitted:
            self.handle.post(Event("text", text[self._emitted :]))
            self._emitted = len(text)

    def _finish(self, reason: str, text: str) -> None:
        self._emit(text)
        self.done = True
        self.handle.post(
            Event("done", finish_reason=reason, prompt_tokens=self.prompt_tokens, completion_tokens=len(self.produced))
        )


@dataclass
class _Task:
    fn: Callable[[], object]
    future: Future


class Scheduler:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64):
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.pool = model.new_state(max_batch)  # [max_batch] rows; rows [0, len(active)) are in use
        self._pending: deque[_Task | Generation] = deque()
        self._active: list[Generation] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counters = dict(decode_steps=0, decoded_tokens=0, completed=0, cancelled=0, rejected=0)

    # -- requester side ----------------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="infinitevl-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, then fail everything still queued or running with 503."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit_task(self, fn: Callable[[], object], internal: bool = False) -> Future:
        """Run `fn()` on the worker thread; `internal` work (the idle-session sweep) bypasses the queue limit."""
        task = _Task(fn, Future())
        self._enqueue(task, internal)
        return task.future

    async def run(self, fn: Callable[[], object]):
        """Await `fn()` run on the worker thread."""
        return await asyncio.wrap_future(self.submit_task(fn))

    def submit_generation(self, generation: Generation) -> None:
        self._enqueue(generation, internal=False)

    def _enqueue(self, job: _Task | Generation, internal: bool) -> None:
        with self._cv:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if not internal and len(self._pending) >= self.max_queue:
                self.counters["rejected"] += 1
                raise APIError(
                    429,
                    f"the server is busy: {len(self._pending)} requests are already waiting (the limit is "
                    f"{self.max_queue}); retry later",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            self._pending.append(job)
            self._cv.notify()

    # -- worker side ---------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # per thread
        while True:
            with self._cv:
                while not (self._stopping or self._pending or self._active):
                    self._cv.wait()
                if self._stopping:
                    break
                job = self._take_job()
            if isinstance(job, _Task):
                self._run_task(job)
            elif job is not None:
                self._admit(job)
            if self._active:
                self._step()
        self._fail_all(APIError(503, "the server is shutting down", code="shutting_down"))

    def _take_job(self) -> _Task | Generation | None:
        """The oldest job that can run now: any task, a generation only while a batch row is free."""
        for i, job in enumerate(self._pending):
            if isinstance(job, _Task) or len(self._active) < self.max_batch:
                del self._pending[i]
                return job
        return None

    def _run_task(self, task: _Task) -> None:
        if not task.future.set_running_or_notify_cancel():
            return
        try:
            task.future.set_result(task.fn())
        except BaseException as err:  # handed to the requester
            task.future.set_exception(err)

    def _admit(self, gen: Generation) -> None:
        if gen.handle.cancelled:
            self._retired(gen)
            return
        row = rows(self.pool, len(self._active), len(self._active) + 1)
        try:
            logits = gen.prepare(row)
            gen.prompt_tokens = int(row.num_tokens[0])
            gen.handle.post(Event("started", prompt_tokens=gen.prompt_tokens))
            gen.accept(logits)
        except Exception as err:
            gen.done = True
            gen.handle.post(Event("error", error=_as_api_error(err)))
            return
        if gen.done:
            self.counters["completed"] += 1
        else:
            self._active.append(gen)

    def _step(self) -> None:
        """One batched decode step over every active generation, then retire the finished and cancelled."""
        n = len(self._active)
        try:
            tokens = torch.tensor([g.next_token for g in self._active])
            logits = decode_step(self.model, rows(self.pool, 0, n), tokens)  # [n, vocab]
            self.counters["decode_steps"] += 1
            self.counters["decoded_tokens"] += n
            for i, gen in enumerate(self._active):
                if not gen.handle.cancelled:
                    gen.accept(logits[i : i + 1])
        except Exception as err:
            log.exception("decode step failed")
            self._fail_active(_as_api_error(err))
            return
        for i in reversed(range(n)):
            gen = self._active[i]
            if gen.done or gen.handle.cancelled:
                last = len(self._active) - 1
                if i != last:
                    rows(self.pool, i, i + 1).copy_(rows(self.pool, last, last + 1))
                    self._active[i] = self._active[last]
                self._active.pop()
                self._retired(gen)

    def _retired(self, gen: Generation) -> None:
        if gen.done:
            self.counters["completed"] += 1
        else:
            self.counters["cancelled"] += 1
            gen.handle.post(Event("cancelled", prompt_tokens=gen.prompt_tokens, completion_tokens=len(gen.produced)))

    def _fail_active(self, err: APIError) -> None:
        for gen in self._active:
            gen.handle.post(Event("error", error=err))
        self._active.clear()

    def _fail_all(self, err: APIError) -> None:
        self._fail_active(err)
        with self._cv:
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            if isinstance(job, _Task):
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(err)
            else:
                job.handle.post(Event("error", error=err))


def _as_api_error(err: Exception) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, ValueError):  # media, state and parameter problems the engine reports
        return APIError(400, str(err), code="invalid_request")
    log.error("generation failed", exc_info=err)
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", code="internal_error")
