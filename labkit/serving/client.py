"""Talk to an OpenAI-compatible server: one timed streamed request (`labkit ping`), and the errors every client
reports (the event reading it shares with the load generator and the router is `labkit.serving.events`).

Plain httpx, no retries and no proxies from the environment: a benchmark or a health check must see each
failure once, and lab traffic stays on the address it was given.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from labkit.checks import check_choice
from labkit.serving.addresses import auth_headers, server_url
from labkit.serving.events import DONE, chunk_text, read_events, stream_usage
from labkit.serving.protocol import ENDPOINTS, ServerError, error_message, model_ids


def transport_error(url: str, exc: Exception) -> ServerError:
    """One line for an httpx failure: `cannot reach URL: ...` before a connection, `URL: ReadTimeout: ...` after."""
    import httpx

    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol, httpx.InvalidURL,
                        httpx.ProxyError)):
        return ServerError(f"cannot reach {url}: {exc}")
    return ServerError(f"{url}: {type(exc).__name__}: {exc}")


def first_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The id of the first model the server lists at /v1/models."""
    import httpx

    url = f"{base_url}/v1/models"
    try:
        response = httpx.get(url, headers=auth_headers(api_key), timeout=timeout_s, trust_env=False)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise transport_error(url, exc) from None
    models = model_ids(url, response.status_code, response.content)
    if not models:
        raise ServerError(f"{url} lists no model: pass --model")
    return models[0]


@dataclass
class PingResult:
    """One round trip: the text, when its first and last pieces arrived, and the server's token counts."""

    url: str
    model: str
    text: str
    finish_reason: str | None
    ttft_ms: float
    latency_ms: float
    prompt_tokens: int | None  # None when the server sent no usage
    completion_tokens: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def _read_stream(chunks: Iterable[bytes], is_chat: bool) -> tuple[list[str], str | None, dict, float | None]:
    """The text pieces, finish reason, usage counts and first-text time of a stream, up to `data: [DONE]`."""
    parts, finish, usage, first = [], None, {}, None
    for event in read_events(chunks):
        if event is DONE:
            return parts, finish, usage, first
        text, _, reason = chunk_text(event, is_chat)
        if text and first is None:
            first = time.perf_counter()
        parts.append(text)
        finish = reason or finish
        usage = stream_usage(event) or usage
    raise ServerError("the stream ended without data: [DONE]")


def ping(host: str = "127.0.0.1", port: int = 8000, model: str | None = None, prompt: str = "Say hello.",
         max_tokens: int = 16, endpoint: str = "chat", api_key: str | None = None, temperature: float = 0.0,
         timeout_s: float = 60.0) -> PingResult:
    """Stream one request and time it: TTFT at the first text, latency at the end of the stream.

    ServerError (one line naming the URL) when the server cannot be reached, answers an error, or sends a reply
    that is not OpenAI's stream: an event that is not a JSON object, a malformed chunk or usage, no `[DONE]`.
    """
    import httpx

    check_choice("endpoint", endpoint, ENDPOINTS)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    base = server_url(host, port)
    model = model or first_model(base, api_key, timeout_s)
    is_chat = endpoint == "chat"
    payload = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
               "stream_options": {"include_usage": True}}
    payload.update({"messages": [{"role": "user", "content": prompt}]} if is_chat else {"prompt": prompt})
    url = base + ENDPOINTS[endpoint]
    start = time.perf_counter()
    try:
        with httpx.stream("POST", url, json=payload, headers=auth_headers(api_key), timeout=timeout_s,
                          trust_env=False) as response:
            if response.status_code != 200:
                raise ServerError(f"{url}: {error_message(response.status_code, response.read())}")
            try:
                parts, finish, usage, first = _read_stream(response.iter_bytes(), is_chat)
            except ServerError as exc:
                raise ServerError(f"{url}: {exc}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise transport_error(url, exc) from None
    end = time.perf_counter()
    return PingResult(url=url, model=model, text="".join(parts), finish_reason=finish,
                      ttft_ms=((first or end) - start) * 1e3, latency_ms=(end - start) * 1e3,
                      prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))


__all__ = ["PingResult", "transport_error", "first_model", "ping"]
