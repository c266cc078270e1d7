"""Server-sent events: writing OpenAI's stream events, and the one reader that client, load generator and router
use to read them back.

`SSEReader` follows the WHATWG HTML event-stream rules (a line may arrive split across network chunks; CRLF, LF
or CR ends a line; `:` starts a comment; the `data:` lines of one event are joined by newlines; a blank line
ends the event). `parse_event` turns an event's data into OpenAI's chunk object, or DONE for `[DONE]`;
`chunk_text` and `stream_usage` check the chunk's fields. Nothing here imports torch or httpx.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

from labkit.checks import is_int
from labkit.serving.protocol import ServerError

DONE = object()  # the `data: [DONE]` event that ends an OpenAI stream
DONE_EVENT = "data: [DONE]\n\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def sse(obj) -> str:
    """One server-sent event carrying obj as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class SSEReader:
    """Reads an event stream piece by piece: `feed(chunk)` takes bytes or text as they arrive and returns the
    data of each event the chunk completed; `close()` returns the data of an event the stream did not end with
    a blank line (lenient: the spec drops it, but a server that ends with `data: [DONE]\\n` meant it)."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span two chunks
        self._buffer = ""  # the start of a line whose end has not arrived
        self._data: list[str] | None = None  # the data lines of the event being read

    def feed(self, chunk: bytes | str) -> list[str]:
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        self._buffer += text
        held = "\r" if self._buffer.endswith("\r") else ""  # a CR may be the first half of a CRLF
        lines = _LINE_BREAK.split(self._buffer[:len(self._buffer) - len(held)])
        self._buffer = lines.pop() + held
        return [data for line in lines if (data := self._line(line)) is not None]

    def close(self) -> list[str]:
        rest = self._buffer.removesuffix("\r") + self._decoder.decode(b"", final=True)
        self._buffer = ""
        return [data for line in (rest, "") if (data := self._line(line)) is not None]

    def _line(self, line: str) -> str | None:
        """Take one line; the event's data when the line is the blank one that ends it."""
        if not line:
            data, self._data = self._data, None
            return None if data is None else "\n".join(data)
        if line.startswith(":"):  # a comment (a keep-alive)
            return None
        name, _, value = line.partition(":")
        if name == "data":
            if self._data is None:
                self._data = []
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # event, id and retry fields carry nothing OpenAI's streams use


def _brief(value) -> str:
    """A parsed JSON value as a short one-line excerpt for an error message."""
    return json.dumps(value)[:100]


def parse_event(data: str):
    """The data of one event -> its JSON object, DONE, or None (an event without data).

    ServerError for an event that is not a JSON object, and for an error event (with the server's message).
    """
    data = data.strip()
    if data == "[DONE]":
        return DONE
    if not data:
        return None
    try:
        event = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
        raise ServerError(f"the server sent an event that is not JSON: {data[:100]!r}") from None
    if not isinstance(event, dict):
        raise ServerError(f"the server sent an event that is not a JSON object: {_brief(event)}")
    if event.get("error") is not None:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise ServerError(f"stream error: {message if isinstance(message, str) else _brief(message)}")
    return event


def read_events(chunks: Iterable[bytes | str]) -> Iterator:
    """OpenAI's events (JSON objects, then DONE) from a stream's chunks, each as soon as its chunk arrives."""
    reader = SSEReader()
    for chunk in chunks:
        yield from _parsed(reader.feed(chunk))
    yield from _parsed(reader.close())


async def aread_events(chunks: AsyncIterable[bytes | str]) -> AsyncIterator:
    """read_events over an async stream (httpx's `aiter_bytes()`)."""
    reader = SSEReader()
    async for chunk in chunks:
        for event in _parsed(reader.feed(chunk)):
            yield event
    for event in _parsed(reader.close()):
        yield event


def _parsed(datas: list[str]) -> Iterator:
    for data in datas:
        event = parse_event(data)
        if event is not None:
            yield event


def chunk_text(event: dict, is_chat: bool) -> tuple[str, list[int] | None, str | None]:
    """The text, token ids (vLLM's `return_token_ids`, when sent) and finish reason of a stream chunk;
    ServerError naming the field when the chunk does not have OpenAI's shape."""
    choices = event.get("choices")
    if not choices:
        return "", None, None
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise ServerError(f"the server sent `choices` that are not a list of objects: {_brief(choices)}")
    choice = choices[0]
    if is_chat:
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise ServerError(f"the server sent a `delta` that is not an object: {_brief(delta)}")
        text, name = delta.get("content"), "delta.content"
    else:
        text, name = choice.get("text"), "text"
    if not isinstance(text, str | None):
        raise ServerError(f"the server sent a `{name}` that is not a string: {_brief(text)}")
    ids = choice.get("token_ids")
    if ids is not None and not (isinstance(ids, list) and all(is_int(i) and i >= 0 for i in ids)):
        raise ServerError(f"the server sent `token_ids` that are not a list of token ids: {_brief(ids)}")
    reason = choice.get("finish_reason")
    return text or "", ids, reason if isinstance(reason, str) else None


def stream_usage(event: dict) -> dict | None:
    """A chunk's `usage` as {"prompt_tokens", "completion_tokens"} (each a count or None), None without one;
    ServerError when it is not an object of token counts."""
    usage = event.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise ServerError(f"the server sent a `usage` that is not an object: {_brief(usage)}")
    counts = {key: usage.get(key) for key in ("prompt_tokens", "completion_tokens")}
    for key, value in counts.items():
        if value is not None and not (is_int(value) and value >= 0):
            raise ServerError(f"the server sent a `usage.{key}` that is not a token count: {_brief(value)}")
    return counts


__all__ = ["DONE", "DONE_EVENT", "sse", "SSEReader", "parse_event", "read_events", "aread_events", "chunk_text",
           "stream_usage"]
