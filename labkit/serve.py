"""`labkit serve`: an OpenAI-compatible HTTP server over the labkit engine (FastAPI + uvicorn).

Routes: /v1/completions, /v1/chat/completions (streaming as server-sent events), /v1/models, /health, /metrics.
The engine has one KV cache, so one worker thread runs generations one at a time from a bounded queue
(like nano-vllm's scheduler with a batch of one); a full queue answers 429 instead of growing without bound.
Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}` and never take the server down.
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
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from starlette.responses import Response

from labkit.sampling import SamplingParams

logger = logging.getLogger("labkit.serve")

API_KEY_ENV = "LABKIT_API_KEY"
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Histogram buckets in seconds (vLLM's, so dashboards built for it read these too).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS_S = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)

# Parameters OpenAI defines that labkit accepts only at their no-op value: anything else is a named 400.
NO_OP_PARAMS: dict[str, tuple] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "min_tokens": (None, 0),
}
COMMON_PARAMS = {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                 "top_k", "seed", "stop", "ignore_eos", "user", "return_token_ids", *NO_OP_PARAMS}
COMPLETION_PARAMS = COMMON_PARAMS | {"prompt"}
CHAT_PARAMS = COMMON_PARAMS | {"messages"}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered with OpenAI's error body and an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# -- configuration -------------------------------------------------------------------------------------------
@dataclass
class ServeConfig:
    """How the server answers: its model name, queue bound, key and body limit; validated on creation."""

    served_model_name: str | None = None  # None: the engine's name
    max_queue: int = 64  # requests waiting behind the running one; one more answers 429
    api_key: str | None = None  # None: /v1 routes are open
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self):
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) \
                or self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be an integer >= 1, got {self.max_body_bytes!r}")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None")
        if self.served_model_name is not None and not (isinstance(self.served_model_name, str)
                                                       and self.served_model_name.strip()):
            raise ValueError(f"served_model_name must be a non-empty string, got {self.served_model_name!r}")


# -- metrics (Prometheus text exposition, format 0.0.4) ------------------------------------------------------
class Histogram:
    """A cumulative-bucket histogram; not thread-safe on its own (ServerMetrics holds the lock)."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        out += [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """Counters and histograms of one server; updated from the event loop and the worker thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (route, status) -> count
        self.accepted = 0  # generations queued; each ends once in `finished`
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: collections.Counter = collections.Counter()  # finish reason -> count
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.itl = Histogram(ITL_BUCKETS_S)
        self.e2e = Histogram(E2E_BUCKETS_S)
        self.queue_time = Histogram(E2E_BUCKETS_S)

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def count_accepted(self) -> None:
        with self._lock:
            self.accepted += 1

    def observe_first_token(self, queue_s: float, ttft_s: float, num_prompt_tokens: int) -> None:
        with self._lock:
            self.queue_time.observe(queue_s)
            self.ttft.observe(ttft_s)
            self.prompt_tokens += num_prompt_tokens

    def observe_tokens(self, num_tokens: int, gap_s: float | None) -> None:
        """num_tokens arrived together after gap_s: one ITL sample of gap_s / num_tokens per token."""
        with self._lock:
            self.generation_tokens += num_tokens
            if gap_s is not None:
                for _ in range(num_tokens):
                    self.itl.observe(gap_s / num_tokens)

    def observe_finished(self, reason: str, e2e_s: float) -> None:
        with self._lock:
            self.finished[reason] += 1
            self.e2e.observe(e2e_s)

    def render(self, queue_depth: int, num_running: int, model: str) -> str:
        """The Prometheus text exposition of every metric."""
        m = f'model="{_label(model)}"'
        with self._lock:
            lines = ["# HELP labkit_requests_total HTTP requests answered, by route and status code.",
                     "# TYPE labkit_requests_total counter"]
            for (route, status), count in sorted(self.requests.items()):
                lines.append(f'labkit_requests_total{{route="{_label(route)}",status="{status}"}} {count}')
            lines += ["# HELP labkit_requests_accepted_total Generations accepted into the queue.",
                      "# TYPE labkit_requests_accepted_total counter",
                      f"labkit_requests_accepted_total{{{m}}} {self.accepted}"]
            lines += ["# HELP labkit_request_finished_total Generations ended, by reason (stop, length, "
                      "cancelled, error).", "# TYPE labkit_request_finished_total counter"]
            for reason, count in sorted(self.finished.items()):
                lines.append(f'labkit_request_finished_total{{{m},reason="{_label(reason)}"}} {count}')
            lines += ["# HELP labkit_prompt_tokens_total Prompt tokens prefilled.",
                      "# TYPE labkit_prompt_tokens_total counter",
                      f"labkit_prompt_tokens_total{{{m}}} {self.prompt_tokens}",
                      "# HELP labkit_generation_tokens_total Tokens generated.",
                      "# TYPE labkit_generation_tokens_total counter",
                      f"labkit_generation_tokens_total{{{m}}} {self.generation_tokens}",
                      "# HELP labkit_queue_depth Requests waiting for the worker.",
                      "# TYPE labkit_queue_depth gauge",
                      f"labkit_queue_depth{{{m}}} {queue_depth}",
                      "# HELP labkit_requests_running Generations running on the worker (0 or 1).",
                      "# TYPE labkit_requests_running gauge",
                      f"labkit_requests_running{{{m}}} {num_running}"]
            for name, hist, help_text in (
                    ("labkit_time_to_first_token_seconds", self.ttft, "From request accepted to first token."),
                    ("labkit_inter_token_latency_seconds", self.itl,
                     "Between tokens; tokens released together share their gap."),
                    ("labkit_e2e_request_latency_seconds", self.e2e, "From request accepted to last token."),
                    ("labkit_request_queue_time_seconds", self.queue_time, "Waiting for the worker.")):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                lines += [line.replace("{", "{" + m + ",", 1) if "{" in line else
                          line.replace(" ", f"{{{m}}} ", 1) for line in hist.lines(name)]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# -- the worker: one generation at a time ---------------------------------------------------------------------
_END = object()  # pushed once when a job's generation is over


@dataclass(eq=False)
class Job:
    """One accepted request: what to generate and where its deltas go (an asyncio queue on the server's loop)."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    accepted_s: float = field(default_factory=time.perf_counter)
    is_done: bool = False  # set on the loop when _END was received

    def push(self, item) -> None:
        """From the worker thread: hand an item to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()


class QueueFull(Exception):
    """The bounded queue has no room."""


class GenerationWorker:
    """Runs jobs one at a time on a daemon thread, from a bounded FIFO (the engine is not thread-safe)."""

    def __init__(self, engine, max_queue: int, metrics: ServerMetrics):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # called from the event loop
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="labkit-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel the running job and every waiting one, then join the thread."""
        with self._cond:
            self._stopping = True
            waiting, self._pending = list(self._pending), collections.deque()
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        for job in waiting:
            job.push(APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))
            job.push(_END)
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping or not self.is_alive:
                raise APIError(503, "the generation worker is not running", type="server_error",
                               code="worker_unavailable")
            if len(self._pending) >= self.max_queue and (self._running is not None or self._pending):
                raise QueueFull()
            self._pending.append(job)
            self._cond.notify()
        self.metrics.count_accepted()

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or ask the running one to stop at its next token."""
        with self._cond:
            try:
                self._pending.remove(job)
                was_waiting = True
            except ValueError:
                was_waiting = False
            job.cancelled.set()
        if was_waiting:
            self.metrics.observe_finished("cancelled", time.perf_counter() - job.accepted_s)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def num_running(self) -> int:
        with self._cond:
            return int(self._running is not None)

    # the worker thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self._running = job
            try:
                self._generate(job)
            finally:
                with self._cond:
                    self._running = None
                job.push(_END)

    def _generate(self, job: Job) -> None:
        if job.cancelled.is_set():  # cancelled between leaving the queue and starting
            self.metrics.observe_finished("cancelled", time.perf_counter() - job.accepted_s)
            return
        reason = "error"
        started = time.perf_counter()
        last: float | None = None
        stream = None
        try:
            stream = self.engine.stream_text(job.prompt_ids, job.params)
            reason = "cancelled"
            for delta in stream:
                now = time.perf_counter()
                if delta.token_ids:
                    if last is None:
                        self.metrics.observe_first_token(started - job.accepted_s, now - job.accepted_s,
                                                         len(job.prompt_ids))
                        # tokens released with the first one arrived with it: no gap of their own
                        self.metrics.observe_tokens(1, None)
                        if len(delta.token_ids) > 1:
                            self.metrics.observe_tokens(len(delta.token_ids) - 1, 0.0)
                    else:
                        self.metrics.observe_tokens(len(delta.token_ids), now - last)
                    last = now
                if job.cancelled.is_set():
                    break
                job.push(delta)
                if delta.finish_reason is not None:
                    reason = delta.finish_reason
        except Exception as exc:  # a failed generation answers its own request; the worker lives on
            logger.exception("generation failed")
            reason = "error"
            job.push(APIError(500, f"generation failed: {exc}", type="server_error", code="generation_failed"))
        finally:
            if stream is not None:
                stream.close()  # stops the decode loop when the client went away
            self.metrics.observe_finished(reason, time.perf_counter() - job.accepted_s)


# -- request parsing -----------------------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    """A validated completion or chat request."""

    prompt_ids: list[int]
    params: SamplingParams
    is_stream: bool
    include_usage: bool
    return_token_ids: bool


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_no_op(value, no_ops: tuple) -> bool:
    for no_op in no_ops:
        if no_op is None or isinstance(no_op, bool):
            if value is no_op:  # False must not match 0, nor None match a missing dict
                return True
        elif isinstance(no_op, (int, float)):
            if _is_number(value) and value == no_op:
                return True
        elif value == no_op:
            return True
    return False


def _check_known(body: Mapping, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise _bad(f"Unrecognized request argument supplied: {name}", param=name, code="unsupported_parameter")
    for name, no_ops in NO_OP_PARAMS.items():
        if name in body and not _is_no_op(body[name], no_ops):
            raise _bad(f"{name}={json.dumps(body[name])} is not supported by labkit serve "
                       f"(accepted: {' or '.join(json.dumps(v) for v in no_ops)})", param=name,
                       code="unsupported_parameter")


def _completion_prompt(body: Mapping, tokenizer, vocab_size: int) -> list[int]:
    if "prompt" not in body:
        raise _bad("prompt is required", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    # OpenAI accepts a string, a list of one string, token ids, or a list of one token-id list
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad(f"a batch of {len(prompt)} prompts is not supported: send one prompt per request",
                   param="prompt", code="unsupported_parameter")
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt must not be empty", param="prompt")
        from labkit.generation import encode_prompt

        ids = encode_prompt(tokenizer, prompt)
    elif isinstance(prompt, list):
        if not prompt:
            raise _bad("prompt must not be empty", param="prompt")
        if not all(_is_int(t) and 0 <= t < vocab_size for t in prompt):
            raise _bad(f"token-id prompts must hold integers in [0, {vocab_size})", param="prompt")
        ids = list(prompt)
    else:
        raise _bad("prompt must be a string, a list of token ids, or a list of one of those", param="prompt")
    if not ids:
        raise _bad("prompt must not be empty (it encodes to no tokens)", param="prompt")
    return ids


def _chat_prompt(body: Mapping, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", param="messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise _bad(f"messages[{i}] needs a role among {', '.join(CHAT_ROLES)}", param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content",
                           code="unsupported_parameter")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts",
                       param=f"messages[{i}].content")
        extra = set(message) - {"role", "content"}
        if extra:
            raise _bad(f"messages[{i}]: unsupported field(s) {', '.join(sorted(extra))}", param=f"messages[{i}]",
                       code="unsupported_parameter")
        plain.append({"role": CHAT_ROLES[message["role"]], "content": content})
    from labkit.generation import encode_prompt

    try:
        return encode_prompt(tokenizer, plain, chat=True)
    except Exception as exc:  # a template may reject an order of roles: that is the request's fault
        raise _bad(f"the chat template rejected these messages: {exc}", param="messages") from None


def parse_generation_request(body: Mapping, *, is_chat: bool, tokenizer, eos_token_ids: Sequence[int],
                             max_seq_len: int, vocab_size: int) -> GenerationRequest:
    """Validate an OpenAI request body into token ids and SamplingParams; raise APIError(400) naming the field."""
    _check_known(body, CHAT_PARAMS if is_chat else COMPLETION_PARAMS)
    prompt_param = "messages" if is_chat else "prompt"
    prompt_ids = _chat_prompt(body, tokenizer) if is_chat else _completion_prompt(body, tokenizer, vocab_size)

    is_stream = body.get("stream", False)
    if is_stream is None:
        is_stream = False
    if not isinstance(is_stream, bool):
        raise _bad("stream must be a boolean", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not is_stream:
            raise _bad("stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options supports only include_usage", param="stream_options",
                       code="unsupported_parameter")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage must be a boolean", param="stream_options.include_usage")

    room = max_seq_len - len(prompt_ids)
    if room < 1:
        raise _bad(f"the prompt has {len(prompt_ids)} tokens, which leaves no room in the model's context of "
                   f"{max_seq_len} tokens", param=prompt_param, code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = room if is_chat else min(DEFAULT_COMPLETION_MAX_TOKENS, room)
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise _bad(f"{name} must be an integer >= 1, got {json.dumps(max_tokens)}", param=name)
    elif max_tokens > room:
        raise _bad(f"the prompt ({len(prompt_ids)} tokens) + {name} ({max_tokens}) exceeds the model's context of "
                   f"{max_seq_len} tokens", param=name, code="context_length_exceeded")

    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature < float("inf"):
        raise _bad(f"temperature must be a number >= 0, got {json.dumps(temperature)}", param="temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad(f"top_p must be in (0, 1], got {json.dumps(top_p)}", param="top_p")
    top_k = body.get("top_k")
    top_k = 0 if top_k is None or top_k == -1 else top_k  # vLLM spells "off" as -1
    if not _is_int(top_k) or top_k < 0:
        raise _bad(f"top_k must be an integer >= 1, or -1 or 0 for off, got {json.dumps(body.get('top_k'))}",
                   param="top_k")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise _bad(f"seed must be an integer in [0, 2**63), got {json.dumps(seed)}", param="seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop must be a non-empty string or a list of non-empty strings", param="stop")
    flags = {}
    for flag in ("ignore_eos", "return_token_ids"):
        value = body.get(flag)
        if value is not None and not isinstance(value, bool):
            raise _bad(f"{flag} must be a boolean", param=flag)
        flags[flag] = bool(value)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user must be a string", param="user")
    try:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_k=top_k,
                                top_p=float(top_p), seed=seed, stop=tuple(stop), stop_token_ids=tuple(eos_token_ids),
                                ignore_eos=flags["ignore_eos"])
    except ValueError as exc:  # the checks above should make this unreachable; never a 500 for bad input
        raise _bad(str(exc)) from None
    return GenerationRequest(prompt_ids, params, is_stream, include_usage, flags["return_token_ids"])


# -- the app -------------------------------------------------------------------------------------------------
class _StreamingResponse(Response):
    """Server-sent events that stop, and cancel their generation, as soon as the client disconnects.

    Starlette's StreamingResponse notices a disconnect only on its next send under ASGI spec >= 2.4; a request
    still waiting in the queue sends nothing, so this one always listens for `http.disconnect`.
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
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
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


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


def create_app(engine, config: ServeConfig | None = None, **kwargs):
    """The FastAPI app over one engine; kwargs are ServeConfig fields. Serve it with uvicorn or ServerThread."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if config is None:
        config = ServeConfig(**kwargs)
    elif kwargs:
        raise ValueError("pass a ServeConfig or keyword arguments, not both")
    if engine.tokenizer is None:
        raise ValueError("labkit serve needs an engine with a tokenizer")
    model_name = config.served_model_name or engine.name
    metrics = ServerMetrics()
    worker = GenerationWorker(engine, config.max_queue, metrics)
    # The worker thread decodes with the engine's tokenizer; the loop gets its own copy, since a fast tokenizer
    # shared across threads can fail with "Already borrowed".
    tokenizer = copy.deepcopy(engine.tokenizer)
    vocab_size = engine.model.args.vocab_size
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="labkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        error = APIError(exc.status_code, str(exc.detail), param=None,
                         code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error")
        error = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    async def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length", "")
        too_big = APIError(413, f"request body over {config.max_body_bytes} bytes", code="request_too_large")
        if length.isdigit() and int(length) > config.max_body_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise too_big
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise _bad("the body must be a JSON object", code="invalid_json")
        return data

    def check_model(body: Mapping) -> None:
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"The model `{model}` does not exist: this server serves `{model_name}`",
                           param="model", code="model_not_found")

    async def generate(request: Request, is_chat: bool):
        await check_key(request)
        body = await read_json(request)
        check_model(body)
        req = parse_generation_request(body, is_chat=is_chat, tokenizer=tokenizer,
                                       eos_token_ids=engine.eos_token_ids, max_seq_len=engine.max_seq_len,
                                       vocab_size=vocab_size)
        job = Job(req.prompt_ids, req.params, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy: {config.max_queue} requests are already waiting",
                           type="rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}) from None
        kind = "chat.completion" if is_chat else "text_completion"
        ident = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.is_stream:
            events = _stream_events(job, req, ident, kind, is_chat)
            return _StreamingResponse(events, on_disconnect=partial(worker.cancel, job))
        return await _complete(request, job, req, ident, kind, is_chat)

    async def _deltas(job: Job):
        """The job's TextDeltas until its end; an APIError item is raised."""
        while True:
            item = await job.out.get()
            if item is _END:
                job.is_done = True
                return
            if isinstance(item, APIError):
                raise item
            yield item

    async def _stream_events(job: Job, req: GenerationRequest, ident: str, kind: str, is_chat: bool):
        head = {"id": ident, "object": f"{kind}.chunk" if is_chat else kind, "created": int(time.time()),
                "model": model_name}
        extra = {"usage": None} if req.include_usage else {}

        def chunk(text: str | None, finish: str | None, token_ids: list[int] | None) -> str:
            choice = {"index": 0}
            if is_chat:
                choice["delta"] = {} if text is None else {"content": text}
            else:
                choice["text"] = text or ""
            choice.update(logprobs=None, finish_reason=finish)
            if req.return_token_ids and token_ids is not None:
                choice["token_ids"] = token_ids
            return _sse({**head, "choices": [choice], **extra})

        num_tokens = 0
        try:
            if is_chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
                yield _sse({**head, "choices": [first], **extra})
            try:
                async for delta in _deltas(job):
                    num_tokens += len(delta.token_ids)
                    if delta.text or delta.token_ids or delta.finish_reason:
                        text = delta.text if delta.text or not is_chat else None
                        yield chunk(text, delta.finish_reason, list(delta.token_ids))
            except APIError as exc:
                yield _sse(exc.body())  # the openai client raises an APIError on this event
            else:
                if req.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(len(job.prompt_ids), num_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            if not job.is_done:  # the client left (or the server is closing): free the worker
                worker.cancel(job)

    async def _complete(request: Request, job: Job, req: GenerationRequest, ident: str, kind: str, is_chat: bool):
        import anyio

        text, token_ids, finish = [], [], "length"
        failure: list[APIError] = []

        async def collect(group) -> None:
            nonlocal finish
            try:
                async for delta in _deltas(job):
                    text.append(delta.text)
                    token_ids.extend(delta.token_ids)
                    finish = delta.finish_reason or finish
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
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        choice = {"index": 0}
        if is_chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        choice.update(logprobs=None, finish_reason=finish)
        if req.return_token_ids:
            choice["token_ids"] = token_ids
        return {"id": ident, "object": kind, "created": int(time.time()), "model": model_name,
                "choices": [choice], "usage": _usage(len(job.prompt_ids), len(token_ids))}

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
        state = {"status": "ok" if worker.is_alive else "unhealthy", "model": model_name,
                 "queue_depth": worker.queue_depth, "num_running": worker.num_running}
        return JSONResponse(state, status_code=200 if worker.is_alive else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        text = metrics.render(worker.queue_depth, worker.num_running, model_name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_CountRequests, metrics=metrics, routes={r.path for r in app.routes if hasattr(r, "path")})
    return app


class _CountRequests:
    """ASGI middleware: count every HTTP response by route and status (route "other" for unknown paths)."""

    def __init__(self, app, metrics: ServerMetrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in self.routes else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


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


class ServerThread:
    """Serve an app with uvicorn on a background thread (tests, notebooks): `with ServerThread(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                                                    lifespan="on"))
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
    import uvicorn

    from labkit.generation import Engine

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    config = ServeConfig(served_model_name=args.served_model_name, max_queue=args.max_queue, api_key=api_key,
                         max_body_bytes=args.max_body_bytes)
    sock = bind_socket(args.host, args.port)  # fail fast, before loading a model
    try:
        engine = Engine.load(args.model, device=args.device, dtype=args.dtype, dummy=args.dummy)
        app = create_app(engine, config)
        host, port = sock.getsockname()[:2]
        print(f"labkit serve: {config.served_model_name or engine.name} on http://{host}:{port} "
              f"(device {engine.device}, max queue {config.max_queue}, "
              f"{'API key required' if api_key else 'no API key'})", file=sys.stderr, flush=True)
        if not api_key and host not in ("127.0.0.1", "::1", "localhost"):
            print(f"labkit serve: warning: {host} accepts other machines and no API key is set "
                  f"(--api-key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                                               access_log=args.log_level == "debug"))
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
    from labkit.arguments import non_negative_int, port, positive_int

    parser = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server over the labkit engine",
        description="Serve a model over OpenAI's HTTP API: /v1/completions, /v1/chat/completions (streaming as\n"
                    "server-sent events), /v1/models, /health and /metrics (Prometheus). One generation runs at\n"
                    "a time; up to --max-queue requests wait, and more are answered 429.",
        epilog="examples:\n"
               "  labkit serve                                   # the embedded SmolLM2 on 127.0.0.1:8000\n"
               "  labkit serve --model tiny-smollm2 --dummy --port 0\n"
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
    parser.add_argument("--max-queue", type=non_negative_int, default=64,
                        help="requests that may wait behind the running one (default: %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies are answered 413 (default: %(default)s)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default: %(default)s)")
    parser.set_defaults(func=cmd_serve)
    return parser


__all__ = ["APIError", "ServeConfig", "ServerMetrics", "GenerationWorker", "GenerationRequest",
           "parse_generation_request", "create_app", "ServerThread", "bind_socket", "cmd_serve", "add_parser"]
