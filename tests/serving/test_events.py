"""The one SSE reader (`labkit.serving.events`) that client, load generator and router share: lines split across
chunks, multi-line events, comments, other fields, line endings, [DONE], and an async stream."""

import asyncio
import json

import pytest

from labkit.serving.events import DONE, DONE_EVENT, SSEReader, aread_events, parse_event, read_events, sse
from labkit.serving.protocol import ServerError


def _feed_all(chunks) -> list[str]:
    reader = SSEReader()
    out = [data for chunk in chunks for data in reader.feed(chunk)]
    return out + reader.close()


def test_an_event_is_whole_only_at_its_blank_line():
    reader = SSEReader()
    assert reader.feed('data: {"a"') == []
    assert reader.feed(": 1}\n") == []  # the line is whole, the event is not
    assert reader.feed("\n") == ['{"a": 1}']
    assert reader.feed("data: [DONE]\n\n") == ["[DONE]"]
    assert reader.close() == []


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_any_split_of_the_bytes_reads_the_same_events(size):
    stream = (sse({"text": "héllo ✓"}) + ": keep-alive\n\n" + sse({"n": 2}) + DONE_EVENT).encode()
    chunks = [stream[i:i + size] for i in range(0, len(stream), size)]  # splits UTF-8 characters too
    assert _feed_all(chunks) == ['{"text":"h\\u00e9llo \\u2713"}', '{"n":2}', "[DONE]"]
    raw = "data: é✓\n\n".encode()
    assert _feed_all([raw[i:i + 1] for i in range(len(raw))]) == ["é✓"]


def test_the_data_lines_of_one_event_join_with_newlines():
    assert _feed_all(['data: {"a":\ndata: 1}\n\n']) == ['{"a":\n1}']
    assert parse_event(_feed_all(['data: {"a":\ndata: 1}\n\n'])[0]) == {"a": 1}
    assert _feed_all(["data:x\ndata:  y\n\n"]) == ["x\n y"]  # one space after the colon is dropped, not two


def test_comments_other_fields_and_empty_events_carry_no_data():
    assert _feed_all([": ping\n\n", "event: message\nid: 7\nretry: 10\n\n", "\n\n"]) == []
    assert _feed_all(["event: message\n: a comment inside\ndata: 1\nid: 2\n\n"]) == ["1"]
    assert _feed_all(["data\n\n"]) == [""]  # a field without a colon: data, empty


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_line_ending(newline):
    text = f"data: 1{newline}{newline}data: 2{newline}data: 3{newline}{newline}"
    assert _feed_all([text]) == ["1", "2\n3"]
    assert _feed_all(list(text)) == ["1", "2\n3"]  # a CRLF split between two chunks is one line end


def test_a_stream_that_ends_without_its_blank_line_still_gives_its_last_event():
    assert _feed_all(["data: 1\n\ndata: [DONE]\n"]) == ["1", "[DONE]"]
    assert _feed_all(["data: [DONE]"]) == ["[DONE]"]


def test_read_events_parses_until_done():
    chunks = [sse({"a": 1})[:5], sse({"a": 1})[5:] + ": keep-alive\n\n", "data:\n\n", DONE_EVENT]
    assert list(read_events(chunks)) == [{"a": 1}, DONE]
    assert list(read_events([b"data: [DONE]\r\n\r\n"])) == [DONE]
    with pytest.raises(ServerError, match="stream error: boom"):
        list(read_events([sse({"a": 1}), sse({"error": {"message": "boom"}})]))


def test_aread_events_reads_an_async_stream_as_it_comes():
    async def chunks():
        for piece in (b'data: {"n"', b": 1}\n", b"\n", DONE_EVENT.encode()):
            yield piece

    async def collect():
        return [event async for event in aread_events(chunks())]

    assert asyncio.run(collect()) == [{"n": 1}, DONE]


def test_parse_event_names_what_is_wrong():
    assert parse_event(" [DONE] ") is DONE and parse_event("  ") is None
    for data, fragment in (("[1]", "not a JSON object: [1]"), ("{oops", "not JSON"),
                           (json.dumps({"error": "out of memory"}), "stream error: out of memory")):
        with pytest.raises(ServerError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            parse_event(data)
