"""The engine's worker as the server publishes it: admission exactly as `labkit serve --help` says (up to
max_num_seqs running plus max_queue waiting, one more answered 429), the 503s with Retry-After while draining,
and the engine's settings on the model card and /metrics."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tests.serving.test_server import MODEL, _assert_error_body, _engine, _metric

from labkit.serving import ServerThread, create_app
from labkit.serving.server_info import prefix_caching_in_card, prefix_caching_in_metrics


class _Gate:
    """Holds the engine's first step until opened, so that every request sent meanwhile is accepted or refused
    before any of them finishes: admission is then decided by the counts alone, not by timing."""

    def __init__(self, engine):
        self.opened = threading.Event()
        self._step = engine.step
        engine.step = self.step  # the worker calls engine.step(): the real one, once the gate is open

    def step(self):
        if not self.opened.wait(60):
            raise RuntimeError("the test never opened the gate")
        return self._step()


def _wait(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("max_num_seqs, max_queue, extra", [(2, 3, 2), (3, 0, 1), (1, 2, 3)])
def test_admission_is_max_num_seqs_running_plus_max_queue_waiting(tiny, max_num_seqs, max_queue, extra):
    engine = _engine(tiny, max_num_seqs=max_num_seqs)
    gate = _Gate(engine)
    admitted = max_num_seqs + max_queue
    with ServerThread(create_app(engine, served_model_name=MODEL, max_queue=max_queue)) as server, \
            ThreadPoolExecutor(admitted + extra) as pool:
        def send(i: int) -> httpx.Response:
            body = {"prompt": f"request {i}", "max_tokens": 2, "ignore_eos": True}
            return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)

        replies = [pool.submit(send, i) for i in range(admitted + extra)]
        try:
            # each request has its answer (refused) or its place (accepted) before any step runs
            accepted = lambda: _metric(server.url, "labkit_requests_accepted_total")  # noqa: E731
            _wait(lambda: accepted() + sum(r.done() for r in replies) == len(replies), "every request decided")
            assert accepted() == admitted
            refused = [r.result() for r in replies if r.done()]
            assert [r.status_code for r in refused] == [429] * extra
            for response in refused:
                _assert_error_body(response.json(), 429, code="queue_full")
                assert response.headers["retry-after"] == "1"
        finally:
            gate.opened.set()
        statuses = sorted(r.result().status_code for r in replies)
    assert statuses == [200] * admitted + [429] * extra


def test_draining_answers_503_with_retry_after(tiny):
    app = create_app(_engine(tiny), served_model_name=MODEL)
    with ServerThread(app) as server:
        app.state.worker.drain()  # what the server does on SIGTERM (tests/serving/test_server.py sends one)
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        _assert_error_body(response.json(), 503, code="shutting_down")
        assert response.json()["error"]["type"] == "server_error"
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as stream:
            assert stream.status_code == 503 and stream.headers["retry-after"] == "1"
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "shutting_down"


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_the_engine_settings_are_on_the_model_card_and_metrics(tiny, enable_prefix_caching):
    engine = _engine(tiny, max_num_seqs=3, enable_prefix_caching=enable_prefix_caching)
    with ServerThread(create_app(engine, served_model_name=MODEL)) as server:
        card = httpx.get(f"{server.url}/v1/models", timeout=5).json()["data"][0]
        assert card["id"] == MODEL and card["engine"]["max_num_seqs"] == 3
        assert card["engine"]["prefix_caching"] is enable_prefix_caching
        assert prefix_caching_in_card(card) is enable_prefix_caching
        assert httpx.get(f"{server.url}/v1/models/{MODEL}", timeout=5).json() == card
        page = httpx.get(f"{server.url}/metrics", timeout=5).text
        assert _metric(server.url, "labkit_engine_config_info", model=MODEL, max_num_seqs=3,
                       prefix_caching=enable_prefix_caching, num_kv_blocks=engine.blocks.num_blocks) == 1
        assert prefix_caching_in_metrics(page) is enable_prefix_caching


def test_prefix_caching_is_read_from_vllm_pages_and_unknown_elsewhere():
    vllm = ('# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n'
            '# TYPE vllm:cache_config_info gauge\n'
            'vllm:cache_config_info{block_size="16",enable_prefix_caching="False",gpu_memory_utilization="0.9"} 1.0\n')
    assert prefix_caching_in_metrics(vllm) is False
    assert prefix_caching_in_metrics(vllm.replace('"False"', '"True"')) is True
    for page in (None, "", "<html>not metrics</html>", "# TYPE up gauge\nup 1\n"):
        assert prefix_caching_in_metrics(page) is None
    for card in (None, {}, {"id": "m", "max_model_len": 8}, {"engine": "vllm"}, {"engine": {"prefix_caching": 3}}):
        assert prefix_caching_in_card(card) is None
    assert prefix_caching_in_card({"id": "m", "enable_prefix_caching": True}) is True


def test_a_request_whose_prompt_forward_fails_is_answered_500_and_the_server_serves_on(tiny):
    engine = _engine(tiny)
    real = engine.prompt_logits
    fails = iter([True])

    def prompt_logits(*args, **kwargs):  # the first prompt-logprobs forward fails, as a model fault would
        if next(fails, False):
            raise RuntimeError("injected prompt forward fault")
        return real(*args, **kwargs)

    engine.prompt_logits = prompt_logits
    with ServerThread(create_app(engine, served_model_name=MODEL)) as server:
        body = {"prompt": "one two three", "max_tokens": 0, "echo": True, "logprobs": 1}
        failed = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert failed.status_code == 500
        _assert_error_body(failed.json(), 500, code="generation_failed")
        assert "injected prompt forward fault" in failed.json()["error"]["message"]
        again = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None
        assert engine.num_unfinished == 0
