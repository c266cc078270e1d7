"""Talk to an OpenAI-compatible server: `labkit ping` (the event parsing it shares with the load generator is in
`labkit.serving.protocol`).

Plain httpx, no retries and no proxies from the environment: a benchmark or a health check must see each
failure once, and lab traffic stays on the address it was given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

from labkit.serving.protocol import (API_KEY_ENVS, DONE, ENDPOINTS, ServerError, api_key_for, auth_headers, chunk_text,
                             error_message, model_ids, parse_sse_line, server_url, stream_usage)


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


def _read_stream(lines, is_chat: bool) -> tuple[list[str], str | None, dict, float | None]:
    """The text pieces, finish reason, usage counts and first-text time of a stream, up to `data: [DONE]`."""
    parts, finish, usage, first = [], None, {}, None
    for line in lines:
        event = parse_sse_line(line)
        if event is DONE:
            return parts, finish, usage, first
        if event is None:
            continue
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

    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}: choose one of {', '.join(ENDPOINTS)}")
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
                parts, finish, usage, first = _read_stream(response.iter_lines(), is_chat)
            except ServerError as exc:
                raise ServerError(f"{url}: {exc}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise transport_error(url, exc) from None
    end = time.perf_counter()
    return PingResult(url=url, model=model, text="".join(parts), finish_reason=finish,
                      ttft_ms=((first or end) - start) * 1e3, latency_ms=(end - start) * 1e3,
                      prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))


def cmd_ping(args: argparse.Namespace) -> int:
    api_key, note = api_key_for(server_url(args.host, args.port), args.api_key, args.use_env_key)
    if note:
        print(f"labkit ping: {note}", file=sys.stderr)
    try:
        result = ping(args.host, args.port, args.model, args.prompt, args.max_tokens, args.endpoint, api_key,
                      timeout_s=args.timeout)
    except ServerError as exc:
        print(f"labkit ping: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(result.text)
    counts = ("no usage sent" if result.completion_tokens is None else
              f"{result.prompt_tokens} prompt + {result.completion_tokens} completion tokens")
    print(f"{result.model} at {result.url}: {result.latency_ms:.0f} ms (first text after {result.ttft_ms:.0f} ms, "
          f"{counts}, finish {result.finish_reason})")
    return 0


def add_api_key_options(parser: argparse.ArgumentParser) -> None:
    """--api-key and --use-env-key: a key from the environment goes to loopback hosts only unless asked."""
    envs = " or ".join(f"${name}" for name in API_KEY_ENVS)
    parser.add_argument("--api-key", default=None,
                        help=f"bearer key to send (default: {envs} when the server is on a loopback address, "
                             "else none)")
    parser.add_argument("--use-env-key", action="store_true",
                        help=f"also send {envs} to a server that is not on a loopback address")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `labkit ping` on the CLI's subparsers."""
    from labkit.cli.arguments import add_server_options, positive_float, positive_int

    parser = subparsers.add_parser(
        "ping", help="send one request to an OpenAI-compatible server and time it",
        description="Stream one greedy request to a server (labkit serve, vLLM, llama.cpp, ...) and print the\n"
                    "text and its latency. Exit status 1, with one line naming the URL, when the server is\n"
                    "unreachable, answers an error, or sends a reply that is not OpenAI's stream.",
        epilog="examples:\n"
               "  labkit ping\n"
               "  labkit ping --port 8001 --endpoint completions --prompt 'Once upon a time' --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_options(parser)
    parser.add_argument("--prompt", default="Say hello.", help="the prompt (default: %(default)r)")
    parser.add_argument("--max-tokens", type=positive_int, default=16, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="chat",
                        help="chat (with the model's chat template) or completions (default: %(default)s)")
    add_api_key_options(parser)
    parser.add_argument("--timeout", type=positive_float, default=60.0, metavar="SECONDS",
                        help="give up after this long (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=cmd_ping)
    return parser


__all__ = ["PingResult", "transport_error", "first_model", "ping", "cmd_ping", "add_api_key_options", "add_parser"]
