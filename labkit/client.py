"""Talk to an OpenAI-compatible server: `labkit ping` (the event parsing it shares with the load generator is in
`labkit.protocol`).

Plain httpx, no retries and no proxies from the environment: a benchmark or a health check must see each
failure once, and lab traffic stays on the address it was given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from labkit.protocol import (API_KEY_ENV, DONE, ENDPOINTS, ServerError, auth_headers, chunk_text, error_message,
                             parse_sse_line)


def first_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The id of the first model the server lists at /v1/models."""
    import httpx

    try:
        response = httpx.get(f"{base_url}/v1/models", headers=auth_headers(api_key), timeout=timeout_s,
                             trust_env=False)
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach {base_url}: {exc}") from None
    if response.status_code != 200:
        raise ServerError(f"{base_url}/v1/models: {error_message(response.status_code, response.content)}")
    models = response.json().get("data") or []
    if not models:
        raise ServerError(f"{base_url}/v1/models lists no model: pass --model")
    return models[0]["id"]


@dataclass
class PingResult:
    """One round trip: the text, when its first and last pieces arrived, and the server's token counts."""

    url: str
    model: str
    text: str
    finish_reason: str | None
    ttft_ms: float
    latency_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def ping(host: str = "127.0.0.1", port: int = 8000, model: str | None = None, prompt: str = "Say hello.",
         max_tokens: int = 16, endpoint: str = "chat", api_key: str | None = None, temperature: float = 0.0,
         timeout_s: float = 60.0) -> PingResult:
    """Stream one request and time it: TTFT at the first text, latency at the end of the stream."""
    import httpx

    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}: choose one of {', '.join(ENDPOINTS)}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    base = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    model = model or first_model(base, api_key, timeout_s)
    is_chat = endpoint == "chat"
    payload = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
               "stream_options": {"include_usage": True}}
    payload.update({"messages": [{"role": "user", "content": prompt}]} if is_chat else {"prompt": prompt})
    url = base + ENDPOINTS[endpoint]
    parts, usage, finish, first = [], {}, None, None
    start = time.perf_counter()
    try:
        with httpx.stream("POST", url, json=payload, headers=auth_headers(api_key), timeout=timeout_s,
                          trust_env=False) as response:
            if response.status_code != 200:
                raise ServerError(f"{url}: {error_message(response.status_code, response.read())}")
            for line in response.iter_lines():
                event = parse_sse_line(line)
                if event is DONE:
                    break
                if event is None:
                    continue
                if "error" in event:
                    raise ServerError(f"{url}: the stream failed: {event['error'].get('message')}")
                text, _, reason = chunk_text(event, is_chat)
                if text and first is None:
                    first = time.perf_counter()
                parts.append(text)
                finish = reason or finish
                usage = event.get("usage") or usage
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach {url}: {exc}") from None
    end = time.perf_counter()
    return PingResult(url=url, model=model, text="".join(parts), finish_reason=finish,
                      ttft_ms=((first or end) - start) * 1e3, latency_ms=(end - start) * 1e3,
                      prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))


def cmd_ping(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
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
    print(f"{result.model} at {result.url}: {result.latency_ms:.0f} ms (first text after {result.ttft_ms:.0f} ms, "
          f"{result.prompt_tokens} prompt + {result.completion_tokens} completion tokens, "
          f"finish {result.finish_reason})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `labkit ping` on the CLI's subparsers."""
    from labkit.arguments import add_server_options, positive_int

    parser = subparsers.add_parser(
        "ping", help="send one request to an OpenAI-compatible server and time it",
        description="Stream one greedy request to a server (labkit serve, vLLM, llama.cpp, ...) and print the\n"
                    "text and its latency. Exit status 1 when the server is unreachable or answers an error.",
        epilog="examples:\n"
               "  labkit ping\n"
               "  labkit ping --port 8001 --endpoint completions --prompt 'Once upon a time' --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_options(parser)
    parser.add_argument("--prompt", default="Say hello.", help="the prompt (default: %(default)r)")
    parser.add_argument("--max-tokens", type=positive_int, default=16, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="chat",
                        help="chat (with the model's chat template) or completions (default: %(default)s)")
    parser.add_argument("--api-key", default=None, help=f"bearer key (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="give up after this long (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=cmd_ping)
    return parser


__all__ = ["PingResult", "first_model", "ping", "cmd_ping", "add_parser"]
