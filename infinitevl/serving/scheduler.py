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
others. Generations are admitted in arrival order: a later one never passes an earlier one waiting for rows (tasks,
which need none, may). A finished or cancelled choice's row is overwritten by the last active row, so rows stay
contiguous. A choice whose streaming client has stopped reading (events piling up unread) is moved behind the others
and skipped by the decode steps; paused for `stall_timeout` seconds, it is dropped with an error.

Failures are contained: an exception while preparing or sampling a request fails that request alone (the others go
on); only a failure of the batched model step itself fails every running answer. If the worker thread ends for any
other reason, what is queued or running gets a 503 at once, new work is refused, and `alive` (and `/health`) say so.
`drain` (the server is stopping) refuses new work, fails what is queued, lets the running answers go on until a
deadline and then ends them with an error event. Not here: HTTP, media decoding, sessions.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
WORKER_DEAD = "the model worker has stopped; the server must be restarted (see its log)"
MAX_UNREAD = 64  # events per choice a streaming client may leave unread before its answer is paused


def rows(state: InfiniteVLState, start: int, stop: int) -> InfiniteVLState:
    """A view of batch rows [start, stop) of `state`: the model updates it in place, and so the pooled state."""
    layers: list[LinearLayerState | AttentionLayerState] = []
    for layer in state.layers:
        fields = {k: v[start:stop] for k, v in layer.tensors().items()}
        layers.append(dataclasses.replace(layer, **fields))  # the same kind of layer state, over fewer rows
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
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, metrics=None, stall_timeout: float = 30.0):
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self.stall_timeout = stall_timeout  # seconds a paused stream (its client does not read) keeps its row
        self.pool = model.new_state(max_batch)  # [max_batch] rows; rows [0, len(active)) are in use
        self._spare = model.new_state(1)  # for swapping two rows
        self._pending: deque[_Task | Generation] = deque()
        self._current: _Task | _Prefill | None = None
        self._active: list[ChoiceState] = []
        self._cv = threading.Condition()
        self._stopping = False  # the worker ends
        self._draining: float | None = None  # deadline (monotonic) for the running answers
        self._thread: threading.Thread | None = None
        self._dead = False  # the worker thread has ended
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

    @property
    def alive(self) -> bool:
        """The worker thread runs (False before `start` and after it ended, for whatever reason)."""
        return self._thread is not None and self._thread.is_alive() and not self._dead

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="infinitevl-worker", daemon=True)
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
            if self._dead:
                raise APIError(503, WORKER_DEAD, code="worker_dead")
            if not internal and len(self._pending) >= self.max_queue:
                self.counters["rejected"] += 1
                raise APIError(
                    429,
                    f"the server is busy: its queue is full ({len(self._pending)} waiting, the limit is "
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
    def _run(self) -> None:
        """The worker thread. Whatever ends it (normally `stop`, or an exception no request could be blamed for),
        what is queued or running is failed, and new work is refused from then on (`alive` is False)."""
        try:
            self._loop()
        except BaseException:
            log.critical("the model worker stopped", exc_info=True)
            raise
        finally:
            stopping = self._stopping
            with self._cv:
                self._dead = True
            err = APIError(
                503, SHUTTING_DOWN if stopping else WORKER_DEAD, code="shutting_down" if stopping else "worker_dead"
            )
            self._fail_all(err)

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
                idle = self._current is None
            if self._current is not None:
                self._advance()
            self._cut_if_past_deadline()
            if self._active and self._step() == 0 and idle:
                with self._cv:  # every stream is paused (nobody reads): wait for readers, not in a busy loop
                    self._cv.wait(0.02)

    def _take_job(self) -> _Task | _Prefill | None:
        """The oldest job that can run now, in order: tasks need no rows and may pass a waiting generation, but
        no generation passes an older one that waits for rows (so a request for many rows is not starved)."""
        for i, job in enumerate(self._pending):
            if isinstance(job, _Task):
                del self._pending[i]
                return job
            if len(self._active) + job.n <= self.max_batch:
                del self._pending[i]
                return _Prefill(job, len(self._active))
            break
        for i, job in enumerate(self._pending):
            if isinstance(job, _Task):
                del self._pending[i]
                return job
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
                job.steps = result  # checked below: a failing first chunk is this request's failure
            try:
                next(job.steps)
                return False
            except StopIteration as stop:
                self._admit(job, stop.value)
        except Exception as err:  # this request's alone: the others go on
            self._fail_job(gen, _as_api_error(err, gen.request_id))
            self._active = [c for c in self._active if c.gen is not gen]  # admitted in part
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

    def _step(self) -> int:
        """One batched decode step over every active choice whose client reads, then retire the finished,
        cancelled and failed. A choice whose sampling raises fails its own request only. Returns how many ran."""
        n = self._pause_unread()
        if n:
            t0 = time.perf_counter()
            try:
                tokens = torch.tensor([c.next_token for c in self._active[:n]])
                logits = decode_step(self.model, rows(self.pool, 0, n), tokens)  # [n, vocab]
            except Exception as err:  # the model itself failed: the rows' states are unknown
                log.exception("decode step failed")
                self._fail_active(_as_api_error(err))
                return n
            self.counters["decode_steps"] += 1
            self.counters["decoded_tokens"] += n
            for i, choice in enumerate(self._active[:n]):
                if choice.done or choice.gen.handle.cancelled:
                    continue
                try:
                    choice.accept(logits[i : i + 1])
                except Exception as err:
                    self._fail_generation(choice.gen, _as_api_error(err, choice.gen.request_id))
            if self.metrics is not None:
                self.metrics.decoded(n, time.perf_counter() - t0)
        for i in reversed(range(len(self._active))):
            choice = self._active[i]
            if choice.done or choice.gen.handle.cancelled:
                last = len(self._active) - 1
                if i != last:
                    rows(self.pool, i, i + 1).copy_(rows(self.pool, last, last + 1))
                    self._active[i] = self._active[last]
                self._active.pop()
                self._retired(choice)
        return n

    def _pause_unread(self) -> int:
        """Move the choices whose streaming client has stopped reading (more than MAX_UNREAD events waiting) to
        the end of the active rows, where no decode step runs; a choice paused for `stall_timeout` seconds is
        dropped with an error (its rows go to others). Returns the number of choices that run."""
        now = time.monotonic()
        run = 0
        for i, choice in enumerate(self._active):
            unread, limit = choice.gen.handle.unread, MAX_UNREAD * choice.gen.n  # every choice posts its events
            if choice.paused_since is None and unread > limit:
                choice.paused_since = now
            elif choice.paused_since is not None and unread <= limit // 2:
                choice.paused_since = None
            if choice.paused_since is not None and now - choice.paused_since > self.stall_timeout:
                self._fail_generation(choice.gen, APIError(408, STALLED.format(self.stall_timeout), code="stalled"))
            if choice.paused_since is None and not choice.done:
                if i != run:
                    self._swap(i, run)
                run += 1
        return run

    def _swap(self, i: int, j: int) -> None:
        a, b = rows(self.pool, i, i + 1), rows(self.pool, j, j + 1)
        self._spare.copy_(a)
        a.copy_(b)
        b.copy_(self._spare)
        self._active[i], self._active[j] = self._active[j], self._active[i]

    def _fail_generation(self, gen: Generation, err: APIError) -> None:
        """End every running choice of one request with `err` (their rows are retired after the step)."""
        if err.status >= 500:
            log.error("request %s failed: %s", gen.request_id, err.message)
        gen.failed = True
        for choice in gen.choices:
            if not choice.done:
                choice.cut(err)
        if self.metrics is not None:
            self.metrics.requests.labels("error").inc()

    def _retired(self, choice: ChoiceState) -> None:
        gen = choice.gen
        if any(c.gen is gen for c in self._active):
            return  # its other choices are still running
        if gen.failed:
            return
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


STALLED = "the client did not read its stream for {:g} s; the answer was dropped"


def _as_api_error(err: Exception, request_id: str | None = None) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, ValueError):  # media, state and parameter problems the engine reports
        return APIError(400, str(err), code="invalid_request")
    log.error("request %s failed", request_id or "-", exc_info=err)
    return internal_error(request_id)
