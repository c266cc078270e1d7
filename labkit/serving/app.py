"""The FastAPI app of `labkit serve`: OpenAI's routes over one engine's worker.

Routes: /v1/completions, /v1/chat/completions (streaming as server-sent events), /v1/models, /health, /metrics.
Requests are validated by `labkit.serving.protocol`, run on the engine's thread (`labkit.serving.worker`),
answered with `labkit.serving.responses`' bodies; HTTP limits and refusals are `labkit.serving.http_limits`',
the Prometheus page `labkit.serving.metrics`'. Prompts are tokenized on a thread of their own, never on the
event loop. Errors never take the server down.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose `Request` it must resolve.
import asyncio
import copy
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from labkit.serving.choices import Choices, LogprobView, best
from labkit.serving.config import ServeConfig
from labkit.serving.events import DONE_EVENT, sse
from labkit.serving.http_limits import Gate, error_response, read_json_body
from labkit.serving.metrics import ServerMetrics
from labkit.serving.protocol import APIError, GenerationRequest, parse_generation_request, parse_json_object
from labkit.serving.responses import Reply, TokenTexts
from labkit.serving.server_info import CARD_FIELD
from labkit.serving.worker import EngineWorker, Job, QueueFull

logger = logging.getLogger("labkit.serving.server")


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


class _Routes:
    """The routes of one server: its engine's worker, model name, key and limits, and the tokenizer's thread."""

    def __init__(self, engine, config: ServeConfig, model_name: str, worker: EngineWorker, metrics: ServerMetrics):
        self.engine, self.config, self.model_name = engine, config, model_name
        self.worker, self.metrics = worker, metrics
        # Prompts are tokenized (and chat templates rendered) on one thread of their own: a megabyte of prompt
        # takes a fraction of a second, which would stall every other request on the event loop. The engine's
        # thread detokenizes with the engine's tokenizer; this thread gets its own copy, since a fast tokenizer
        # shared across threads can fail with "Already borrowed".
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.tokenizer_pool: list[ThreadPoolExecutor] = []  # while the app is served
        self.vocab_size = engine.model.args.vocab_size
        self.token_texts = TokenTexts(copy.deepcopy(engine.tokenizer))  # logprobs' token strings, on the event loop
        self.created = int(time.time())
        self.settings = engine.describe()  # the model card's extra field (labkit.serving.server_info)

    @asynccontextmanager
    async def lifespan(self, app):
        self.tokenizer_pool.append(ThreadPoolExecutor(1, thread_name_prefix="labkit-serve-tokenizer"))
        self.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.worker.stop)
            self.tokenizer_pool.pop().shutdown(wait=False, cancel_futures=True)

    def check_key(self, request: Request) -> None:
        api_key = self.config.api_key
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, body: Mapping) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist: this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    async def generate(self, request: Request, is_chat: bool):
        self.check_key(request)
        body = parse_json_object(await read_json_body(request, self.config.max_body_bytes,
                                                      self.config.body_timeout_s))
        self.check_model(body)
        engine = self.engine
        parse = partial(parse_generation_request, body, is_chat=is_chat, tokenizer=self.tokenizer,
                        eos_token_ids=engine.eos_token_ids, max_seq_len=engine.max_seq_len,
                        vocab_size=self.vocab_size, default_max_tokens=self.config.default_max_tokens)
        req = await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool[0], parse)
        choices = Choices(req, asyncio.get_running_loop(), self.submit, self.worker.cancel)
        reply = Reply(self.model_name, is_chat, req.return_token_ids, req.include_usage,
                      prompt_token_ids=req.prompt_ids)
        view = LogprobView(req, self.token_texts, req.prompt_text)
        if req.is_stream:
            return _StreamingResponse(self.stream_events(choices, req, reply, view), on_disconnect=choices.cancel)
        return await self.complete(request, choices, reply, view)

    def submit(self, job: Job) -> None:
        """Hand a job to the engine's worker; 429 when its queue is full."""
        try:
            self.worker.submit(job)
        except QueueFull:
            limits = f"{self.engine.config.scheduler.max_num_seqs} running and {self.config.max_queue} waiting"
            raise APIError(429, f"the server is busy: {limits}, its limits, are taken",
                           type="rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}) from None

    async def stream_events(self, choices: Choices, req: GenerationRequest, reply: Reply, view: LogprobView):
        outputs = choices.outputs()
        try:
            item = await anext(outputs, None)  # an error before this is answered with its own status
            if reply.is_chat:
                for event in reply.role_events(req.n):
                    yield event
            try:
                while item is not None:
                    choice, out = item
                    text, logprobs = view.delta(choice, out)
                    if text or out.new_token_ids or out.finished:
                        yield reply.delta_event(text, out.finish_reason, out.new_token_ids, choice.index, logprobs)
                    item = await anext(outputs, None)
            except APIError as exc:
                yield sse(exc.body())  # the openai client raises an APIError on this event
            else:
                if req.include_usage:
                    yield reply.usage_event(choices.num_prompt_tokens, choices.num_completion_tokens)
            yield DONE_EVENT
        finally:
            await outputs.aclose()
            choices.cancel()  # the client left (or the server is closing): free their places in the batch

    async def complete(self, request: Request, choices: Choices, reply: Reply, view: LogprobView) -> dict:
        import anyio

        failure: list[APIError] = []

        async def collect(group) -> None:
            try:
                async for _ in choices.outputs():
                    pass
            except APIError as exc:
                failure.append(exc)
            group.cancel_scope.cancel()

        async def watch(group) -> None:  # a client that hangs up cancels its generation
            while (await request.receive())["type"] != "http.disconnect":
                pass
            choices.cancel()
            group.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(collect, group)
                group.start_soon(watch, group)
        finally:
            choices.cancel()
        if failure:
            raise failure[0]
        if not choices.is_done:
            raise APIError(499, "client closed the request")
        picked = []
        for index, choice in enumerate(best(choices.choices, choices.req.n)):
            text, logprobs = view.whole(choice)
            picked.append(reply.choice(index, text, choice.finish_reason, choice.token_ids, logprobs))
        return reply.responses(picked, choices.num_prompt_tokens, choices.num_completion_tokens)

    async def completions(self, request: Request):
        return await self.generate(request, is_chat=False)

    async def chat_completions(self, request: Request):
        return await self.generate(request, is_chat=True)

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "labkit",
                "root": self.engine.name, "max_model_len": self.engine.max_seq_len, CARD_FIELD: self.settings}

    async def models(self, request: Request):
        self.check_key(request)
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, request: Request, model: str):
        self.check_key(request)
        self.check_model({"model": model})
        return self.model_card()

    async def health(self):
        num_waiting, stats = self.worker.snapshot()
        worker = self.worker
        status = "shutting_down" if worker.is_draining else "ok" if worker.is_alive else "unhealthy"
        state = {"status": status, "model": self.model_name,
                 "num_running": stats.num_running, "num_waiting": num_waiting, "queue_depth": num_waiting,
                 "num_kv_blocks_used": stats.num_used_blocks, "num_kv_blocks": stats.num_kv_blocks}
        return JSONResponse(state, status_code=200 if status == "ok" else 503)

    async def prometheus_metrics(self, request: Request):
        page, content_type = self.metrics.render(request.headers.get("accept", ""))
        return Response(page, media_type=content_type)


async def _on_api_error(request: Request, exc: APIError):
    return error_response(exc)


async def _on_http_error(request: Request, exc: StarletteHTTPException):
    return error_response(APIError(exc.status_code, str(exc.detail), param=None,
                                   code="not_found" if exc.status_code == 404 else None,
                                   headers=getattr(exc, "headers", None)))


async def _on_unexpected(request: Request, exc: Exception):
    logger.exception("unhandled error")
    return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


def create_app(engine, config: ServeConfig | None = None, **kwargs) -> FastAPI:
    """The FastAPI app over one engine; kwargs are ServeConfig fields. Serve it with uvicorn or ServerThread."""
    if config is None:
        config = ServeConfig(**kwargs)
    elif kwargs:
        raise ValueError("pass a ServeConfig or keyword arguments, not both")
    if engine.tokenizer is None:
        raise ValueError("labkit serve needs an engine with a tokenizer")
    model_name = config.served_model_name or engine.name
    metrics = ServerMetrics(model_name)
    worker = EngineWorker(engine, metrics, config.max_queue, config.max_queue_wait_s, config.log_iteration_details)
    metrics.watch_engine(worker.snapshot)
    metrics.publish_engine_config(engine.describe())
    metrics.show_techniques(engine.techniques())
    routes = _Routes(engine, config, model_name, worker, metrics)

    app = FastAPI(title="labkit serve", lifespan=routes.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    for method, path, endpoint in (("POST", "/v1/completions", routes.completions),
                                   ("POST", "/v1/chat/completions", routes.chat_completions),
                                   ("GET", "/v1/models", routes.models), ("GET", "/v1/models/{model:path}", routes.model),
                                   ("GET", "/health", routes.health), ("GET", "/metrics", routes.prometheus_metrics)):
        app.add_api_route(path, endpoint, methods=[method])
    app.add_middleware(Gate, metrics=metrics, routes={r.path for r in app.routes if hasattr(r, "path")},
                       max_connections=config.max_connections, check_host=config.check_host)
    return app


__all__ = ["create_app"]
