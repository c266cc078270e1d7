"""The server's HTTP limits and refusals, each answered with OpenAI's error body (`error_response`).

Hardening against slow, idle and cross-site clients: a connection must send its request head within
`header_timeout_s` (else it is closed) and its body within `body_timeout_s` (408); more than `max_connections`
open connections are answered 503; POST bodies must be `application/json` (415, so a browser's cross-site form
or `text/plain` request is refused) and at most `max_body_bytes` (413); a request over loopback must name a
loopback Host (400, against DNS rebinding). The router reads its bodies with the same `read_json_body`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from functools import partial

from starlette.responses import Response

from labkit.serving.addresses import is_loopback, server_url
from labkit.serving.metrics import ServerMetrics
from labkit.serving.protocol import APIError

OVER_CAPACITY = "labkit.over_capacity"  # the scope key a connection over max_connections carries


def error_response(exc: APIError, headers: Mapping[str, str] | None = None) -> Response:
    """exc's OpenAI error body and status (with exc's headers, then `headers`). JSON escapes non-ASCII text, so
    that a lone surrogate the message echoes from the request cannot fail the reply (Starlette's JSONResponse
    writes raw UTF-8)."""
    return Response(json.dumps(exc.body()), status_code=exc.status, headers={**exc.headers, **(headers or {})},
                    media_type="application/json")


async def read_json_body(request, max_body_bytes: int, timeout_s: float | None = None) -> bytes:
    """The bytes of a POST that says it carries JSON: 415 unless it does, 413 over max_body_bytes, 408 when the
    whole body has not arrived within timeout_s (None: no deadline), 499 when the client leaves mid-body."""
    import anyio
    from starlette.requests import ClientDisconnect

    content_type = request.headers.get("content-type")
    if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
        # a browser sends a cross-site form or text/plain POST without asking first; JSON needs a preflight
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'}",
                       code="unsupported_media_type")
    length = request.headers.get("content-length", "")
    too_big = APIError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
    if length.isdigit() and int(length) > max_body_bytes:
        raise too_big
    body = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise too_big
    except ClientDisconnect:  # the client left mid-body: no server error, nobody to answer
        raise APIError(499, "client closed the request") from None
    except TimeoutError:  # the rest of the body may never come: close the connection after answering
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="request_timeout", headers={"Connection": "close"}) from None
    return bytes(body)


def _names_loopback(host: str) -> bool:
    """Whether a Host header names this machine (localhost, 127.0.0.1, [::1], with or without a port)."""
    try:
        return is_loopback(f"http://{host}")
    except ValueError:  # not even a host name, e.g. "[::1"
        return False


class Gate:
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


def guarded_h11_protocol(max_connections: int, header_timeout_s: float):
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
            if len(self.connections) > max_connections:
                self.app = partial(_over_capacity, self.app)
            self._await_head()

        def _await_head(self) -> None:
            self._forget_head()
            self._head_deadline = self.loop.call_later(header_timeout_s, self._head_timed_out)

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
    scope[OVER_CAPACITY] = True  # the app's Gate answers 503
    await app(scope, receive, send)


__all__ = ["OVER_CAPACITY", "error_response", "read_json_body", "Gate", "guarded_h11_protocol"]
