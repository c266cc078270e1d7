"""The router's FastAPI app: forwards OpenAI requests to the replicas a `Router` picks, retries what a replica
refused before answering, relays streams as they come, and probes replicas that are down.

Bodies are checked as the server checks them (`labkit.serving.http_limits.read_json_body`, a JSON object within
the size limit); errors use OpenAI's error body. A stream's end is read with the one SSE reader
(`labkit.serving.events.SSEReader`): one that ends without `data: [DONE]` was cut off.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose `Request` it must resolve.
import asyncio
import logging
import uuid
from contextlib import aclosing, asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from labkit.serving.events import DONE_EVENT, SSEReader, sse
from labkit.serving.http_limits import error_response, read_json_body
from labkit.serving.protocol import ENDPOINTS, REPLICA_HEADER, APIError, parse_json_object
from labkit.serving.router import REQUEST_ID_HEADER, RETRY_STATUSES, Replica, RequestRecord, Router, prefix_key
from labkit.serving.router_stream import StreamCut, StreamSplice, upstream_body

logger = logging.getLogger("labkit.serving.router")


class _Upstream(Exception):
    """A replica failed before sending the client anything: try another."""


def _forward_headers(request: Request, request_id: str) -> dict:
    headers = {"content-type": "application/json", REQUEST_ID_HEADER: request_id}
    if "authorization" in request.headers:
        headers["authorization"] = request.headers["authorization"]
    return headers


def _answer_headers(replica: Replica, request_id: str) -> dict:
    return {REPLICA_HEADER: str(replica.index), REQUEST_ID_HEADER: request_id}


class _Forwarder:
    """The router's routes over one Router and the HTTP client it holds while served."""

    def __init__(self, router: Router, tokenizer=None):
        self.router, self.config, self.tokenizer = router, router.config, tokenizer
        self.client: httpx.AsyncClient | None = None

    async def probe(self) -> None:
        """Bring replicas that are down back once their /health answers 200."""
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            for replica in self.router.replicas:
                if replica.is_healthy:
                    continue
                try:
                    response = await self.client.get(f"{replica.url}/health", timeout=self.config.connect_timeout_s)
                    if response.status_code == 200:
                        self.router.mark_up(replica)
                except httpx.HTTPError:
                    pass

    @asynccontextmanager
    async def lifespan(self, app):
        timeout = httpx.Timeout(self.config.timeout_s, connect=self.config.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        prober = asyncio.create_task(self.probe())
        try:
            yield
        finally:
            prober.cancel()
            await self.client.aclose()
            self.client = None

    async def open_stream(self, replica: Replica, path: str, raw: bytes, headers: dict):
        """Send the request to a replica and wait for the start of its answer: (response, first bytes, the rest),
        or _Upstream when the replica failed before sending anything the client would see."""
        replica.num_requests += 1
        replica.num_outstanding += 1
        response = None
        try:
            request = self.client.build_request("POST", replica.url + path, content=raw, headers=headers)
            response = await self.client.send(request, stream=True)
            if response.status_code in RETRY_STATUSES:
                body = await response.aread()
                error = f"HTTP {response.status_code}: {body[:200].decode('utf-8', 'replace')}"
                if response.status_code != 429:  # busy is not down; unavailable is, until /health says otherwise
                    self.router.mark_down(replica, error)
                raise _Upstream(error)
            chunks = response.aiter_raw()
            first = b"" if response.status_code != 200 else await anext(chunks, b"")
            if response.status_code == 200 and not response.headers.get("content-type", "").startswith(
                    "text/event-stream"):  # a whole answer: read in full, so one cut off is retried whole
                first += b"".join([chunk async for chunk in chunks])
                chunks = _prepend(b"", _nothing())
            if response.status_code == 200 and not first:
                raise _Upstream("the replica closed the stream before its first event")
            return response, first, chunks
        except (httpx.HTTPError, _Upstream) as exc:
            replica.num_outstanding -= 1
            replica.num_failed += 1
            if response is not None:
                await response.aclose()
            error = f"{type(exc).__name__}: {exc}" if isinstance(exc, httpx.HTTPError) else str(exc)
            if isinstance(exc, httpx.HTTPError):
                self.router.mark_down(replica, error)
            raise _Upstream(error) from None

    async def forward(self, request: Request, path: str):
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        record = RequestRecord(request_id, path)
        self.router.log.append(record)
        try:
            raw = await read_json_body(request, self.config.max_body_bytes)
            body = parse_json_object(raw)
        except APIError as exc:
            record.outcome, record.status = "client_error", exc.status
            raise
        splice = StreamSplice(body, path == ENDPOINTS["chat"], self.tokenizer)
        if splice.is_resumable:
            raw = upstream_body(body)  # the router needs the token ids to resume a cut stream
        headers, key = _forward_headers(request, request_id), prefix_key(body, self.config.prefix_chars)
        errors = []
        for replica in self.router.order(key)[: self.config.max_attempts]:
            record.attempts.append(replica.index)
            try:
                response, first, chunks = await self.open_stream(replica, path, raw, headers)
            except _Upstream as exc:
                errors.append(f"replica {replica.index}: {exc}")
                continue
            record.replica, record.status = replica.index, response.status_code
            is_stream = response.headers.get("content-type", "").startswith("text/event-stream")
            if response.status_code == 200 and is_stream:
                segment = (replica, response, first, chunks)
                return self.answer(replica, record, response, self._spliced(segment, record, splice, headers, key))
            return self.answer(replica, record, response, self._relayed(replica, record, response, first, chunks))
        record.outcome, record.status = "failed", 503
        raise APIError(503, f"no replica could take the request ({'; '.join(errors) or 'none configured'})",
                       type="server_error", code="no_replica", headers={"Retry-After": "1"})

    @staticmethod
    def answer(replica: Replica, record: RequestRecord, response, content) -> StreamingResponse:
        """The client's answer: the replica's status and headers, and the content relayed as it comes."""
        passed = {k: v for k, v in response.headers.items()
                  if k.lower() in ("content-type", "cache-control", "retry-after", "x-accel-buffering")}
        return StreamingResponse(content, status_code=response.status_code,
                                 headers={**passed, **_answer_headers(replica, record.request_id)})

    async def _relayed(self, replica: Replica, record: RequestRecord, response, first: bytes, chunks):
        """A whole answer (a response body, or an error), read in full before it was answered."""
        outcome = "cancelled"  # unless the loop below reaches an end
        try:
            async for chunk in _prepend(first, chunks):
                yield chunk
            outcome = "completed" if response.status_code == 200 else \
                "client_error" if response.status_code < 500 else "failed"
        finally:
            await self._close(replica, record, response, outcome)

    async def _spliced(self, segment, record: RequestRecord, splice: StreamSplice, headers: dict, key: str):
        """The client's one stream over one or more replicas: relayed event by event; a stream cut off is resumed
        on another replica (`StreamSplice`) until it is done, or ends with an error event and [DONE] when no
        replica can carry it on."""
        while segment is not None:
            replica, response, first, chunks = segment
            outcome, error = "cancelled", None  # cancelled unless the segment reaches an end
            try:
                async with aclosing(_events(splice, first, chunks)) as events:
                    async for event in events:
                        yield event
                outcome = "completed" if splice.is_done else "failed"
            except (httpx.HTTPError, StreamCut) as exc:
                outcome, error = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                await self._close(replica, record, response, outcome)
            if outcome == "completed":
                return
            self.router.mark_down(replica, error or "the stream ended without data: [DONE]")
            if splice.finish_reason is not None or (splice.can_resume and splice.num_left <= 0):
                for event in (splice.finish() if splice.finish_reason else splice.end_at_length()):
                    yield event.encode()  # every token was sent before the cut: only the end is missing
                record.outcome = "completed"
                return
            segment = await self.resume(splice, record, headers, key)
            if segment is None:
                error = APIError(502, f"replica {replica.index} failed mid-stream and no replica could resume it",
                                 type="server_error", code="replica_failed")
                yield sse(error.body()).encode()
                yield DONE_EVENT.encode()

    async def resume(self, splice: StreamSplice, record: RequestRecord, headers: dict, key: str):
        """Send a cut stream's continuation to the next replica that takes it: (replica, response, first bytes,
        the rest), or None when the stream cannot be resumed."""
        if not splice.can_resume or splice.num_resumes >= self.config.max_resumes:
            return None
        for replica in self.router.order(key)[: self.config.max_attempts]:
            for with_limit in (True,) if splice.limit is not None else (True, False):
                record.attempts.append(replica.index)
                try:
                    response, first, chunks = await self.open_stream(
                        replica, ENDPOINTS["completions"], splice.resume_body(with_limit), headers)
                except _Upstream:
                    break
                if response.status_code == 200:
                    splice.start_resume()
                    record.replica, record.num_resumes = replica.index, splice.num_resumes
                    return replica, response, first, chunks
                answer = first + b"".join([chunk async for chunk in chunks])
                await self._close(replica, record, response, "client_error")
                is_context = b"context_length_exceeded" in answer
                if not (is_context and with_limit):
                    return None  # the continuation is refused for what it asks: no other replica would take it
        return None

    @staticmethod
    async def _close(replica: Replica, record: RequestRecord, response, outcome: str) -> None:
        """One replica's part of a request is over: its counts, and the request's outcome so far."""
        replica.num_outstanding -= 1
        if outcome == "completed":
            replica.num_completed += 1
        elif outcome == "failed":
            replica.num_failed += 1
        record.outcome = outcome
        await response.aclose()

    async def completions(self, request: Request):
        return await self.forward(request, ENDPOINTS["completions"])

    async def chat_completions(self, request: Request):
        return await self.forward(request, ENDPOINTS["chat"])

    async def models(self, request: Request):
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        for replica in self.router.order(""):
            try:
                response = await self.client.get(f"{replica.url}/v1/models", headers=headers,
                                                 timeout=self.config.connect_timeout_s)
            except httpx.HTTPError as exc:
                self.router.mark_down(replica, f"{type(exc).__name__}: {exc}")
                continue
            return Response(response.content, status_code=response.status_code,
                            media_type=response.headers.get("content-type"))
        raise APIError(503, "no replica answers /v1/models", type="server_error", code="no_replica")

    async def health(self):
        router = self.router
        up = sum(r.is_healthy for r in router.replicas)
        state = {"status": "ok" if up else "unhealthy", "num_replicas": len(router.replicas),
                 "num_healthy": up, "policy": router.policy.name}
        return JSONResponse(state, status_code=200 if up else 503)

    async def stats(self, requests: bool = False):
        return self.router.stats(with_requests=requests)


async def _events(splice: StreamSplice, first: bytes, chunks):
    """The client's events for one replica's stream, until the stream or the client's stream is done."""
    reader = SSEReader()
    async for chunk in _prepend(first, chunks):
        for data in reader.feed(chunk):
            for event in splice.relay(data):
                yield event.encode()
            if splice.is_done:
                return
    for data in reader.close():
        for event in splice.relay(data):
            yield event.encode()


async def _nothing():
    return
    yield


async def _prepend(first: bytes, chunks):
    yield first
    async for chunk in chunks:
        yield chunk


async def _on_api_error(request: Request, exc: APIError):
    return error_response(exc)


def create_router_app(router: Router, tokenizer=None) -> FastAPI:
    """The FastAPI app of a Router; serve it with uvicorn (`labkit.serving.ServerThread` in tests and notebooks).
    With the replicas' tokenizer, the text of a resumed stream is decoded by the router (`router_stream`)."""
    forwarder = _Forwarder(router, tokenizer)
    app = FastAPI(title="labkit router", lifespan=forwarder.lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.router = router
    app.add_exception_handler(APIError, _on_api_error)
    for method, path, endpoint in (("POST", ENDPOINTS["completions"], forwarder.completions),
                                   ("POST", ENDPOINTS["chat"], forwarder.chat_completions),
                                   ("GET", "/v1/models", forwarder.models), ("GET", "/health", forwarder.health),
                                   ("GET", "/router/stats", forwarder.stats)):
        app.add_api_route(path, endpoint, methods=[method])
    return app


__all__ = ["create_router_app"]
