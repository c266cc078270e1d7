"""`labkit ping` and the client side of the protocol against servers that answer what OpenAI's API never would.

`broken_server` is one small Starlette app that plays every broken server at once: the reply to a stream is picked
by the request's `model`, the reply to /v1/models by its bearer key. test_loadgen.py points `bench serve` at it
too.
"""

import argparse
import collections
import contextlib
import json
import re
import threading
import time

import pytest

from labkit import cli
from labkit.cli import ping as ping_cli
from labkit.serving import client
from labkit.serving import protocol
from labkit.serving.addresses import api_key_for, is_loopback, server_url
from labkit.serving.events import DONE, SSEReader, chunk_text, parse_event, read_events, stream_usage
from labkit.serving.protocol import ServerError, model_ids
from labkit.serving.server import bind_socket

WORDS = [" hello", " world", " again"]
USAGE = {"prompt_tokens": 3, "completion_tokens": 3}


def _chunk(text: str, is_chat: bool) -> str:
    choice = {"index": 0, "delta": {"content": text}} if is_chat else {"index": 0, "text": text}
    return json.dumps({"choices": [{**choice, "finish_reason": None}]})


def _good(is_chat: bool, usage: dict | None = USAGE) -> list[str]:
    events = [_chunk(word, is_chat) for word in WORDS]
    if usage is not None:
        events.append(json.dumps({"choices": [], "usage": usage}))
    return events + ["[DONE]"]


# what the stream carries, by model name, and a fragment of the one line the client must print
BROKEN_STREAMS = {
    "string-event": (['"hello"', "[DONE]"], 'an event that is not a JSON object: "hello"'),
    "number-event": (["5", "[DONE]"], "an event that is not a JSON object: 5"),
    "error-string": (['{"error": "boom"}'], "stream error: boom"),
    "error-object": ([json.dumps({"error": {"message": "out of memory", "code": 500}})], "stream error: out of memory"),
    "choices-string": (['{"choices": "x"}', "[DONE]"], '`choices` that are not a list of objects: "x"'),
    "choices-ints": (['{"choices": [1]}', "[DONE]"], "`choices` that are not a list of objects: [1]"),
    "text-number": (['{"choices": [{"text": 5}]}', "[DONE]"], "a `text` that is not a string: 5"),
    "token-ids-string": (['{"choices": [{"text": "a", "token_ids": "12"}]}', "[DONE]"],
                         '`token_ids` that are not a list of token ids: "12"'),
    "usage-list": ([_chunk(" hi", False), '{"choices": [], "usage": [1]}', "[DONE]"],
                   "a `usage` that is not an object: [1]"),
    "usage-strings": ([_chunk(" hi", False), json.dumps({"usage": {"prompt_tokens": "3", "completion_tokens": "2"}}),
                       "[DONE]"], 'a `usage.prompt_tokens` that is not a token count: "3"'),
    "usage-negative": ([_chunk(" hi", False), json.dumps({"usage": {"completion_tokens": -1}}), "[DONE]"],
                       "a `usage.completion_tokens` that is not a token count: -1"),
    "not-json": (["{oops", "[DONE]"], "an event that is not JSON: '{oops'"),
    "deep": (["[" * 100_000, "[DONE]"], "an event that is not JSON"),
    "no-done": (_good(False)[:-1], "the stream ended without data: [DONE]"),
}
BROKEN_CHAT = {
    "delta-string": (['{"choices": [{"delta": "hi"}]}', "[DONE]"], 'a `delta` that is not an object: "hi"'),
    "content-list": (['{"choices": [{"delta": {"content": ["hi"]}}]}', "[DONE]"],
                     'a `delta.content` that is not a string: ["hi"]'),
}
BROKEN_MODELS = {  # bearer key -> (the /v1/models body, fragment)
    "ints": (b"[1,2,3]", 'expected {"data": [{"id": ...}, ...]}, got [1, 2, 3]'),
    "data-ints": (b'{"data":[1,2]}', 'expected {"data": [{"id": ...}, ...]}, got {"data": [1, 2]}'),
    "no-id": (b'{"data":[{"name":"m"}]}', "expected"),
    "html": (b"<html>hello</html>", "the answer is not JSON"),
    "empty": (b'{"object":"list","data":[]}', "lists no model: pass --model"),
}

HTML_PAGE = "<!DOCTYPE html>\n<html>\n  <head><title>404 Not Found</title></head>\n  <body>\n" + \
    "    <p>nothing here</p>\n" * 40 + "  </body>\n</html>\n"


def broken_app():
    """Streams by model: `good`, `no-usage` (llama.cpp: no usage), a BROKEN_STREAMS/BROKEN_CHAT case, or
    `every-3rd:<case>` (that case for every third request of that model, good otherwise)."""
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    seen = collections.Counter()

    async def models(request):
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        body = BROKEN_MODELS[key][0] if key in BROKEN_MODELS else b'{"object":"list","data":[{"id":"good"}]}'
        return Response(body, media_type="application/json")

    async def stream(request):
        body = await request.json()
        is_chat = request.url.path.endswith("/chat/completions")
        case = body.get("model", "good")
        if case.startswith("every-3rd:"):
            seen[case] += 1
            case = case.split(":", 1)[1] if seen[case] % 3 == 0 else "good"
        if case == "html-error":  # a web server that is not OpenAI's: a long multi-line page
            return Response(HTML_PAGE, status_code=404, media_type="text/html")
        if case == "good":
            events = _good(is_chat)
        elif case == "no-usage":
            events = _good(is_chat, usage=None)
        else:
            events = {**BROKEN_STREAMS, **BROKEN_CHAT}[case][0]
        return StreamingResponse(iter([f"data: {e}\n\n" for e in events]), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", stream, methods=["POST"]),
                             Route("/v1/chat/completions", stream, methods=["POST"])])


class _Running:
    def __init__(self, port: int):
        self.port, self.url = port, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serving(app):
    """Any ASGI app on a free loopback port, on a background thread (ServerThread is for create_app's apps)."""
    import uvicorn

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the test server did not start"
            time.sleep(0.01)
        yield _Running(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def broken_server():
    with serving(broken_app()) as running:
        yield running


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- the parsing functions -----------------------------------------------------------------------------------
def test_parse_event_rejects_what_is_not_an_event_object():
    assert parse_event('{"a": 1}') == {"a": 1}
    assert parse_event("[DONE]") is DONE
    assert SSEReader().feed(": keep-alive\n\n") == [] and parse_event("") is None
    assert list(read_events([": keep-alive\n\n", "data:\n\n", 'data: {"a": 1}\n\n', "data: [DONE]\n\n"])) == \
        [{"a": 1}, DONE]
    assert parse_event('{"error": null, "choices": []}') == {"error": None, "choices": []}
    for case in ("string-event", "number-event", "error-string", "error-object", "not-json", "deep"):
        events, fragment = BROKEN_STREAMS[case]
        with pytest.raises(ServerError) as caught:
            parse_event(events[0])
        assert fragment in str(caught.value) and "\n" not in str(caught.value) and len(str(caught.value)) < 200


def test_chunk_text_and_usage_check_every_field():
    assert chunk_text({"choices": [{"text": "a", "token_ids": [5], "finish_reason": "stop"}]}, False) == \
        ("a", [5], "stop")
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": None}}]}, True) == ("", None, None)
    assert chunk_text({"choices": [{"delta": None, "finish_reason": 7}]}, True) == ("", None, None)
    assert chunk_text({"choices": []}, False) == ("", None, None)
    for bad in ({"choices": "x"}, {"choices": [1]}, {"choices": [{"text": 5}]},
                {"choices": [{"text": "a", "token_ids": [1, "2"]}]}, {"choices": [{"text": "a", "token_ids": [True]}]}):
        with pytest.raises(ServerError):
            chunk_text(bad, False)
    assert stream_usage({"usage": None}) is None and stream_usage({}) is None
    assert stream_usage({"usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}}) == \
        {"prompt_tokens": 3, "completion_tokens": 0}
    assert stream_usage({"usage": {}}) == {"prompt_tokens": None, "completion_tokens": None}
    for bad in ([1], "3", {"completion_tokens": "3"}, {"prompt_tokens": 1.5}, {"completion_tokens": True}):
        with pytest.raises(ServerError):
            stream_usage({"usage": bad})


def test_model_ids_name_the_url():
    assert model_ids("u", 200, b'{"data": [{"id": "a"}, {"id": "b"}]}') == ["a", "b"]
    assert model_ids("u", 200, b"{}") == []
    for body, fragment in BROKEN_MODELS.values():
        if body != b'{"object":"list","data":[]}':
            with pytest.raises(ServerError, match="^u: " + fragment[:12].replace("{", r"\{").replace("[", r"\[")):
                model_ids("u", 200, body)
    with pytest.raises(ServerError, match="^u: HTTP 401: no key$"):
        model_ids("u", 401, b'{"error": {"message": "no key"}}')


def test_environment_keys_go_to_loopback_hosts_only(monkeypatch):
    monkeypatch.delenv("LABKIT_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    for url in ("http://127.0.0.1:8000", "http://127.8.9.1", "http://localhost:1", "http://[::1]:8000"):
        assert is_loopback(url) and api_key_for(url) == ("sk-secret", None)
    for url in ("http://10.0.0.2:8000", "https://api.example.com", "http://localhost.example.com", "http://[::2]:1"):
        key, note = api_key_for(url)
        assert not is_loopback(url) and key is None and "$OPENAI_API_KEY is set but not sent" in note
        assert api_key_for(url, use_env_key=True) == ("sk-secret", None)
    monkeypatch.setenv("LABKIT_API_KEY", "lab")  # the lab's own key comes first
    assert api_key_for("http://127.0.0.1:1") == ("lab", None)
    monkeypatch.delenv("LABKIT_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY")
    assert api_key_for("http://10.0.0.2") == (None, None)
    assert api_key_for("http://10.0.0.2", given="mine") == ("mine", None)


def test_ping_sends_an_environment_key_only_where_allowed(monkeypatch, capsys):
    sent = []

    def fake_ping(host, port, model, prompt, max_tokens, endpoint, api_key, timeout_s):
        sent.append(api_key)
        raise ServerError("stop here")

    monkeypatch.setattr(client, "ping", fake_ping)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.delenv("LABKIT_API_KEY", raising=False)
    assert cli.main(["ping", "--host", "10.1.2.3"]) == 1
    err = capsys.readouterr().err
    assert "$OPENAI_API_KEY is set but not sent to http://10.1.2.3:8000" in err and "--use-env-key" in err
    assert cli.main(["ping", "--host", "10.1.2.3", "--use-env-key"]) == 1
    assert cli.main(["ping", "--host", "127.0.0.1"]) == 1
    assert cli.main(["ping", "--host", "10.1.2.3", "--api-key", "given"]) == 1
    assert sent == [None, "sk-secret", "sk-secret", "given"]
    assert "not sent" not in capsys.readouterr().err  # no note when a key is given or allowed
    help_text = ping_cli.add_parser(argparse.ArgumentParser().add_subparsers()).format_help()
    assert "loopback" in help_text and "--use-env-key" in help_text


# -- labkit ping against broken servers ----------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(BROKEN_STREAMS))
def test_ping_reports_a_malformed_stream_in_one_line(broken_server, capsys, case):
    code = cli.main(["ping", "--port", str(broken_server.port), "--model", case, "--endpoint", "completions"])
    line = _one_line(capsys)
    assert code == 1, line
    assert line.startswith(f"labkit ping: {broken_server.url}/v1/completions: ") and BROKEN_STREAMS[case][1] in line


@pytest.mark.parametrize("case", sorted(BROKEN_CHAT))
def test_ping_reports_a_malformed_chat_chunk_in_one_line(broken_server, capsys, case):
    assert cli.main(["ping", "--port", str(broken_server.port), "--model", case]) == 1
    line = _one_line(capsys)
    assert line.startswith(f"labkit ping: {broken_server.url}/v1/chat/completions: ") and BROKEN_CHAT[case][1] in line


@pytest.mark.parametrize("key", sorted(BROKEN_MODELS))
def test_ping_reports_a_malformed_model_list_in_one_line(broken_server, capsys, key):
    assert cli.main(["ping", "--port", str(broken_server.port), "--api-key", key]) == 1
    line = _one_line(capsys)
    assert line.startswith(f"labkit ping: {broken_server.url}/v1/models") and BROKEN_MODELS[key][1] in line


def test_ping_reads_good_streams_with_and_without_usage(broken_server, capsys):
    result = client.ping(port=broken_server.port, endpoint="completions")  # the model from /v1/models
    assert result.model == "good" and result.text == "".join(WORDS)
    assert (result.prompt_tokens, result.completion_tokens) == (3, 3) and result.latency_ms >= result.ttft_ms > 0
    assert cli.main(["ping", "--port", str(broken_server.port), "--model", "no-usage"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("".join(WORDS)) and "no usage sent" in out
    assert cli.main(["ping", "--port", str(broken_server.port), "--model", "no-usage", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completion_tokens"] is None


def test_ping_rejects_bad_values_in_one_line(capsys):
    for argv in (["--timeout", "0"], ["--port", "70000"], ["--max-tokens", "0"]):
        with pytest.raises(SystemExit) as caught:
            cli.main(["ping", *argv])
        assert caught.value.code == 2 and _one_line(capsys).startswith("labkit ping: ")
    assert cli.main(["ping", "--host", "bad host", "--model", "m"]) == 2
    assert _one_line(capsys) == ("labkit ping: --host 'bad host': expected a host name, an IP address or a URL "
                                 "like http://127.0.0.1:8000")


def test_a_non_openai_servers_html_error_is_one_truncated_line(broken_server, capsys):
    assert cli.main(["ping", "--port", str(broken_server.port), "--model", "html-error"]) == 1
    line = _one_line(capsys)
    assert line.startswith(f"labkit ping: http://127.0.0.1:{broken_server.port}/v1/chat/completions: HTTP 404: "
                           "<!DOCTYPE html> <html> <head><title>404 Not Found</title></head> <body> <p>nothing here")
    assert line.endswith("…") and len(line.split("HTTP 404: ", 1)[1]) == protocol.MAX_ERROR_CHARS
    assert protocol.error_message(500, b'{"error": {"message": "bad\\n  thing"}}') == "HTTP 500: bad thing"
    assert protocol.error_message(502, b"") == "HTTP 502: (empty body)"


def test_ping_takes_a_url_as_host(broken_server, capsys):
    assert cli.main(["ping", "--host", "http://127.0.0.1", "--port", str(broken_server.port), "--model", "good"]) == 0
    assert f"at http://127.0.0.1:{broken_server.port}/v1/chat/completions" in capsys.readouterr().out
    url = f"http://127.0.0.1:{broken_server.port}/"
    assert cli.main(["ping", "--host", url, "--port", "1", "--model", "good", "--json"]) == 0  # the URL's port wins
    assert json.loads(capsys.readouterr().out)["url"] == url + "v1/chat/completions"


@pytest.mark.parametrize("host, url", [("127.0.0.1", "http://127.0.0.1:8000"), ("::1", "http://[::1]:8000"),
                                       ("[::1]", "http://[::1]:8000"), ("http://127.0.0.1", "http://127.0.0.1:8000"),
                                       ("https://lab.example:9/", "https://lab.example:9")])
def test_server_url_from_a_host_or_a_url(host, url):
    assert server_url(host, 8000) == url


@pytest.mark.parametrize("host, fragment", [("http://127.0.0.1/v1", "expected a host name"),
                                            ("localhost:8001", "give the port with --port"),
                                            ("ftp://x", "expected a host name"), ("http://x:99999", "not in 0..65535"),
                                            ("", "expected a host name")])
def test_server_url_refuses_what_is_not_a_host_in_one_line(host, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        server_url(host, 8000)
    assert "\n" not in str(info.value) and repr(host) in str(info.value)
