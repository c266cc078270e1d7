"""The engine's thread: one daemon thread owns the engine and runs its step loop for the server.

The engine is not thread-safe, so the event loop never touches it: it hands requests (`Job`s) and cancellations
to this thread through an inbox and gets each request's outputs back on the job's own asyncio queue (like vLLM's
AsyncLLMEngine over its LLMEngine). Requests join and leave the running batch at every step (continuous
batching). Up to `max_num_seqs` requests run and `max_queue` more wait for a place in the batch; one more is
refused (QueueFull), and one that waited longer than `max_queue_wait_s` answers 503. A failed step answers its
batch 500 and frees its blocks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labkit.device import release_openmp_workers
from labkit.serving.metrics import ServerMetrics
from labkit.serving.protocol import APIError, bad_request

if TYPE_CHECKING:
    from labkit.engine.engine import EngineStats, RequestOutput
    from labkit.model.sampling import SamplingParams

logger = logging.getLogger("labkit.serving.server")

_END = object()  # pushed once when a job is over, after its last output or its error


@dataclass(eq=False)
class Job:
    """One accepted request: what to generate and where its outputs go (an asyncio queue on the server's loop)."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    accepted_s: float = field(default_factory=time.perf_counter)
    is_done: bool = False  # on the loop: its end (or its error) was received
    admitted_s: float | None = None  # on the engine's thread: when it first joined the running batch
    last_token_s: float | None = None

    def push(self, item) -> bool:
        """From the engine's thread: hand an item to the request's coroutine; False when nobody listens."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
            return True
        except RuntimeError:  # the loop is closed
            return False


class QueueFull(Exception):
    """The bounded queue has no room."""


def shutting_down() -> APIError:
    """The answer while draining, and the last event of a stream cut at the end of the grace period. Retry-After:
    a client (or the proxy in front) retries, by then on the server's replacement or another replica."""
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                    headers={"Retry-After": "1"})


class EngineWorker:
    """Owns the engine on one daemon thread: takes requests and cancellations from an inbox, steps the engine
    while it has work, and hands each request's outputs to its coroutine; sleeps when idle.

    A lock guards the inbox, the jobs and the published stats; the engine is called only from the thread,
    and `step()` runs outside the lock so that requests arrive while it computes.
    """

    def __init__(self, engine, metrics: ServerMetrics, max_queue: int, max_queue_wait_s: float | None = None,
                 log_iterations: bool = False):
        self.engine, self.metrics = engine, metrics
        self.log_iterations = log_iterations  # a line per step on the labkit.serving.server logger, at INFO
        self._release_openmp_workers()  # the creator's (an app served from a thread: it loaded the model)
        self.max_queue, self.max_queue_wait_s = max_queue, max_queue_wait_s
        self._is_continuous = engine.config.scheduler.policy == "continuous"
        self._max_rows = engine.config.scheduler.max_num_seqs  # the running batch's rows
        self._cond = threading.Condition()
        self._inbox: collections.deque[Job] = collections.deque()  # accepted, not yet in the engine
        self._cancels: list[Job] = []
        self._jobs: dict[str, Job] = {}  # in the engine, by request id
        self._stats: EngineStats = engine.stats()  # taken before the thread exists
        self._stopping = False
        self.is_draining = False  # shutting down: new requests answer 503, accepted ones finish
        self._thread: threading.Thread | None = None

    def _release_openmp_workers(self) -> None:
        """Free this thread's OpenMP workers before the engine's thread makes its own: with the loading thread's
        idle workers beside them, a 2-core CPU ran the engine at half speed (`labkit.device.
        release_openmp_workers`). Done where the worker is made and where it starts (for `labkit serve` both the
        main thread, which loaded the model; a test or notebook serving from a thread made it on the main one)."""
        if self.engine.device.type == "cpu":
            release_openmp_workers()

    # called from the event loop
    def start(self) -> None:
        if self._thread is None:
            self._stopping = self.is_draining = False
            self._release_openmp_workers()
            self._thread = threading.Thread(target=self._run, name="labkit-serve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Answer every request 503 (the thread aborts them in the engine), then join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def drain(self) -> None:
        """Take no more requests (they answer 503); those accepted go on."""
        with self._cond:
            self.is_draining = True

    def submit(self, job: Job) -> None:
        with self._cond:
            if self.is_draining:
                raise shutting_down()
            if self._stopping or not self.is_alive:
                raise APIError(503, "the engine is not running", type="server_error", code="worker_unavailable",
                               headers={"Retry-After": "1"})
            if not self._has_room():
                raise QueueFull()
            self._inbox.append(job)
            self._cond.notify()
        self.metrics.count_accepted()

    def _has_room(self) -> bool:
        """Whether one more request fits (under the lock): up to max_num_seqs run and max_queue wait.

        Every accepted request not yet ended counts, whether it is still in the inbox or in the engine, and a free
        row of the running batch is room as much as a queue slot is: `--max-num-seqs 32 --max-queue 64` takes 96
        requests sent at once. A policy other than continuous batching frees no row while a batch runs.
        """
        num_accepted = len(self._inbox) + len(self._jobs)
        num_running = min(self._stats.num_running, len(self._jobs))
        is_batch_open = self._is_continuous or num_running == 0
        num_free_rows = self._max_rows - num_running if is_batch_open else 0
        return num_accepted - num_running < self.max_queue + num_free_rows

    def cancel(self, job: Job) -> None:
        """Drop a request that has not reached the engine, or have the thread abort it; idempotent."""
        with self._cond:
            if job in self._inbox:
                self._inbox.remove(job)
                self._end(job, "cancelled")
            elif job.request_id in self._jobs:
                self._cancels.append(job)
                self._cond.notify()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def has_work(self) -> bool:
        """Whether any accepted request has not ended yet."""
        with self._cond:
            return bool(self._inbox or self._jobs)

    def snapshot(self) -> tuple[int, EngineStats]:
        """(requests waiting for the batch, the engine's stats after its last step)."""
        with self._cond:
            return len(self._inbox) + self._stats.num_waiting, self._stats

    # the engine's thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._inbox or self._cancels or self._jobs):
                    self._cond.wait()
                if self._stopping:
                    break
                self._take_inbox()
                self._expire_waiting()
                self._stats = self.engine.stats()
                has_work = bool(self._jobs)
            if has_work:
                self._step()
        with self._cond:
            error = shutting_down()
            for job in [*self._inbox, *self._jobs.values()]:
                self._end(job, "cancelled", error)
            self._inbox.clear()
            self._stats = self.engine.stats()

    def _take_inbox(self) -> None:
        """Add new requests to the engine and abort cancelled ones (under the lock)."""
        for job in self._cancels:
            if job.request_id in self._jobs:
                self._end(job, "cancelled")
        self._cancels.clear()
        while self._inbox:
            job = self._inbox.popleft()
            try:
                self.engine.add_request(job.prompt_ids, job.params, request_id=job.request_id)
            except ValueError as exc:  # e.g. more tokens than the whole KV cache holds: the request's fault
                job.push(bad_request(str(exc), code="context_length_exceeded"))
                job.push(_END)
                self.metrics.observe_finished("rejected", time.perf_counter() - job.accepted_s)
                continue
            except Exception as exc:  # e.g. the prompt-logprobs forward failed: answer this request, keep serving
                logger.error("adding request %s failed: %s", job.request_id, exc, exc_info=exc)
                self.engine.abort(job.request_id)
                job.push(_generation_failed(exc))
                job.push(_END)
                self.metrics.observe_finished("error", time.perf_counter() - job.accepted_s)
                continue
            self._jobs[job.request_id] = job

    def _expire_waiting(self) -> None:
        """Answer 503 to requests that waited for the batch past the deadline; admitted ones never expire."""
        if self.max_queue_wait_s is None:
            return
        now = time.perf_counter()
        for request_id in self.engine.queued_request_ids():  # preempted requests keep their place
            job = self._jobs.get(request_id)
            if job is None:
                continue
            waited = now - job.accepted_s
            if waited > self.max_queue_wait_s:
                retry_s = max(1, math.ceil(self.max_queue_wait_s))
                self._end(job, "queue_timeout", APIError(
                    503, f"the request waited {waited:.1f} s for a place in the batch, over the server's limit of "
                         f"{self.max_queue_wait_s:g} s: retry later", type="server_error", code="queue_timeout",
                    headers={"Retry-After": str(retry_s)}))

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # answer the batch, free its blocks, keep serving
            self._fail_batch(exc)
            return
        now = time.perf_counter()
        with self._cond:
            for request_id in self.engine.running_request_ids():
                job = self._jobs.get(request_id)
                if job is not None and job.admitted_s is None:
                    job.admitted_s = started
            for out in outputs:
                self._deliver(out, started, now)
            stats = self.engine.stats()
            ran = stats.num_steps != self._stats.num_steps
            self._stats = stats
            if ran:
                self.metrics.observe_step(stats.last_batch_size)
            else:  # the scheduler is holding requests back (e.g. a dynamic batch filling up): do not spin
                self._cond.wait(0.005)
        if ran and self.log_iterations:  # outside the lock: a slow stderr must not hold up the event loop
            log_iteration(stats)

    def _deliver(self, out: RequestOutput, started: float, now: float) -> None:
        job = self._jobs.get(out.request_id)
        if job is None:
            return
        if out.new_token_ids:
            n = len(out.new_token_ids)
            if job.last_token_s is None:
                admitted = started if job.admitted_s is None else job.admitted_s
                self.metrics.observe_first_token(admitted - job.accepted_s, now - job.accepted_s,
                                                 out.num_prompt_tokens)
                # tokens released with the first one arrived with it: no gap of their own
                self.metrics.observe_tokens(1, None)
                if n > 1:
                    self.metrics.observe_tokens(n - 1, 0.0)
            else:
                self.metrics.observe_tokens(n, now - job.last_token_s)
            job.last_token_s = now
        is_heard = job.push(out)
        if out.finished:
            del self._jobs[job.request_id]
            job.push(_END)
            self.metrics.observe_finished(out.finish_reason, now - job.accepted_s)
        elif not is_heard:
            self._end(job, "cancelled")

    def _end(self, job: Job, reason: str, error: APIError | None = None) -> None:
        """End a job early (under the lock): abort it in the engine, answer the error if any, count it once."""
        if self._jobs.pop(job.request_id, None) is not None:
            self.engine.abort(job.request_id)
        if error is not None:
            job.push(error)
        job.push(_END)
        self.metrics.observe_finished(reason, time.perf_counter() - job.accepted_s)

    def _fail_batch(self, exc: Exception) -> None:
        """A failed step: answer its requests 500 and abort them, so that no KV block stays held."""
        with self._cond:
            ids = self.engine.running_request_ids() or list(self._jobs)
            logger.error("engine step failed, answering %d requests 500: %s", len(ids), exc, exc_info=exc)
            error = _generation_failed(exc)
            for request_id in ids:
                job = self._jobs.get(request_id)
                if job is None:
                    self.engine.abort(request_id)
                else:
                    self._end(job, "error", error)
            self._stats = self.engine.stats()


def log_iteration(stats: EngineStats) -> None:
    """One step as vLLM's --enable-logging-iteration-details logs it (same fields, same words), so that the two
    servers' steps under one load can be set side by side: rows computing prompt tokens and their tokens, the
    generation rows and their tokens (a static batch's padding left out of both), the step's wall time."""
    generation_rows = stats.last_batch_size - stats.last_num_padding_rows - stats.last_num_context_rows
    generation_tokens = stats.last_num_tokens - stats.last_num_padding_tokens - stats.last_num_context_tokens
    logger.info("Iteration(%d): %d context requests, %d context tokens, %d generation requests, %d generation "
                "tokens, iteration elapsed time: %.2f ms, KV cache usage: %.1f%%", stats.num_steps - 1,
                stats.last_num_context_rows, stats.last_num_context_tokens, generation_rows, generation_tokens,
                stats.last_step_s * 1000,
                100 * stats.num_used_blocks / max(stats.num_kv_blocks, 1))


def _generation_failed(exc: Exception) -> APIError:
    return APIError(500, f"generation failed: {exc}", type="server_error", code="generation_failed")


async def next_output(job: Job) -> RequestOutput | None:
    """The job's next engine output, None at its end; an error the engine's thread sent is raised."""
    item = await job.out.get()
    if item is _END or isinstance(item, APIError):
        job.is_done = True
    if isinstance(item, APIError):
        raise item
    return None if item is _END else item


__all__ = ["Job", "QueueFull", "EngineWorker", "log_iteration", "next_output", "shutting_down"]
