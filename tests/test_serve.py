"""`labkit serve`, driven by the official `openai` client: same text streamed or not, exact usage, OpenAI error
bodies with the right status codes, cancellation on disconnect, a bounded queue, and health after all of it."""

import asyncio
import json
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
from labkit.generation import Engine
from labkit.serve import ServeConfig, ServerThread, create_app

MODEL = "tiny"
LONG = 1500  # tokens: seconds of decoding, so a generation that was not cancelled would be seen running


def _engine(tiny) -> Engine:
    """A fresh engine (its own KV cache) over the session's tiny random model."""
    return Engine.from_hf(tiny.model, tiny.tokenizer, name="tiny-smollm2")


@pytest.fixture(scope="module")
def engine(tiny):
    return _engine(tiny)


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, served_model_name=MODEL, max_queue=64, max_body_bytes=4096)
    with ServerThread(app) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def _health(url: str) -> dict:
    response = httpx.get(f"{url}/health", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_idle(url: str, timeout_s: float = 3.0) -> dict:
    """/health once nothing waits and nothing runs; fails if that takes longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = _health(url)
        if state["queue_depth"] == 0 and state["num_running"] == 0:
            return state
        assert time.monotonic() < deadline, f"the server is still busy: {state}"
        time.sleep(0.02)


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
    ("n-above-1", "completions", {"prompt": "hi", "n": 2}, 400, "n", "unsupported_parameter"),
    ("chat-n-above-1", "chat", {"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n",
     "unsupported_parameter"),
    ("logprobs", "completions", {"prompt": "hi", "logprobs": 1}, 400, "logprobs", "unsupported_parameter"),
    ("presence-penalty", "completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty",
     "unsupported_parameter"),
    ("unknown-parameter", "completions", {"prompt": "hi", "frobnicate": True}, 400, "frobnicate",
     "unsupported_parameter"),
    ("top-p-zero", "completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("top-k-negative", "completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", None),
    ("bad-stop", "completions", {"prompt": "hi", "stop": [""]}, 400, "stop", None),
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

    response = httpx.post(url, content=chunks())
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
    app = create_app(_engine(tiny), served_model_name=MODEL, max_queue=1)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        long = dict(model=MODEL, prompt="hi", max_tokens=LONG, stream=True, extra_body={"ignore_eos": True})
        running = client.completions.create(**long)
        next(iter(running))  # the first token: it is on the worker now
        waiting = client.completions.create(**long)  # takes the one queue slot
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


class _FailingEngine:
    """The real engine, except that every generation raises after its first piece of text."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream_text(self, prompt, params):
        for i, delta in enumerate(self._engine.stream_text(prompt, params)):
            if i == 1:
                raise RuntimeError("simulated device failure")
            yield delta


def test_failed_generation_answers_500_and_the_worker_lives_on(tiny):
    app = create_app(_FailingEngine(_engine(tiny)), served_model_name=MODEL)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        kwargs = dict(model=MODEL, prompt="hi", max_tokens=8, extra_body={"ignore_eos": True})
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(**kwargs)
        body = caught.value.response.json()
        _assert_error_body(body, 500, code="generation_failed")
        assert body["error"]["type"] == "server_error" and "simulated device failure" in body["error"]["message"]
        with pytest.raises(openai.APIError, match="simulated device failure"):
            list(client.completions.create(**kwargs, stream=True))  # an error event ends the stream
        state = _wait_idle(server.url)
        assert state["status"] == "ok"
        assert _metric(server.url, "labkit_request_finished_total", reason="error") == 2


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
                             "--device", "cpu", "--port", str(port), "--max-queue", "4"],
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
        assert cli.main(["ping", "--port", str(port), "--model", "tiny-smollm2"]) == 1  # no key
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "HTTP 401" in err[0]
    finally:
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


def test_serve_config_is_validated():
    for bad in (dict(max_queue=-1), dict(max_body_bytes=0), dict(api_key=""), dict(served_model_name=" ")):
        with pytest.raises(ValueError):
            ServeConfig(**bad)
