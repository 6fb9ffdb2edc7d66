"""One worker thread owns the model; every request that runs it goes through this scheduler.

Jobs wait in one bounded FIFO queue (submitting to a full queue raises a 429 `APIError`; a requester that goes
away while waiting leaves the queue at once). A job is a task (any callable, e.g. appending frames to a session) or
a generation (sampling.py). At most one job is in progress at a time, and it advances one step per scheduler
iteration: a task whose callable returns a generator runs one `next()` per step (a frame, a prefill chunk), a
generation's prefill one chunk (prefill.py). Between two steps, every active generation advances by one token in
one batched `decode_step`, so a long prefill never freezes the streams being decoded: a decoding stream waits at
most one step of the job in progress between two of its tokens.

Active generations live in the rows [0, active) of a pooled state of `max_batch` rows; a generation with `n`
choices is admitted when `n` rows are free, its prompt prefilled once into the first free row and copied into the
others. A finished or cancelled choice's row is overwritten by the last active row, so rows stay contiguous.
`drain` (the server is stopping) refuses new work, fails what is queued, lets the running answers go on until a
deadline and then ends them with an error event. Not here: HTTP, media decoding, sessions.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..engine.generation import decode_step
from ..state import AttentionLayerState, InfiniteVLState, LinearLayerState
from .errors import APIError, internal_error
from .sampling import ChoiceState, Event, Generation

log = logging.getLogger("infinitevl.serving")
SHUTTING_DOWN = "the server is shutting down"


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
class _Task:
    fn: Callable[[], object]
    future: Future
    steps: Generator | None = None


@dataclass
class _Prefill:
    """A generation whose prompt is being prefilled into pool row `row`."""

    gen: Generation
    row: int
    steps: Generator | None = None
    started: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, metrics=None):
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self.pool = model.new_state(max_batch)  # [max_batch] rows; rows [0, len(active)) are in use
        self._pending: deque[_Task | Generation] = deque()
        self._current: _Task | _Prefill | None = None
        self._active: list[ChoiceState] = []
        self._cv = threading.Condition()
        self._stopping = False  # the worker ends
        self._draining: float | None = None  # deadline (monotonic) for the running answers
        self._thread: threading.Thread | None = None
        self.counters = dict(decode_steps=0, decoded_tokens=0, prefill_chunks=0, completed=0, cancelled=0, rejected=0)

    # -- requester side ----------------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len({id(c.gen) for c in self._active}) + isinstance(self._current, _Prefill)

    @property
    def draining(self) -> bool:
        return self._draining is not None

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

    def drain(self, grace: float) -> None:
        """Refuse new work, fail the queued, and give the running answers `grace` seconds before ending them."""
        pending: list[_Task | Generation] = []
        with self._cv:
            if self._draining is None:
                self._draining = time.monotonic() + grace
                pending, self._pending = list(self._pending), deque()
                self._cv.notify()
        for job in pending:
            self._fail_job(job, APIError(503, SHUTTING_DOWN, code="shutting_down"))

    def submit_task(self, fn: Callable[[], object], internal: bool = False) -> Future:
        """Run `fn()` on the worker thread; if it returns a generator, one `next()` per scheduler step. `internal`
        work (the idle-session sweep) bypasses the queue limit."""
        task = _Task(fn, Future())
        self._enqueue(task, internal)
        task.future.add_done_callback(lambda f: f.cancelled() and self._withdraw(task))
        return task.future

    async def run(self, fn: Callable[[], object]):
        """Await `fn()` run on the worker thread; cancelling the await while the task is queued withdraws it."""
        future = self.submit_task(fn)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # only takes effect while it waits in the queue
            raise

    def submit_generation(self, gen: Generation) -> None:
        if gen.n > self.max_batch:
            raise APIError(
                400, f"n is {gen.n}; this server decodes at most {self.max_batch} answers at once", param="n"
            )
        gen.handle.on_cancel = lambda: self._withdraw(gen)
        self._enqueue(gen, internal=False)

    def _enqueue(self, job: _Task | Generation, internal: bool) -> None:
        with self._cv:
            if self._stopping or self._draining is not None:
                raise APIError(503, SHUTTING_DOWN, code="shutting_down")
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

    def _withdraw(self, job: _Task | Generation) -> None:
        """A requester went away: a job still in the queue leaves it now (one running is stopped by the worker)."""
        with self._cv:
            try:
                self._pending.remove(job)
            except ValueError:
                return
            self.counters["cancelled"] += 1
        if isinstance(job, Generation):
            job.handle.post(Event("cancelled"))  # its handler is waiting for the prefill: it returns now

    # -- worker side ---------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # per thread
        while True:
            with self._cv:
                while not (self._stopping or self._pending or self._active or self._current):
                    self._cv.wait()
                if self._stopping:
                    break
                if self._current is None:
                    self._current = self._take_job()
            if self._current is not None:
                self._advance()
            self._cut_if_past_deadline()
            if self._active:
                self._step()
        self._fail_all(APIError(503, SHUTTING_DOWN, code="shutting_down"))

    def _take_job(self) -> _Task | _Prefill | None:
        """The oldest job that can run now: any task, a generation only while it has enough free rows."""
        for i, job in enumerate(self._pending):
            if isinstance(job, _Task):
                del self._pending[i]
                return job
            if len(self._active) + job.n <= self.max_batch:
                del self._pending[i]
                return _Prefill(job, len(self._active))
        return None

    def _advance(self) -> None:
        """One step of the job in progress."""
        job = self._current
        t0 = time.perf_counter()
        if isinstance(job, _Task):
            done = self._advance_task(job)
        else:
            done = self._advance_prefill(job)
        if self.metrics is not None:
            self.metrics.prefill_chunk_seconds.observe(time.perf_counter() - t0)
        self.counters["prefill_chunks"] += 1
        if done:
            self._current = None

    def _advance_task(self, task: _Task) -> bool:
        try:
            if task.steps is None:
                if not task.future.set_running_or_notify_cancel():
                    return True  # withdrawn
                result = task.fn()
                if not inspect.isgenerator(result):
                    task.future.set_result(result)
                    return True
                task.steps = result
            next(task.steps)
            return False
        except StopIteration as stop:
            task.future.set_result(stop.value)
        except BaseException as err:  # handed to the requester
            task.future.set_exception(err)
        return True

    def _advance_prefill(self, job: _Prefill) -> bool:
        gen = job.gen
        if gen.handle.cancelled:
            self.counters["cancelled"] += 1
            gen.handle.post(Event("cancelled"))
            return True
        try:
            if job.steps is None:
                row = rows(self.pool, job.row, job.row + 1)
                row.reset()
                result = gen.prepare(row)
                if not inspect.isgenerator(result):
                    self._admit(job, result)
                    return True
                job.steps = result
            next(job.steps)
            return False
        except StopIteration as stop:
            self._admit(job, stop.value)
        except Exception as err:
            self._fail_job(gen, _as_api_error(err))
        return True

    def _admit(self, job: _Prefill, result) -> None:
        """The prompt is in row `job.row`: start the choices in the first free rows."""
        gen = job.gen
        logits, prompt_logprobs = result if gen.echo_logprobs else (result, None)
        first = len(self._active)  # rows may have been freed while the prompt was prefilled
        source = rows(self.pool, job.row, job.row + 1)
        gen.prompt_tokens = int(source.num_tokens[0])
        for k in range(gen.n):
            if first + k != job.row:
                rows(self.pool, first + k, first + k + 1).copy_(source)
        if self.metrics is not None:
            self.metrics.prefill_seconds.observe(time.perf_counter() - job.started)
            self.metrics.prompt_tokens.inc(gen.prompt_tokens)
        gen.handle.post(Event("started", prompt_tokens=gen.prompt_tokens, prompt_logprobs=prompt_logprobs))
        if gen.score_only():
            gen.finish_unsampled()
            self._finished(gen)
            return
        for choice in gen.choices:
            choice.accept(logits)
            if not choice.done:
                self._active.append(choice)
        if all(c.done for c in gen.choices):
            self._finished(gen)

    def _step(self) -> None:
        """One batched decode step over every active choice, then retire the finished and cancelled."""
        n = len(self._active)
        t0 = time.perf_counter()
        try:
            tokens = torch.tensor([c.next_token for c in self._active])
            logits = decode_step(self.model, rows(self.pool, 0, n), tokens)  # [n, vocab]
            self.counters["decode_steps"] += 1
            self.counters["decoded_tokens"] += n
            for i, choice in enumerate(self._active):
                if not choice.gen.handle.cancelled:
                    choice.accept(logits[i : i + 1])
        except Exception as err:
            log.exception("decode step failed")
            self._fail_active(_as_api_error(err))
            return
        if self.metrics is not None:
            self.metrics.decoded(n, time.perf_counter() - t0)
        for i in reversed(range(n)):
            choice = self._active[i]
            if choice.done or choice.gen.handle.cancelled:
                last = len(self._active) - 1
                if i != last:
                    rows(self.pool, i, i + 1).copy_(rows(self.pool, last, last + 1))
                    self._active[i] = self._active[last]
                self._active.pop()
                self._retired(choice)

    def _retired(self, choice: ChoiceState) -> None:
        gen = choice.gen
        if any(c.gen is gen for c in self._active):
            return  # its other choices are still running
        if gen.handle.cancelled and not all(c.done for c in gen.choices):
            self.counters["cancelled"] += 1
            gen.handle.post(Event("cancelled"))
            if self.metrics is not None:
                self.metrics.requests.labels("cancelled").inc()
        else:
            self._finished(gen)

    def _finished(self, gen: Generation) -> None:
        self.counters["completed"] += 1
        if self.metrics is not None:
            self.metrics.requests.labels("completed").inc()

    def _cut_if_past_deadline(self) -> None:
        if not self._active or self._draining is None or time.monotonic() < self._draining:
            return
        err = APIError(503, f"{SHUTTING_DOWN}; the answer was cut short", code="shutting_down")
        for choice in self._active:
            choice.cut(err)
        self._active.clear()

    def _fail_job(self, job: _Task | Generation, err: APIError) -> None:
        if isinstance(job, _Task):
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(err)
        else:
            job.handle.post(Event("error", error=err))
            if self.metrics is not None:
                self.metrics.requests.labels("error").inc()

    def _fail_active(self, err: APIError) -> None:
        for gen in {id(c.gen): c.gen for c in self._active}.values():
            gen.handle.post(Event("error", error=err))
        self._active.clear()

    def _fail_all(self, err: APIError) -> None:
        self._fail_active(err)
        current, self._current = self._current, None
        if isinstance(current, _Prefill):
            self._fail_job(current.gen, err)
        elif isinstance(current, _Task) and not current.future.done():
            current.future.set_exception(err)
        with self._cv:
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            self._fail_job(job, err)


def _as_api_error(err: Exception) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, ValueError):  # media, state and parameter problems the engine reports
        return APIError(400, str(err), code="invalid_request")
    log.error("generation failed", exc_info=err)
    return internal_error()
