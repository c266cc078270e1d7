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
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from labkit.serving.events import DONE_EVENT, SSEReader, sse
from labkit.serving.http_limits import error_response, read_json_body
from labkit.serving.protocol import ENDPOINTS, REPLICA_HEADER, APIError, parse_json_object
from labkit.serving.router import REQUEST_ID_HEADER, RETRY_STATUSES, Replica, RequestRecord, Router, prefix_key

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

    def __init__(self, router: Router):
        self.router, self.config = router, router.config
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
                        logger.warning("replica %d (%s) is back", replica.index, replica.url)
                        replica.is_healthy = True
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
        headers = _forward_headers(request, request_id)
        errors = []
        for replica in self.router.order(prefix_key(body, self.config.prefix_chars))[: self.config.max_attempts]:
            record.attempts.append(replica.index)
            try:
                response, first, chunks = await self.open_stream(replica, path, raw, headers)
            except _Upstream as exc:
                errors.append(f"replica {replica.index}: {exc}")
                continue
            record.replica, record.status = replica.index, response.status_code
            return self.relay(replica, record, response, first, chunks)
        record.outcome, record.status = "failed", 503
        raise APIError(503, f"no replica could take the request ({'; '.join(errors) or 'none configured'})",
                       type="server_error", code="no_replica", headers={"Retry-After": "1"})

    def relay(self, replica: Replica, record: RequestRecord, response, first: bytes, chunks) -> StreamingResponse:
        """The client's answer: the replica's status, headers and bytes as they come. A stream the replica cuts
        off ends with an error event and [DONE], so the client sees one clean end."""
        is_stream = response.headers.get("content-type", "").startswith("text/event-stream")
        passed = {k: v for k, v in response.headers.items()
                  if k.lower() in ("content-type", "cache-control", "retry-after", "x-accel-buffering")}
        return StreamingResponse(self._relayed(replica, record, response, is_stream, first, chunks),
                                 status_code=response.status_code,
                                 headers={**passed, **_answer_headers(replica, record.request_id)})

    async def _relayed(self, replica: Replica, record: RequestRecord, response, is_stream: bool, first: bytes,
                       chunks):
        reader, is_done = SSEReader(), False
        outcome = "cancelled"  # unless the loop below reaches an end
        try:
            async for chunk in _prepend(first, chunks):
                is_done = is_done or any(data.strip() == "[DONE]" for data in reader.feed(chunk))
                yield chunk
            is_done = is_done or any(data.strip() == "[DONE]" for data in reader.close())
            if response.status_code != 200:
                outcome = "client_error" if response.status_code < 500 else "failed"
            elif is_stream and not is_done:
                raise httpx.RemoteProtocolError("the stream ended without data: [DONE]")
            else:
                outcome = "completed"
        except httpx.HTTPError as exc:
            outcome = "failed"
            self.router.mark_down(replica, f"{type(exc).__name__}: {exc}")
            if is_stream:
                error = APIError(502, f"replica {replica.index} failed mid-stream ({type(exc).__name__}); "
                                      "the tokens so far were sent, so the request is not retried",
                                 type="server_error", code="replica_failed")
                yield sse(error.body()).encode()
                yield DONE_EVENT.encode()
        finally:
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


async def _prepend(first: bytes, chunks):
    yield first
    async for chunk in chunks:
        yield chunk


async def _on_api_error(request: Request, exc: APIError):
    return error_response(exc)


def create_router_app(router: Router) -> FastAPI:
    """The FastAPI app of a Router; serve it with uvicorn (`labkit.serving.ServerThread` in tests and notebooks)."""
    forwarder = _Forwarder(router)
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
