"""`labkit serve`, driven by the official `openai` client: same text streamed or not, exact usage, OpenAI error
bodies with the right status codes, concurrent requests decoded together with the text each gets alone,
cancellation on disconnect, a bounded queue with a deadline, no leaked KV block, and health after all of it;
hostile clients (slow, idle, too many, cross-site, nested or broken bodies) and a shutdown mid-stream."""

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from labkit import cli
from labkit.engine.engine import Engine
from labkit.serving import ServeConfig, ServerThread, create_app

MODEL = "tiny"
LONG = 1500  # tokens: seconds of decoding, so a generation that was not cancelled would be seen running


DEFAULT_MAX_TOKENS = 6  # the module server's reply length for chat requests without max_tokens


def _engine(tiny, **config) -> Engine:
    """A fresh engine (its own KV cache) over the session's tiny random model."""
    return Engine.from_hf(tiny.model, tiny.tokenizer, name="tiny-smollm2", **config)


@pytest.fixture(scope="module")
def engine(tiny):
    return _engine(tiny)


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, served_model_name=MODEL, max_queue=64, max_body_bytes=4096,
                     default_max_tokens=DEFAULT_MAX_TOKENS)
    with ServerThread(app) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def roomy(tiny):
    """A server with the default limits (a body of up to 1 MiB), on an engine of its own."""
    with ServerThread(create_app(_engine(tiny), served_model_name=MODEL)) as running:
        yield running


def _health(url: str) -> dict:
    response = httpx.get(f"{url}/health", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_for(url: str, ready, timeout_s: float = 3.0) -> dict:
    """/health once ready(state) holds; fails if that takes longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = _health(url)
        if ready(state):
            return state
        assert time.monotonic() < deadline, f"the server did not get there: {state}"
        time.sleep(0.02)


def _wait_idle(url: str, timeout_s: float = 3.0) -> dict:
    """/health once nothing waits, nothing runs and no KV block is held."""
    state = _wait_for(url, lambda s: s["num_waiting"] == s["num_running"] == s["num_kv_blocks_used"] == 0, timeout_s)
    assert state["queue_depth"] == 0
    return state


def _open_request(url: str, path: str, body: dict) -> socket.socket:
    """POST body on a raw connection and leave it open without reading: closing the socket is a disconnect.

    A streamed request that waits for the batch sends no headers yet, so a client library would block on it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _connect(server: ServerThread, data: bytes = b"") -> socket.socket:
    """A raw connection that has sent data (maybe nothing, maybe part of a request) and waits."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.sendall(data)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (socket.timeout if it does not within 5 s)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return data


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One whole response of a raw connection that stays open: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def _metric(url: str, name: str, **labels) -> float:
    """One sample of /metrics (0 when absent), matched by name and a subset of labels."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == str(v) for k, v in labels.items()):
            total += float(match.group(3))
    return total


# -- correctness ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 7, "top_p": 0.95}])
def test_streamed_text_equals_non_streamed_completion(client, tiny, sampling):
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=24, **sampling)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    if sampling["temperature"] == 0:  # the server adds nothing to the engine's own greedy output
        reference = _engine(tiny)
        ids = reference.encode(kwargs["prompt"])
        expected = reference.generate([ids], reference.sampling_params(max_new_tokens=24))[0]
        assert whole.choices[0].text == expected.text
        assert whole.usage.completion_tokens == expected.num_tokens


def test_streamed_text_equals_non_streamed_chat(client):
    kwargs = dict(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Name a colour."}],
                  max_completion_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    assert whole.object == "chat.completion" and chunks[0].object == "chat.completion.chunk"


def test_chat_without_max_tokens_gets_the_default_reply_length(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me everything."}],
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == DEFAULT_MAX_TOKENS and chat.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on."}],
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == DEFAULT_MAX_TOKENS


def test_usage_counts_are_exact(client, engine):
    prompt = "Once upon a time, in a small village,"
    num_prompt = len(engine.encode(prompt))
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == \
        (num_prompt, 9, num_prompt + 9)
    assert whole.choices[0].finish_reason == "length"
    token_ids = whole.choices[0].model_extra["token_ids"]
    assert len(token_ids) == 9 and engine.tokenizer.decode(token_ids, skip_special_tokens=True) == \
        whole.choices[0].text

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "return_token_ids": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == num_prompt and chunks[-1].usage.total_tokens == num_prompt + 9
    assert all(c.usage is None for c in chunks[:-1])
    assert sum(len(c.choices[0].model_extra["token_ids"]) for c in chunks[:-1]) == 9
    no_usage = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, stream=True))
    assert all(c.usage is None and c.choices for c in no_usage)  # OpenAI: usage only when asked for

    message = "Hi there"
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": message}],
                                          max_tokens=4, extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens == len(engine.encode(message, chat=True))
    assert chat.usage.completion_tokens == 4
    # token-id prompts are taken as they are
    by_ids = client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=2, temperature=0)
    assert by_ids.usage.prompt_tokens == 4


def test_tiny_temperatures_are_greedy(client):
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
    assert client.completions.create(**kwargs, temperature=1e-40).choices[0].text == greedy  # no inf/nan 500


def test_stop_strings_and_models_route(client, engine):
    free = client.completions.create(model=MODEL, prompt="Count: one two three", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = free.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(model=MODEL, prompt="Count: one two three", max_tokens=16, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="Count: one two three", max_tokens=16,
                                         temperature=0, stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


# -- errors --------------------------------------------------------------------------------------------------
CONTEXT = 2048  # tiny-smollm2's max_position_embeddings
BAD_REQUESTS = [
    # (id, endpoint, body, status, param, code)
    ("negative-temperature", "completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature", None),
    ("zero-max-tokens", "completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("max-tokens-not-int", "completions", {"prompt": "hi", "max_tokens": "3"}, 400, "max_tokens", None),
    ("over-context", "completions", {"prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens",
     "context_length_exceeded"),
    ("chat-over-context", "chat", {"messages": [{"role": "user", "content": "hi"}],
                                   "max_completion_tokens": CONTEXT}, 400, "max_completion_tokens",
     "context_length_exceeded"),
    ("empty-prompt", "completions", {"prompt": ""}, 400, "prompt", None),
    ("empty-token-prompt", "completions", {"prompt": []}, 400, "prompt", None),
    ("missing-prompt", "completions", {}, 400, "prompt", "missing_required_parameter"),
    ("batched-prompts", "completions", {"prompt": ["a", "b"]}, 400, "prompt", "unsupported_parameter"),
    ("token-out-of-vocab", "completions", {"prompt": [10**9]}, 400, "prompt", None),
    ("empty-messages", "chat", {"messages": []}, 400, "messages", None),
    ("bad-role", "chat", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None),
    ("n-above-max", "completions", {"prompt": "hi", "n": 17}, 400, "n", None),
    ("chat-n-zero", "chat", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n", None),
    ("logprobs-above-20", "completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
    ("suffix", "completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix", "unsupported_parameter"),
    ("presence-penalty", "completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty",
     "unsupported_parameter"),
    ("unknown-parameter", "completions", {"prompt": "hi", "frobnicate": True}, 400, "frobnicate",
     "unsupported_parameter"),
    ("top-p-zero", "completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("top-k-negative", "completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", None),
    ("bad-stop", "completions", {"prompt": "hi", "stop": [""]}, 400, "stop[0]", None),
    ("bad-seed", "completions", {"prompt": "hi", "seed": "x"}, 400, "seed", None),
    ("stream-options-without-stream", "completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options", None),
    ("ignore-eos-not-bool", "completions", {"prompt": "hi", "ignore_eos": "yes"}, 400, "ignore_eos", None),
    ("unknown-model", "completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("chat-unknown-model", "chat", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404,
     "model", "model_not_found"),
]


def _assert_error_body(body: dict, status: int, param=None, code=None) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 429 else error["type"])
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_status_and_openai_error_body(client, server, case):
    _, endpoint, body, status, param, code = case
    body = {"model": MODEL, **body}
    required = "messages" if endpoint == "chat" else "prompt"
    if required in body:
        create = client.chat.completions.create if endpoint == "chat" else client.completions.create
        known = {k: v for k, v in body.items() if k in ("model", "prompt", "messages", "stream_options")}
        with pytest.raises(openai.APIStatusError) as caught:
            create(**known, extra_body={k: v for k, v in body.items() if k not in known})
        response = caught.value.response
    else:  # the openai client refuses to send a request without its required field
        response = httpx.post(f"{server.url}/v1/{'chat/' if endpoint == 'chat' else ''}completions", json=body)
    assert response.status_code == status
    _assert_error_body(response.json(), status, param, code)
    assert _health(server.url)["status"] == "ok"


def test_malformed_bodies_oversized_bodies_and_unknown_routes(client, server):
    url = f"{server.url}/v1/completions"
    for raw in (b'{"prompt": "hi",', b"[1, 2]", b"\xff\xfe", b""):
        response = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, raw
        _assert_error_body(response.json(), 400, code="invalid_json")
    huge = "word " * 2000  # over the fixture's 4096-byte limit
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model=MODEL, prompt=huge, max_tokens=1)
    assert caught.value.status_code == 413
    _assert_error_body(caught.value.response.json(), 413, code="request_too_large")

    def chunks():  # no content-length: the limit must hold while the body streams in
        for _ in range(100):
            yield b"x" * 100

    response = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    for method, path in (("GET", "/v1/nothing"), ("GET", "/v1/completions")):
        response = httpx.request(method, f"{server.url}{path}")
        assert response.status_code in (404, 405)
        _assert_error_body(response.json(), response.status_code)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    # still healthy and still answering
    assert _health(server.url)["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens <= 2


def test_api_key_guards_every_v1_route(tiny):
    app = create_app(_engine(tiny), ServeConfig(served_model_name=MODEL, api_key="s3cret"))
    with ServerThread(app) as server:
        for key in (None, "wrong", "s3cret-but-longer"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for method, path, body in (("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL}", None),
                                       ("POST", "/v1/completions", {"prompt": "hi"}),
                                       ("POST", "/v1/chat/completions", {"messages": []})):
                response = httpx.request(method, f"{server.url}{path}", json=body, headers=headers)
                assert response.status_code == 401, (key, path)
                _assert_error_body(response.json(), 401, code="invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens <= 2
        assert _health(server.url)["status"] == "ok"  # /health and /metrics stay open for probes
        assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_full_queue_answers_429_then_recovers(tiny):
    # a batch of one row, so that the second request waits for it
    app = create_app(_engine(tiny, max_num_seqs=1), served_model_name=MODEL, max_queue=1)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        long = dict(model=MODEL, prompt="hi", max_tokens=LONG, stream=True, extra_body={"ignore_eos": True})
        running = client.completions.create(**long)
        next(iter(running))  # the first token: it is in the batch now
        waiting = _open_request(server.url, "/v1/completions",
                                {"prompt": "hi", "max_tokens": LONG, "stream": True, "ignore_eos": True})
        _wait_for(server.url, lambda s: s["num_waiting"] == 1)  # it takes the one queue slot
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert caught.value.status_code == 429
        _assert_error_body(caught.value.response.json(), 429, code="queue_full")
        state = _health(server.url)
        assert (state["queue_depth"], state["num_running"]) == (1, 1)
        waiting.close()
        running.close()
        _wait_idle(server.url)
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None


def test_queue_deadline_answers_503_with_retry_after(tiny):
    app = create_app(_engine(tiny, max_num_seqs=1), served_model_name=MODEL, max_queue_wait_s=0.3)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        stream = client.completions.create(model=MODEL, prompt="hi", max_tokens=LONG, stream=True,
                                           extra_body={"ignore_eos": True})
        running = iter(stream)
        next(running)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert time.monotonic() - started >= 0.3
        response = caught.value.response
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        _assert_error_body(response.json(), 503, code="queue_timeout")
        assert response.json()["error"]["type"] == "server_error"
        # a stream that never got a token answers the same status, not a 200 stream holding an error
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=10,
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as response:
            assert response.status_code == 503 and "retry-after" in response.headers
            _assert_error_body(json.loads(response.read()), 503, code="queue_timeout")
        # the request in the batch outlived the deadline and still streams
        for _ in range(3):
            assert next(running).choices[0].text is not None
        assert _metric(server.url, "labkit_request_finished_total", reason="queue_timeout") == 2
        stream.close()
        _wait_idle(server.url)


class _FailingEngine:
    """The real engine, except that the steps `failing(step number)` picks raise."""

    def __init__(self, engine, failing):
        self._engine, self.failing, self.num_calls = engine, failing, 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        self.num_calls += 1
        if self.failing(self.num_calls):
            self._engine.step()  # the step really runs (blocks allocated, tokens computed), then fails
            raise RuntimeError("simulated device failure")
        return self._engine.step()


def test_failed_step_answers_500_frees_its_blocks_and_the_server_lives_on(tiny):
    engine = _FailingEngine(_engine(tiny), failing=lambda n: n % 2 == 0)  # a request's second step fails
    app = create_app(engine, served_model_name=MODEL)

    @app.get("/boom")
    async def boom():  # an unexpected error: its 500 is counted like any other response
        raise RuntimeError("unexpected")

    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        kwargs = dict(model=MODEL, prompt="hi", max_tokens=8, extra_body={"ignore_eos": True})
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(**kwargs)
        body = caught.value.response.json()
        _assert_error_body(body, 500, code="generation_failed")
        assert body["error"]["type"] == "server_error" and "simulated device failure" in body["error"]["message"]
        with pytest.raises(openai.APIError, match="simulated device failure"):
            list(client.completions.create(**kwargs, stream=True))  # an error event ends the 200 stream
        engine.failing = lambda n: True  # now a stream fails before its first token: a real 500 status
        with httpx.stream("POST", f"{server.url}/v1/completions", json={"prompt": "hi", "stream": True}) as response:
            assert response.status_code == 500
            _assert_error_body(json.loads(response.read()), 500, code="generation_failed")
        assert httpx.get(f"{server.url}/boom").status_code == 500
        state = _wait_idle(server.url)  # every block of the failed batches is free again
        assert state["status"] == "ok"
        assert _metric(server.url, "labkit_request_finished_total", reason="error") == 3
        assert _metric(server.url, "labkit_requests_total", route="/v1/completions", status=500) == 2
        assert _metric(server.url, "labkit_requests_total", route="other", status=500) == 1
        engine.failing = lambda n: False
        assert client.completions.create(**kwargs).usage.completion_tokens == 8


# -- hostile clients -----------------------------------------------------------------------------------------
def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE_BODIES = [
    # (id, endpoint, raw JSON body, status, param, code): 400s (or the 404 they deserve), never a 500
    ("nested-100k-deep", "completions", '{"prompt": %s}' % _deep(100_000), 400, None, "invalid_json"),
    ("chat-nested-100k-deep", "chat", '{"messages": %s}' % _deep(100_000), 400, None, "invalid_json"),
    ("nested-no-op-parameter", "completions", '{"prompt": "hi", "n": %s}' % _deep(500), 400, None, "invalid_json"),
    ("lone-surrogate-prompt", "completions", r'{"prompt": "hi \ud800"}', 400, "prompt", None),
    ("lone-surrogate-prompt-list", "completions", r'{"prompt": ["hi \udfff"]}', 400, "prompt", None),
    ("chat-lone-surrogate", "chat", r'{"messages": [{"role": "user", "content": "hi \ud800"}]}', 400,
     "messages[0].content", None),
    ("chat-lone-surrogate-text-part", "chat",
     r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}', 400,
     "messages[0].content", None),
    ("lone-surrogate-model", "completions", r'{"prompt": "hi", "model": "x\ud800"}', 404, "model",
     "model_not_found"),
    ("chat-lone-surrogate-parameter", "chat", r'{"messages": [{"role": "user", "content": "hi"}], "\ud800": 1}',
     400, "\ud800", "unsupported_parameter"),
]


@pytest.mark.parametrize("case", HOSTILE_BODIES, ids=[c[0] for c in HOSTILE_BODIES])
def test_hostile_bodies_get_a_400_not_a_500(roomy, case):
    _, endpoint, raw, status, param, code = case
    response = httpx.post(f"{roomy.url}/v1/{'chat/' if endpoint == 'chat' else ''}completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    _assert_error_body(response.json(), status, param, code)
    assert _metric(roomy.url, "labkit_requests_total", status=500) == 0
    assert _health(roomy.url)["status"] == "ok"


def test_huge_prompts_are_tokenized_off_the_event_loop(roomy):
    prompt = "word " * 190_000  # ~1 MB: a few tenths of a second to tokenize, and far over the context
    bodies = [("completions", {"prompt": prompt}), ("chat", {"messages": [{"role": "user", "content": prompt}]})] * 2

    async def main() -> tuple[list[httpx.Response], list[float], float]:
        async with httpx.AsyncClient(base_url=roomy.url, timeout=60) as http:
            started = time.perf_counter()
            posts = [asyncio.create_task(http.post(f"/v1/{'chat/' if endpoint == 'chat' else ''}completions",
                                                   json=body)) for endpoint, body in bodies]
            health_s = []
            while not all(post.done() for post in posts):
                asked = time.perf_counter()
                assert (await http.get("/health")).status_code == 200
                health_s.append(time.perf_counter() - asked)
                await asyncio.sleep(0.01)
            return [post.result() for post in posts], health_s, time.perf_counter() - started

    responses, health_s, elapsed_s = asyncio.run(main())
    for response in responses:
        assert response.status_code == 400
        _assert_error_body(response.json(), 400, code="context_length_exceeded")
    # four prompts took a while to tokenize, one after another; /health answered at once all along
    assert elapsed_s > 0.5 and len(health_s) >= 5 and max(health_s) < 0.25, (elapsed_s, max(health_s))


def test_post_bodies_must_say_they_are_json(server):
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})):
        raw = json.dumps(body).encode()
        # what a page on another site may POST without asking first (a CORS "simple request")
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             None):
            headers = {"content-type": content_type} if content_type else {}
            response = httpx.post(f"{server.url}{path}", content=raw, headers=headers)
            assert response.status_code == 415, content_type
            _assert_error_body(response.json(), 415, code="unsupported_media_type")
        for content_type in ("application/json; charset=utf-8", "Application/JSON"):
            response = httpx.post(f"{server.url}{path}", content=raw, headers={"content-type": content_type})
            assert response.status_code == 200, content_type


def test_host_header_must_name_this_machine_over_loopback(tiny, server):
    port = server.port
    with httpx.Client(base_url=server.url) as http:
        # a page on evil.example that re-resolves its name to 127.0.0.1 (DNS rebinding) sends its own Host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::1"):
            for method, path in (("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                                 ("POST", "/v1/completions")):
                response = http.request(method, path, headers={"host": host},
                                        json={"prompt": "hi", "max_tokens": 1} if method == "POST" else None)
                assert response.status_code == 400, (host, path)
                _assert_error_body(response.json(), 400, code="invalid_host")
        for host in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}"):
            assert http.get("/v1/models", headers={"host": host}).status_code == 200, host
    assert _metric(server.url, "labkit_requests_total", route="/health", status=400) >= 4
    with ServerThread(create_app(_engine(tiny), served_model_name=MODEL, check_host=False)) as open_server:
        assert httpx.get(f"{open_server.url}/health", headers={"host": "evil.example"}).status_code == 200


def test_slow_and_idle_connections_are_closed_and_the_server_stays_healthy(tiny):
    app = create_app(_engine(tiny), served_model_name=MODEL, header_timeout_s=0.5, body_timeout_s=0.5)
    with ServerThread(app) as server:
        head = f"Host: 127.0.0.1:{server.port}\r\n".encode()
        idle = _connect(server)
        slow_head = _connect(server, b"GET /health HTTP/1.1\r\n" + head + b"X-Slow: ")
        slow_body = _connect(server, b"POST /v1/completions HTTP/1.1\r\n" + head + b"Content-Type: application/json"
                                     b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        kept = _connect(server, b"GET /health HTTP/1.1\r\n" + head + b"\r\n")
        opened = time.monotonic()
        assert _read_response(kept)[0] == 200
        kept.sendall(b"GET /hea")  # the deadline starts again after each response
        status, headers, body = _read_response(slow_body)
        assert status == 408 and headers["connection"] == "close"
        _assert_error_body(json.loads(body), 408, code="request_timeout")
        for sock in (slow_body, idle, slow_head, kept):
            assert _read_until_closed(sock) == b""
        assert time.monotonic() - opened >= 0.4  # closed by the deadline, not at once

        # the deadlines cover reading a request, not answering it: a stream outlives them
        with httpx.Client(base_url=server.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": LONG, "stream": True,
                                                              "ignore_eos": True}) as stream:
                events, started = stream.iter_lines(), time.monotonic()
                while time.monotonic() - started < 1.0:
                    assert next(events) is not None
            assert http.get("/health").status_code == 200
        _wait_idle(server.url)
        assert _metric(server.url, "labkit_requests_total", route="/v1/completions", status=408) == 1


def test_connections_over_the_limit_are_answered_503(tiny):
    with ServerThread(create_app(_engine(tiny), served_model_name=MODEL, max_connections=2)) as server:
        held = [_connect(server, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
                for _ in range(2)]
        assert [_read_response(sock)[0] for sock in held] == [200, 200]  # both open, kept alive
        for method, path in (("GET", "/health"), ("POST", "/v1/completions")):
            response = httpx.request(method, f"{server.url}{path}", json={"prompt": "hi"} if method == "POST" else None)
            assert response.status_code == 503 and response.headers["connection"] == "close"
            assert "retry-after" in response.headers
            _assert_error_body(response.json(), 503, code="too_many_connections")
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 3
        while httpx.get(f"{server.url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the closed connections were not let go"
            time.sleep(0.05)
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        assert _metric(server.url, "labkit_requests_total", route="/health", status=503) >= 1
        assert _metric(server.url, "labkit_requests_total", route="/v1/completions", status=503) == 1


def test_client_leaving_mid_upload_is_counted_499_and_logs_nothing(server, caplog):
    caplog.set_level(logging.WARNING)
    uvicorn_logger = logging.getLogger("uvicorn")  # uvicorn's own handlers do not propagate to the root logger
    uvicorn_logger.addHandler(caplog.handler)
    try:
        left = _metric(server.url, "labkit_requests_total", route="/v1/completions", status=499)
        sock = _connect(server, f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                                '{"prompt": "'.encode())
        time.sleep(0.1)
        sock.close()
        deadline = time.monotonic() + 3
        while _metric(server.url, "labkit_requests_total", route="/v1/completions", status=499) == left:
            assert time.monotonic() < deadline, "the hang-up was not seen"
            time.sleep(0.02)
        assert _health(server.url)["status"] == "ok"
    finally:
        uvicorn_logger.removeHandler(caplog.handler)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


# -- disconnects and load ------------------------------------------------------------------------------------
def test_disconnect_mid_stream_cancels_the_generation(client, server):
    cancelled = _metric(server.url, "labkit_request_finished_total", reason="cancelled")
    generated = _metric(server.url, "labkit_generation_tokens_total")
    stream = client.completions.create(model=MODEL, prompt="Tell me a long story", max_tokens=LONG, stream=True,
                                       extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    _wait_idle(server.url, timeout_s=2.0)  # LONG tokens take several seconds: it stopped early
    assert _metric(server.url, "labkit_request_finished_total", reason="cancelled") == cancelled + 1
    assert _metric(server.url, "labkit_generation_tokens_total") - generated < LONG / 2

    # a non-streaming client that gives up cancels its generation too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": LONG, "ignore_eos": True},
                   timeout=httpx.Timeout(5, read=0.3))
    _wait_idle(server.url, timeout_s=2.0)
    assert _metric(server.url, "labkit_request_finished_total", reason="cancelled") == cancelled + 2
    assert client.completions.create(model=MODEL, prompt="still there?", max_tokens=3).usage.completion_tokens <= 3


def _steps_with_rows_over_one(url: str) -> float:
    return _metric(url, "labkit_step_rows_count") - _metric(url, "labkit_step_rows_bucket", le="1.0")


def _alone(tiny, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt's greedy text generated alone, on an engine of its own."""
    reference = _engine(tiny)
    params = reference.sampling_params(max_new_tokens=max_tokens, ignore_eos=True)
    return [reference.generate([reference.encode(p)], params)[0].text for p in prompts]


async def _stream_text(client, prompt: str, max_tokens: int) -> str:
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async with stream:
        return "".join([chunk.choices[0].text async for chunk in stream])


def test_concurrent_streams_are_decoded_together_and_each_gets_its_text_alone(tiny, server):
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Roses are red, violets"]
    max_tokens = 96  # long enough that the four streams overlap, whenever each arrives
    batched_steps = _steps_with_rows_over_one(server.url)

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            return await asyncio.gather(*(_stream_text(client, p, max_tokens) for p in prompts))

    texts = asyncio.run(main())
    assert _steps_with_rows_over_one(server.url) - batched_steps >= max_tokens / 2  # mostly decoded together
    assert texts == _alone(tiny, prompts, max_tokens)  # batching changes no request's greedy text
    _wait_idle(server.url)


def test_no_kv_block_leaks_after_finished_cancelled_preempted_and_disconnected_requests(tiny):
    # 12 blocks of 16 tokens hold fewer than four 70-token requests: the batch preempts while it grows
    engine = _engine(tiny, max_num_seqs=4, num_kv_blocks=12)
    prompts = [f"Request number {i} says" for i in range(4)]
    max_tokens, long = 64, 170  # a long request still fits the cache alone (11 blocks)

    async def finished_stream(client, i: int) -> str:
        return await _stream_text(client, prompts[i], max_tokens)

    async def finished_whole(client, i: int) -> str:
        reply = await client.completions.create(model=MODEL, prompt=f"whole {i}", max_tokens=8,
                                                extra_body={"ignore_eos": True})
        return f"whole:{reply.usage.completion_tokens}"

    async def left_mid_stream(client, i: int) -> str:
        stream = await client.completions.create(model=MODEL, prompt=f"leave {i}", max_tokens=long, stream=True,
                                                 extra_body={"ignore_eos": True})
        async with stream:
            async for _chunk in stream:
                return "left"

    async def hung_up(server_url: str, i: int) -> str:  # maybe still waiting for the batch, maybe running
        async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=0.05)) as http:
            try:
                await http.post(f"{server_url}/v1/completions", json={"prompt": f"hang {i}", "max_tokens": long,
                                                                       "ignore_eos": True})
            except httpx.ReadTimeout:
                return "hung up"
        return "answered"

    with ServerThread(create_app(engine, served_model_name=MODEL)) as server:
        async def main() -> list[str]:
            async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                          timeout=60) as client:
                return await asyncio.gather(*(finished_stream(client, i) for i in range(4)),
                                            *(finished_whole(client, i) for i in range(2)),
                                            *(left_mid_stream(client, i) for i in range(2)),
                                            *(hung_up(server.url, i) for i in range(2)))

        outcomes = asyncio.run(main())
        assert outcomes[4:] == ["whole:8"] * 2 + ["left"] * 2 + ["hung up"] * 2
        state = _wait_idle(server.url)
        assert state["num_kv_blocks"] == 12
        assert _metric(server.url, "labkit_preemptions_total") > 0
        assert _metric(server.url, "labkit_request_finished_total", reason="cancelled") == 4
    assert outcomes[:4] == _alone(tiny, prompts, max_tokens)  # preempted and recomputed, the same text
    stats = engine.stats()
    assert (stats.num_used_blocks, stats.num_running, stats.num_waiting, engine.num_unfinished) == (0, 0, 0, 0)


def test_load_of_concurrent_streams_with_early_disconnects_leaves_server_idle(server):
    num_streams, max_tokens = 60, 8
    finished_before = _metric(server.url, "labkit_request_finished_total")
    accepted_before = _metric(server.url, "labkit_requests_accepted_total")

    async def one(client, i: int) -> str:
        stream = await client.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=max_tokens,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        usage = None
        async with stream:
            async for chunk in stream:
                if i % 3 == 0:  # leaves after its first chunk
                    return "left"
                usage = chunk.usage or usage
        assert usage.completion_tokens == max_tokens
        return "done"

    async def give_up(client, i: int) -> str:  # may still be waiting in the queue when it leaves
        try:
            return await asyncio.wait_for(one(client, i), timeout=0.05)
        except asyncio.TimeoutError:
            return "timed out"

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            return await asyncio.gather(*(give_up(client, i) if i % 7 == 3 else one(client, i)
                                          for i in range(num_streams)))

    outcomes = asyncio.run(main())
    assert outcomes.count("done") >= num_streams // 2
    assert "left" in outcomes
    state = _wait_idle(server.url, timeout_s=5.0)
    assert state["status"] == "ok"
    assert _metric(server.url, "labkit_queue_depth") == 0 and _metric(server.url, "labkit_requests_running") == 0
    # every accepted stream ended exactly once: finished, cancelled while running, or dropped from the queue
    # (a stream that gave up before its request was sent was never accepted)
    accepted = _metric(server.url, "labkit_requests_accepted_total") - accepted_before
    assert num_streams - outcomes.count("timed out") <= accepted <= num_streams
    assert _metric(server.url, "labkit_request_finished_total") - finished_before == accepted
    assert _metric(server.url, "labkit_requests_total", route="/v1/completions", status=500) == 0
    text = httpx.get(f"{server.url}/metrics").text
    for name, kind in (("labkit_requests_total", "counter"), ("labkit_prompt_tokens_total", "counter"),
                       ("labkit_generation_tokens_total", "counter"), ("labkit_queue_depth", "gauge"),
                       ("labkit_time_to_first_token_seconds", "histogram"),
                       ("labkit_inter_token_latency_seconds", "histogram")):
        assert f"# TYPE {name} {kind}" in text
    assert _metric(server.url, "labkit_time_to_first_token_seconds_count") > 0
    assert _metric(server.url, "labkit_inter_token_latency_seconds_bucket", le="+Inf") == \
        _metric(server.url, "labkit_inter_token_latency_seconds_count")


def test_engine_metrics_and_health_agree(client, server, engine):
    engine_gauges = (("labkit_requests_running", "gauge"), ("labkit_requests_waiting", "gauge"),
                     ("labkit_batch_size", "gauge"), ("labkit_step_rows", "histogram"),
                     ("labkit_kv_blocks_used", "gauge"), ("labkit_kv_blocks_total", "gauge"),
                     ("labkit_kv_cache_usage_ratio", "gauge"), ("labkit_preemptions_total", "counter"),
                     ("labkit_prefix_cache_hit_rate", "gauge"))
    text = httpx.get(f"{server.url}/metrics").text
    assert all(f"# TYPE {name} {kind}" in text for name, kind in engine_gauges)
    stream = client.completions.create(model=MODEL, prompt="hi", max_tokens=LONG, stream=True,
                                       extra_body={"ignore_eos": True})
    with stream:
        next(iter(stream))
        busy = _health(server.url)
        assert busy["num_running"] == 1 and busy["num_kv_blocks_used"] > 0
        assert _metric(server.url, "labkit_requests_running") == 1
        assert 0 < _metric(server.url, "labkit_kv_cache_usage_ratio") < 1
    prompt = "A prompt long enough to fill a whole KV block of sixteen tokens, and then some more words."
    for _ in range(2):  # the second one finds the first one's full blocks in the prefix cache
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    state = _wait_idle(server.url)
    used, total = _metric(server.url, "labkit_kv_blocks_used"), _metric(server.url, "labkit_kv_blocks_total")
    assert (used, total) == (state["num_kv_blocks_used"], state["num_kv_blocks"]) == (0, engine.blocks.num_blocks)
    assert _metric(server.url, "labkit_kv_cache_usage_ratio") == 0
    assert _metric(server.url, "labkit_requests_running") == _metric(server.url, "labkit_requests_waiting") == 0
    assert 0 < _metric(server.url, "labkit_prefix_cache_hit_rate") <= 1
    assert 1 <= _metric(server.url, "labkit_batch_size") <= engine.config.scheduler.max_num_seqs
    steps = _metric(server.url, "labkit_step_rows_count")
    assert steps > 0 and _metric(server.url, "labkit_step_rows_sum") >= steps
    assert _metric(server.url, "labkit_step_rows_bucket", le="+Inf") == steps


# -- the command line ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_subprocess_answers_ping_and_stops_cleanly(tmp_path, capsys):
    port = _free_port()
    env = {**os.environ, "LABKIT_API_KEY": "from-env"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "serve", "--model", "tiny-smollm2", "--dummy",
                             "--device", "cpu", "--port", str(port), "--max-queue", "4", "--max-num-seqs", "4",
                             "--max-num-batched-tokens", "64", "--kv-cache-mb", "4", "--max-queue-wait", "30",
                             "--default-max-tokens", "3", "--timeout-graceful-shutdown", "1.5"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "labkit serve did not come up"
            time.sleep(0.2)
        assert cli.main(["ping", "--port", str(port), "--api-key", "from-env", "--json", "--max-tokens", "5"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["model"] == "tiny-smollm2" and result["completion_tokens"] <= 5
        assert result["latency_ms"] >= result["ttft_ms"] > 0
        assert cli.main(["ping", "--port", str(port), "--endpoint", "completions", "--max-tokens", "3",
                         "--api-key", "from-env"]) == 0
        assert "ms" in capsys.readouterr().out
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": "Bearer from-env"},
                          json={"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}, timeout=30)
        assert chat.json()["usage"]["completion_tokens"] == 3  # --default-max-tokens
        assert cli.main(["ping", "--port", str(port), "--model", "tiny-smollm2"]) == 1  # no key
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "HTTP 401" in err[0]

        # SIGTERM mid-stream: new requests answer 503 while the stream has the grace period to finish, then it
        # ends with an error event and [DONE]
        url, key = f"http://127.0.0.1:{port}", {"Authorization": "Bearer from-env"}
        with httpx.stream("POST", f"{url}/v1/completions", headers=key, timeout=30,
                          json={"prompt": "hi", "max_tokens": 2000, "stream": True, "ignore_eos": True}) as stream:
            events = (line for line in stream.iter_lines() if line.startswith("data:"))
            assert json.loads(next(events)[5:])["choices"]
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while (health := httpx.get(f"{url}/health", timeout=5)).status_code == 200:
                assert time.monotonic() - signalled < 1, "SIGTERM was not taken"
            assert health.status_code == 503 and health.json()["status"] == "shutting_down"
            refused = httpx.post(f"{url}/v1/completions", headers=key, json={"prompt": "hi", "max_tokens": 2})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            _assert_error_body(refused.json(), 503, code="shutting_down")
            rest = list(events)
        assert time.monotonic() - signalled < 1.5 + 1  # the grace period, then the last events' flush
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][5:])["error"]["code"] == "shutting_down"
        assert all("choices" in json.loads(event[5:]) for event in rest[:-2])
        proc.wait(timeout=30)
        # the process is gone within the grace period and a second: no flush wait, no slow interpreter exit
        assert time.monotonic() - signalled < 1.5 + 1, f"exited {time.monotonic() - signalled:.2f} s after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()
    log_text = (tmp_path / "serve.log").read_text()
    assert "labkit serve: tiny-smollm2 on http://127.0.0.1:" in log_text and "stopped by SIGTERM" in log_text
    assert "batch of up to 4" in log_text


def test_cli_serve_and_ping_report_bad_input_in_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--model", "tiny-smollm2", "--dummy", "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"labkit serve: cannot listen on 127.0.0.1:{port}")
    assert cli.main(["ping", "--port", str(_free_port()), "--model", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("labkit ping: cannot reach")


def test_cli_serve_names_a_command_that_runs_an_unsupported_architecture(tmp_path, capsys, tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=tiny.model.config.vocab_size, n_positions=64, n_embd=16, n_layer=1,
                               n_head=2, bos_token_id=0, eos_token_id=0)).save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    capsys.readouterr()
    assert cli.main(["serve", "--model", str(model_dir), "--device", "cpu", "--port", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("labkit serve:")]
    assert len(err) == 1 and "'gpt2'" in err[0] and "llama, mistral, qwen2" in err[0], err
    advice = f"labkit baseline --engine hf --model {model_dir}"
    assert advice in err[0] and "(--engine hf)" not in err[0], err  # no flag that serve would reject
    assert cli.main([*advice.split()[1:], "--device", "cpu", "--max-tokens", "2", "--repeats", "1", "--no-save",
                     "--no-progress"]) == 0  # the advice works


@pytest.mark.parametrize("flag, value", [("--max-num-seqs", "0"), ("--max-num-batched-tokens", "many"),
                                         ("--kv-cache-mb", "0"), ("--max-queue-wait", "-1"),
                                         ("--max-queue-wait", "inf"), ("--default-max-tokens", "0"),
                                         ("--max-connections", "0"), ("--header-timeout", "0"),
                                         ("--body-timeout", "nan"), ("--timeout-keep-alive", "-1"),
                                         ("--timeout-graceful-shutdown", "inf")])
def test_cli_serve_engine_flags_are_validated_in_one_line(capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--model", "tiny-smollm2", "--dummy", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and flag in err[0] and value in err[0]


def test_serve_config_is_validated():
    for bad in (dict(max_queue=-1), dict(max_body_bytes=0), dict(api_key=""), dict(served_model_name=" "),
                dict(max_queue_wait_s=0), dict(max_queue_wait_s=float("inf")), dict(max_queue_wait_s=True),
                dict(default_max_tokens=0), dict(default_max_tokens=2.5), dict(max_connections=0),
                dict(header_timeout_s=0), dict(body_timeout_s=float("inf")), dict(keep_alive_timeout_s=-1),
                dict(shutdown_grace_s=True), dict(check_host="yes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServeConfig(**bad)
