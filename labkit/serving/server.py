"""`labkit serve`: an OpenAI-compatible HTTP server over the labkit engine (FastAPI + uvicorn).

Routes: /v1/completions, /v1/chat/completions (streaming as server-sent events), /v1/models, /health, /metrics.
The engine is not thread-safe, so one daemon thread owns it and runs its step loop: requests join and leave
the running batch at every step (continuous batching), so concurrent streams are decoded together. The event
loop never touches the engine: it hands requests and cancellations to that thread through an inbox and gets
each request's outputs back on its own asyncio queue (like vLLM's AsyncLLMEngine over its LLMEngine). Up to
`max_queue` requests wait for a place in the batch; one more answers 429, and one that waited longer than
`max_queue_wait_s` answers 503. Request validation and OpenAI's bodies live in `labkit.serving.protocol`, the
Prometheus page in `labkit.serving.metrics`; errors never take the server down.

Hardening against slow, idle and cross-site clients: a connection must send its request head within
`header_timeout_s` and its body within `body_timeout_s` (408); more than `max_connections` open connections
are answered 503; POST bodies must be `application/json` (415, so a browser's cross-site form or `text/plain`
request is refused); a request over loopback must name a loopback Host (400, against DNS rebinding).
Prompts are tokenized on a thread of their own, never on the event loop. On SIGTERM the server stops taking
work (503), gives requests in flight `shutdown_grace_s` to finish, then ends each open stream with an error
event and `data: [DONE]`.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose `Request` is imported
# inside create_app so that importing this module (for the CLI's parser) stays light.
import argparse
import asyncio
import collections
import copy
import hmac
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response

from labkit.serving.metrics import ServerMetrics
from labkit.serving.protocol import (API_KEY_ENV, DEFAULT_CHAT_MAX_TOKENS, DONE_EVENT, APIError, GenerationRequest, Reply,
                             bad_request, is_loopback, parse_generation_request, parse_json_object, server_url, sse)

if TYPE_CHECKING:
    from labkit.engine.engine import EngineStats, RequestOutput
    from labkit.model.sampling import SamplingParams

logger = logging.getLogger("labkit.serving.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_QUEUE_WAIT_S = 120.0  # longer than most clients wait for a first token anyway
DEFAULT_MAX_CONNECTIONS = 512  # well under the usual limit of 1024 open files
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0  # a whole default-size body (1 MiB) at 35 KB/s
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 5.0  # uvicorn's
DEFAULT_SHUTDOWN_GRACE_S = 5.0
SHUTDOWN_FLUSH_S = 2.0  # after the grace period: for the last events to reach their clients
OVER_CAPACITY = "labkit.over_capacity"  # the scope key a connection over max_connections carries


# -- configuration -------------------------------------------------------------------------------------------
@dataclass
class ServeConfig:
    """How the server answers: model name, queue bound and deadline, key, body and reply limits, connection
    limits and deadlines, Host check and shutdown grace; validated."""

    served_model_name: str | None = None  # None: the engine's name
    max_queue: int = 64  # requests waiting for a place in the running batch; one more answers 429
    api_key: str | None = None  # None: /v1 routes are open
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue_wait_s: float | None = DEFAULT_MAX_QUEUE_WAIT_S  # not admitted after this long: 503; None: no limit
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS  # a chat request without max_tokens (clipped to the context)
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open connections; a request on one more answers 503
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # a request head not in by then closes the connection
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # a request body not in by then answers 408
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S  # an idle connection between requests
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S  # on SIGTERM, for requests in flight to finish
    check_host: bool = True  # a request over loopback must name a loopback Host

    def __post_init__(self):
        for name, low in (("max_queue", 0), ("max_body_bytes", 1), ("default_max_tokens", 1),
                          ("max_connections", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("max_queue_wait_s", "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s",
                     "shutdown_grace_s"):
            value = getattr(self, name)
            if value is None and name == "max_queue_wait_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a number > 0{' or None' if name == 'max_queue_wait_s' else ''}, "
                                 f"got {value!r}")
        if not isinstance(self.check_host, bool):
            raise ValueError(f"check_host must be a boolean, got {self.check_host!r}")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None")
        if self.served_model_name is not None and not (isinstance(self.served_model_name, str)
                                                       and self.served_model_name.strip()):
            raise ValueError(f"served_model_name must be a non-empty string, got {self.served_model_name!r}")


# -- the engine's thread -------------------------------------------------------------------------------------
_END = object()  # pushed once when a job is over, after its last output or its error


@dataclass(eq=False)
class Job:
    """One accepted request: what to generate and where its outputs go (an asyncio queue on the server's loop)."""

    prompt_ids: list[int]
    params: "SamplingParams"
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


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


class EngineWorker:
    """Owns the engine on one daemon thread: takes requests and cancellations from an inbox, steps the engine
    while it has work, and hands each request's outputs to its coroutine; sleeps when idle.

    A lock guards the inbox, the jobs and the published stats; the engine is called only from the thread,
    and `step()` runs outside the lock so that requests arrive while it computes.
    """

    def __init__(self, engine, metrics: ServerMetrics, max_queue: int, max_queue_wait_s: float | None = None):
        self.engine, self.metrics = engine, metrics
        self.max_queue, self.max_queue_wait_s = max_queue, max_queue_wait_s
        # a new request waits unless the continuous scheduler has a free row for it
        is_continuous = engine.config.scheduler.policy == "continuous"
        self._max_rows = engine.config.scheduler.max_num_seqs if is_continuous else 1
        self._cond = threading.Condition()
        self._inbox: collections.deque[Job] = collections.deque()  # accepted, not yet in the engine
        self._cancels: list[Job] = []
        self._jobs: dict[str, Job] = {}  # in the engine, by request id
        self._stats: "EngineStats" = engine.stats()  # taken before the thread exists
        self._stopping = False
        self.is_draining = False  # shutting down: new requests answer 503, accepted ones finish
        self._thread: threading.Thread | None = None

    # called from the event loop
    def start(self) -> None:
        if self._thread is None:
            self._stopping = self.is_draining = False
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
                raise _shutting_down()
            if self._stopping or not self.is_alive:
                raise APIError(503, "the engine is not running", type="server_error", code="worker_unavailable")
            num_waiting = len(self._inbox) + self._stats.num_waiting
            would_wait = num_waiting > 0 or self._stats.num_running >= self._max_rows
            if would_wait and num_waiting >= self.max_queue:
                raise QueueFull()
            self._inbox.append(job)
            self._cond.notify()
        self.metrics.count_accepted()

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

    def snapshot(self) -> tuple[int, "EngineStats"]:
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
            error = _shutting_down()
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

    def _deliver(self, out: "RequestOutput", started: float, now: float) -> None:
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
            error = APIError(500, f"generation failed: {exc}", type="server_error", code="generation_failed")
            for request_id in ids:
                job = self._jobs.get(request_id)
                if job is None:
                    self.engine.abort(request_id)
                else:
                    self._end(job, "error", error)
            self._stats = self.engine.stats()


# -- the app -------------------------------------------------------------------------------------------------
def error_response(exc: APIError) -> Response:
    """exc's OpenAI error body and status. JSON escapes non-ASCII text, so that a lone surrogate the message
    echoes from the request cannot fail the reply (Starlette's JSONResponse writes raw UTF-8)."""
    return Response(json.dumps(exc.body()), status_code=exc.status, headers=exc.headers,
                    media_type="application/json")


class _StreamingResponse(Response):
    """Server-sent events whose status waits for the first event, and that stop (cancelling their request) as
    soon as the client disconnects.

    An APIError before the first event (a queue timeout, a failed step) is answered with its real status and
    OpenAI's error body instead of a 200 stream. Starlette's StreamingResponse notices a disconnect only on its
    next send; a request still waiting for the batch sends nothing, so this one always listens for it.
    """

    def __init__(self, events: AsyncIterator[str], on_disconnect: Callable[[], None]):
        self.status_code = 200
        self.background = None
        self.init_headers({"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                           "x-accel-buffering": "no"})
        self.events = events
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        import anyio

        async def stream() -> None:
            try:
                try:
                    first = await anext(self.events)
                except APIError as exc:
                    await error_response(exc)(scope, receive, send)
                    return
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                await send({"type": "http.response.body", "body": first.encode(), "more_body": True})
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # ASGI >= 2.4 servers report a gone client by failing the send
                self.on_disconnect()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_disconnect()

        try:
            async with anyio.create_task_group() as group:
                async def run(fn) -> None:
                    await fn()
                    group.cancel_scope.cancel()

                group.start_soon(run, stream)
                await run(listen)
        finally:
            await self.events.aclose()


async def _next_output(job: Job) -> "RequestOutput | None":
    """The job's next engine output, None at its end; an error the engine's thread sent is raised."""
    item = await job.out.get()
    if item is _END or isinstance(item, APIError):
        job.is_done = True
    if isinstance(item, APIError):
        raise item
    return None if item is _END else item


def create_app(engine, config: ServeConfig | None = None, **kwargs):
    """The FastAPI app over one engine; kwargs are ServeConfig fields. Serve it with uvicorn or ServerThread."""
    from contextlib import asynccontextmanager

    import anyio
    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    if config is None:
        config = ServeConfig(**kwargs)
    elif kwargs:
        raise ValueError("pass a ServeConfig or keyword arguments, not both")
    if engine.tokenizer is None:
        raise ValueError("labkit serve needs an engine with a tokenizer")
    model_name = config.served_model_name or engine.name
    metrics = ServerMetrics(model_name)
    worker = EngineWorker(engine, metrics, config.max_queue, config.max_queue_wait_s)
    metrics.watch_engine(worker.snapshot)
    # Prompts are tokenized (and chat templates rendered) on one thread of their own: a megabyte of prompt takes
    # a fraction of a second, which would stall every other request on the event loop. The engine's thread
    # detokenizes with the engine's tokenizer; this thread gets its own copy, since a fast tokenizer shared
    # across threads can fail with "Already borrowed".
    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer_pool: list[ThreadPoolExecutor] = []  # while the app is served
    vocab_size = engine.model.args.vocab_size
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        tokenizer_pool.append(ThreadPoolExecutor(1, thread_name_prefix="labkit-serve-tokenizer"))
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
            tokenizer_pool.pop().shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="labkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail), param=None,
                                       code="not_found" if exc.status_code == 404 else None,
                                       headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    async def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict:
        """The JSON object a POST carries: 415 unless it says it is JSON, 413 over the size limit, 408 when it
        does not arrive in time, 400 when it is not a JSON object."""
        content_type = request.headers.get("content-type")
        if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
            # a browser sends a cross-site form or text/plain POST without asking first; JSON needs a preflight
            raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'}",
                           code="unsupported_media_type")
        length = request.headers.get("content-length", "")
        too_big = APIError(413, f"request body over {config.max_body_bytes} bytes", code="request_too_large")
        if length.isdigit() and int(length) > config.max_body_bytes:
            raise too_big
        body = bytearray()
        try:
            with anyio.fail_after(config.body_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > config.max_body_bytes:
                        raise too_big
        except ClientDisconnect:  # the client left mid-body: no server error, nobody to answer
            raise APIError(499, "client closed the request") from None
        except TimeoutError:  # the rest of the body may never come: close the connection after answering
            raise APIError(408, f"the request body did not arrive within {config.body_timeout_s:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None
        return parse_json_object(body)

    def check_model(body: Mapping) -> None:
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"The model `{model}` does not exist: this server serves `{model_name}`",
                           param="model", code="model_not_found")

    async def generate(request: Request, is_chat: bool):
        await check_key(request)
        body = await read_json(request)
        check_model(body)
        parse = partial(parse_generation_request, body, is_chat=is_chat, tokenizer=tokenizer,
                        eos_token_ids=engine.eos_token_ids, max_seq_len=engine.max_seq_len, vocab_size=vocab_size,
                        default_max_tokens=config.default_max_tokens)
        req = await asyncio.get_running_loop().run_in_executor(tokenizer_pool[0], parse)
        job = Job(req.prompt_ids, req.params, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy: {config.max_queue} requests are already waiting",
                           type="rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}) from None
        reply = Reply(model_name, is_chat, req.return_token_ids, req.include_usage)
        if req.is_stream:
            return _StreamingResponse(_stream_events(job, req, reply), on_disconnect=partial(worker.cancel, job))
        return await _complete(request, job, reply)

    async def _stream_events(job: Job, req: GenerationRequest, reply: Reply):
        num_tokens = 0
        try:
            out = await _next_output(job)  # an error before this is answered with its own status
            if reply.is_chat:
                yield reply.role_event()
            try:
                while out is not None:
                    num_tokens += len(out.new_token_ids)
                    if out.text or out.new_token_ids or out.finished:
                        yield reply.delta_event(out.text, out.finish_reason, out.new_token_ids)
                    out = await _next_output(job)
            except APIError as exc:
                yield sse(exc.body())  # the openai client raises an APIError on this event
            else:
                if req.include_usage:
                    yield reply.usage_event(len(job.prompt_ids), num_tokens)
            yield DONE_EVENT
        finally:
            if not job.is_done:  # the client left (or the server is closing): free its place in the batch
                worker.cancel(job)

    async def _complete(request: Request, job: Job, reply: Reply):
        text, token_ids, finish = [], [], "length"
        failure: list[APIError] = []

        async def collect(group) -> None:
            nonlocal finish
            try:
                while (out := await _next_output(job)) is not None:
                    text.append(out.text)
                    token_ids.extend(out.new_token_ids)
                    finish = out.finish_reason or finish
            except APIError as exc:
                failure.append(exc)
            group.cancel_scope.cancel()

        async def watch(group) -> None:  # a client that hangs up cancels its generation
            while (await request.receive())["type"] != "http.disconnect":
                pass
            worker.cancel(job)
            group.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(collect, group)
                group.start_soon(watch, group)
        finally:
            if not job.is_done:
                worker.cancel(job)
        if failure:
            raise failure[0]
        if not job.is_done:
            raise APIError(499, "client closed the request")
        return reply.response("".join(text), finish, token_ids, len(job.prompt_ids))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, is_chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, is_chat=True)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "labkit",
                "root": engine.name, "max_model_len": engine.max_seq_len}

    @app.get("/v1/models")
    async def models(request: Request):
        await check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str):
        await check_key(request)
        check_model({"model": model})
        return model_card()

    @app.get("/health")
    async def health():
        num_waiting, stats = worker.snapshot()
        status = "shutting_down" if worker.is_draining else "ok" if worker.is_alive else "unhealthy"
        state = {"status": status, "model": model_name,
                 "num_running": stats.num_running, "num_waiting": num_waiting, "queue_depth": num_waiting,
                 "num_kv_blocks_used": stats.num_used_blocks, "num_kv_blocks": stats.num_kv_blocks}
        return JSONResponse(state, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        page, content_type = metrics.render(request.headers.get("accept", ""))
        return Response(page, media_type=content_type)

    app.add_middleware(_Gate, metrics=metrics, routes={r.path for r in app.routes if hasattr(r, "path")},
                       max_connections=config.max_connections, check_host=config.check_host)
    return app


def _names_loopback(host: str) -> bool:
    """Whether a Host header names this machine (localhost, 127.0.0.1, [::1], with or without a port)."""
    try:
        return is_loopback(f"http://{host}")
    except ValueError:  # not even a host name, e.g. "[::1"
        return False


class _Gate:
    """ASGI middleware around the app: count every HTTP response by route and status (route "other" for unknown
    paths), and answer before the app when a connection is over the limit (503) or a request over loopback
    names a foreign Host (400: a page from elsewhere that resolves its name to 127.0.0.1 must not reach us).

    An unhandled exception is answered 500 by Starlette's outermost middleware, outside this one: count it here.
    """

    def __init__(self, app, metrics: ServerMetrics, routes: set[str], max_connections: int, check_host: bool):
        self.app, self.metrics, self.routes = app, metrics, routes
        self.max_connections, self.check_host = max_connections, check_host

    def _refusal(self, scope) -> APIError | None:
        if scope.get(OVER_CAPACITY):
            return APIError(503, f"the server has {self.max_connections} connections open, its limit: retry later",
                            type="server_error", code="too_many_connections",
                            headers={"Retry-After": "1", "Connection": "close"})
        server = scope.get("server")  # the address the request came in on
        if self.check_host and server and is_loopback(server_url(*server)):
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if host is not None and not _names_loopback(host):
                return APIError(400, f"Host {host!r} is not this machine: a request over loopback must name "
                                     "localhost, 127.0.0.1 or [::1] (labkit serve --no-check-host allows any)",
                                code="invalid_host")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in self.routes else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        is_started = False

        async def counting_send(message):
            nonlocal is_started
            if message["type"] == "http.response.start":
                is_started = True
                self.metrics.count_request(route, message["status"])
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            return await error_response(refusal)(scope, receive, counting_send)
        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not is_started:
                self.metrics.count_request(route, 500)
            raise


# -- running it ----------------------------------------------------------------------------------------------
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one); a clear ValueError when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _h11_protocol(config: ServeConfig):
    """uvicorn's h11 protocol with a deadline on each request head and a cap on open connections.

    uvicorn times out only idle keep-alive connections, and only after a first response: a client that connects
    and sends nothing, or a header a byte at a time, would hold its socket forever. Here a connection has
    header_timeout_s from opening (or from its last response) to send a whole request head, or it is closed.
    A connection over max_connections is kept just long enough to answer its request 503 and close.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > config.max_connections:
                self.app = partial(_over_capacity, self.app)
            self._await_head()

        def _await_head(self) -> None:
            self._forget_head()
            self._head_deadline = self.loop.call_later(config.header_timeout_s, self._head_timed_out)

        def _forget_head(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _is_serving(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _head_timed_out(self) -> None:
            self._head_deadline = None
            if not self._is_serving() and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self._is_serving():  # a whole head arrived: the app's deadlines take over
                self._forget_head()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._await_head()  # before uvicorn reads a pipelined request, which cancels it
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._forget_head()
            super().connection_lost(exc)

    return GuardedH11Protocol


async def _over_capacity(app, scope, receive, send) -> None:
    scope[OVER_CAPACITY] = True  # the app's _Gate answers 503
    await app(scope, receive, send)


def make_server(app, **uvicorn_kwargs):
    """A uvicorn server for an app of create_app's, with the connection limits of its ServeConfig, and a
    graceful shutdown: new requests answer 503 at once, those in flight get shutdown_grace_s to finish, then
    the engine's thread ends the rest (a stream with an error event and `data: [DONE]`) before uvicorn closes
    the connections. uvicorn_kwargs go to uvicorn.Config (log_level, access_log...)."""
    import uvicorn

    if not hasattr(app.state, "worker"):  # an app without an engine (labkit.serving.router's): plain uvicorn
        return uvicorn.Server(uvicorn.Config(app, lifespan="on", **uvicorn_kwargs))
    config: ServeConfig = app.state.config
    worker: EngineWorker = app.state.worker

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            worker.drain()  # the sockets still listen, so a new request gets a 503, not a refused connection
            deadline = time.monotonic() + config.shutdown_grace_s
            while worker.has_work and time.monotonic() < deadline and not self.force_exit:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(worker.stop)
            await super().shutdown(sockets)

    return DrainingServer(uvicorn.Config(
        app, http=_h11_protocol(config), lifespan="on", timeout_keep_alive=config.keep_alive_timeout_s,
        timeout_graceful_shutdown=SHUTDOWN_FLUSH_S, **uvicorn_kwargs))


class ServerThread:
    """Serve an app of create_app's with uvicorn on a background thread (tests, notebooks):
    `with ServerThread(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = make_server(app, log_level=log_level)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="labkit-serve-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    from labkit.engine.engine import Engine, EngineConfig
    from labkit.model.llama import SUPPORTED_ARCHITECTURES, UnsupportedArchitecture

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    config = ServeConfig(served_model_name=args.served_model_name, max_queue=args.max_queue, api_key=api_key,
                         max_body_bytes=args.max_body_bytes, max_queue_wait_s=args.max_queue_wait,
                         default_max_tokens=args.default_max_tokens, max_connections=args.max_connections,
                         header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                         keep_alive_timeout_s=args.timeout_keep_alive,
                         shutdown_grace_s=args.timeout_graceful_shutdown, check_host=args.check_host)
    engine_config = EngineConfig.from_kwargs(max_num_seqs=args.max_num_seqs,
                                             max_num_batched_tokens=args.max_num_batched_tokens,
                                             kv_cache_mb=args.kv_cache_mb)
    sock = bind_socket(args.host, args.port)  # fail fast, before loading a model
    try:
        try:
            engine = Engine.load(args.model, device=args.device, dtype=args.dtype, dummy=args.dummy,
                                 config=engine_config)
        except UnsupportedArchitecture as exc:
            # its advice, "--engine hf", is an option of `labkit baseline`: the server has one engine, ours
            reason, supported = str(exc).split("; use ")[0], ", ".join(SUPPORTED_ARCHITECTURES)
            if supported not in reason:
                reason += f" (the labkit engine runs {supported} models)"
            raise ValueError(f"{reason}. labkit serve has no other engine: `labkit baseline --engine hf --model "
                             f"{args.model}` runs this model with transformers") from None
        app = create_app(engine, config)
        host, port = sock.getsockname()[:2]
        print(f"labkit serve: {config.served_model_name or engine.name} on http://{host}:{port} "
              f"(device {engine.device}, batch of up to {engine_config.scheduler.max_num_seqs}, "
              f"{engine.blocks.num_blocks} KV blocks of {engine_config.block_size} tokens, "
              f"max queue {config.max_queue}, {'API key required' if api_key else 'no API key'})",
              file=sys.stderr, flush=True)
        if not api_key and not is_loopback(server_url(host, port)):
            print(f"labkit serve: warning: {host} accepts other machines and no API key is set "
                  f"(--api-key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
        server = make_server(app, log_level=args.log_level, access_log=args.log_level == "debug")
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler it found:
        # make that handler a no-op, so a requested stop exits 0 instead of as an interrupt.
        stops: list[int] = []
        handlers = {sig: signal.signal(sig, lambda signum, frame: stops.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    finally:
        sock.close()
    if stops:
        print(f"labkit serve: stopped by {signal.Signals(stops[0]).name}", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `labkit serve` on the CLI's subparsers."""
    from labkit.cli.arguments import non_negative_int, port, positive_float, positive_int
    from labkit.engine.engine import EngineConfig

    engine_defaults = EngineConfig().scheduler
    parser = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server over the labkit engine",
        description="Serve a model over OpenAI's HTTP API: /v1/completions, /v1/chat/completions (streaming as\n"
                    "server-sent events), /v1/models, /health and /metrics (Prometheus). Concurrent requests are\n"
                    "decoded together (continuous batching): up to --max-num-seqs run in each step, up to\n"
                    "--max-queue more wait for a place, and more are answered 429.",
        epilog="examples:\n"
               "  labkit serve                                   # the embedded SmolLM2 on 127.0.0.1:8000\n"
               "  labkit serve --model tiny-smollm2 --dummy --port 0\n"
               "  labkit serve --max-num-seqs 32 --kv-cache-mb 1024 --max-queue-wait 30\n"
               f"  {API_KEY_ENV}=secret labkit serve --host 0.0.0.0   # other hosts: require a key",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="embedded name, HF hub id or local path; with --dummy a preset (default: %(default)s)")
    parser.add_argument("--dummy", action="store_true", help="random weights of a preset shape (tests)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: %(default)s)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16, auto (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=port, default=8000,
                        help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=engine_defaults.max_num_seqs,
                        help="requests decoded together in one step (default: %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=positive_int,
                        default=engine_defaults.max_num_batched_tokens,
                        help="new tokens in one step; longer prompts are prefilled in chunks (default: %(default)s)")
    parser.add_argument("--kv-cache-mb", type=positive_float, default=None, metavar="MIB",
                        help="KV-cache size (default: 512 MiB on a CPU, 40%% of the free memory on a GPU)")
    parser.add_argument("--max-queue", type=non_negative_int, default=64,
                        help="requests that may wait for a place in the batch (default: %(default)s)")
    parser.add_argument("--max-queue-wait", type=positive_float, default=DEFAULT_MAX_QUEUE_WAIT_S,
                        metavar="SECONDS", help="a request still waiting after this long is answered 503 with "
                                                "Retry-After (default: %(default)s)")
    parser.add_argument("--default-max-tokens", type=positive_int, default=DEFAULT_CHAT_MAX_TOKENS,
                        help="reply length of a chat request without max_tokens, at most what the context "
                             "leaves (default: %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies are answered 413 (default: %(default)s)")
    parser.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open connections; a request on one more is answered 503 (default: %(default)s)")
    parser.add_argument("--header-timeout", type=positive_float, default=DEFAULT_HEADER_TIMEOUT_S, metavar="SECONDS",
                        help="a connection that has not sent a whole request head this long after opening, or "
                             "after its last response, is closed (default: %(default)s)")
    parser.add_argument("--body-timeout", type=positive_float, default=DEFAULT_BODY_TIMEOUT_S, metavar="SECONDS",
                        help="a request body not received within this long is answered 408 (default: %(default)s)")
    parser.add_argument("--timeout-keep-alive", type=positive_float, default=DEFAULT_KEEP_ALIVE_TIMEOUT_S,
                        metavar="SECONDS", help="an idle connection between requests is closed after this long "
                                                "(default: %(default)s)")
    parser.add_argument("--timeout-graceful-shutdown", type=positive_float, default=DEFAULT_SHUTDOWN_GRACE_S,
                        metavar="SECONDS", help="on SIGTERM or Ctrl-C, new requests are answered 503 and those in "
                                                "flight get this long to finish; then each open stream ends with "
                                                "an error event and [DONE] (default: %(default)s)")
    parser.add_argument("--check-host", action=argparse.BooleanOptionalAction, default=True,
                        help="answer 400 to a request over loopback whose Host is not localhost, 127.0.0.1 or [::1] "
                             "(DNS rebinding); --no-check-host behind a local proxy that keeps the public Host "
                             "(default: on)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default: %(default)s)")
    parser.set_defaults(func=cmd_serve)
    return parser


__all__ = ["ServeConfig", "EngineWorker", "Job", "create_app", "error_response", "make_server",
           "ServerThread", "bind_socket", "cmd_serve", "add_parser"]
