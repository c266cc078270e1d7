"""`labkit serve --tensor-parallel-size 2` as a user runs it: a real server process that starts its second rank
(gloo, CPU), driven by the official `openai` client against a one-rank server over the same tiny random model.
Greedy text is the same, streamed or not, for completions and chat, alone and two at a time; a client that leaves
mid-stream leaves the ranks in lockstep; SIGTERM stops both ranks; a rank that dies takes the server down (exit
1, one line naming it) instead of hanging. Bad input is refused in one line before any rank starts."""

import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest

from labkit.engine.engine import Engine
from labkit.serving import ServerThread, create_app

pytestmark = pytest.mark.slow
MODEL = "tiny"
PROMPTS = ("The capital of France is", "Once upon a time, in a small village, there lived")
START_TIMEOUT_S = 120  # two processes importing torch and building the model on a busy 2-core machine


def _start(tmp_path, name: str, *extra: str) -> tuple[subprocess.Popen, str, object]:
    """A `labkit serve -tp 2` process on a free port; (process, its URL, its log file) once it listens."""
    log_path = tmp_path / f"{name}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve", "--model", "tiny-smollm2", "--dummy", "--device",
                             "cpu", "--dtype", "fp32", "--port", "0", "--tensor-parallel-size", "2", "--kv-cache-mb", "4",
                             "--max-num-seqs", "4", "--served-model-name", MODEL, "--timeout-graceful-shutdown", "1",
                             *extra], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (found := re.search(r"on (http://127\.0\.0\.1:\d+) ", log_path.read_text())):
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "the TP server did not come up: " + log_path.read_text()
        time.sleep(0.2)
    return proc, found.group(1), log_path


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The ranks rank 0 started (multiprocessing's spawned children)."""
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout_s: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        raise


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory):
    proc, url, log_path = _start(tmp_path_factory.mktemp("tp"), "tp2")
    ranks = _ranks(proc)
    try:
        yield proc, url, log_path, ranks
    finally:
        _stop(proc)
        for rank in ranks:
            if rank.is_running():
                rank.kill()


@pytest.fixture(scope="module")
def one_rank(tiny):
    """The baseline: the same model served whole, in this process."""
    engine = Engine.from_hf(tiny.model, tiny.tokenizer, name="tiny-smollm2", kv_cache_mb=4, max_num_seqs=4)
    with ServerThread(create_app(engine, served_model_name=MODEL)) as running:
        yield running.url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _generate(url: str, kind: str, prompt: str, max_tokens: int, stream: bool, **sampling) -> str:
    """The text of one greedy request (or sampled, with sampling), streamed or not."""
    client = _client(url)
    args = dict(model=MODEL, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}, stream=stream)
    args.update(sampling)
    if kind == "completions":
        reply = client.completions.create(prompt=prompt, **args)
        return "".join(c.choices[0].text for c in reply if c.choices) if stream else reply.choices[0].text
    reply = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **args)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    return reply.choices[0].message.content


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def _wait_idle(url: str, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while (state := _health(url))["num_running"] or state["num_waiting"] or state["num_kv_blocks_used"]:
        assert time.monotonic() < deadline, f"the server did not go idle: {state}"
        time.sleep(0.05)
    return state


def test_the_start_up_line_says_tensor_parallel_and_rank_1_runs(tp_server):
    proc, url, log_path, ranks = tp_server
    assert "labkit serve: tiny on http://127.0.0.1:" in log_path.read_text()
    assert "(tensor parallel 2: 2 ranks, heads 2q/1kv + 2q/1kv (even);" in log_path.read_text()
    assert len(ranks) == 1 and ranks[0].is_running()
    assert _health(url)["status"] == "ok"


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_greedy_text_is_the_one_rank_servers(tp_server, one_rank, kind, stream):
    url = tp_server[1]
    got = _generate(url, kind, PROMPTS[0], 12, stream)
    assert got and got == _generate(one_rank, kind, PROMPTS[0], 12, stream)


def test_two_requests_of_different_lengths_at_once(tp_server, one_rank):
    url, texts = tp_server[1], {}
    lengths = (24, 5)
    threads = [threading.Thread(target=lambda i=i: texts.__setitem__(
        i, _generate(url, "completions", PROMPTS[i], lengths[i], stream=i == 0))) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert texts == {i: _generate(one_rank, "completions", PROMPTS[i], lengths[i], False) for i in range(2)}
    _wait_idle(url)


def test_sampled_requests_keep_the_ranks_agreeing(tp_server):
    """Unseeded samples get a seed from rank 0 (else the ranks would draw apart and the digest check would stop
    the server); a seeded one repeats."""
    url = tp_server[1]
    for _ in range(2):
        assert _generate(url, "chat", PROMPTS[1], 8, False, temperature=1.0)
    seeded = [_generate(url, "completions", PROMPTS[1], 8, True, temperature=1.0, seed=7) for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert _health(url)["status"] == "ok" and tp_server[0].poll() is None


def test_a_client_leaving_mid_stream_leaves_the_ranks_in_lockstep(tp_server, one_rank):
    url = tp_server[1]
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": PROMPTS[1], "max_tokens": 2000, "stream": True, "ignore_eos": True}) as stream:
        events = (line for line in stream.iter_lines() if line.startswith("data:"))
        next(events), next(events)
    _wait_idle(url)  # aborted on rank 0, and with it on rank 1
    assert _generate(url, "completions", PROMPTS[0], 10, True) == _generate(one_rank, "completions", PROMPTS[0], 10,
                                                                            True)
    assert _health(url)["status"] == "ok"


def test_sigterm_stops_the_server_and_every_rank(tp_server):
    proc, _, log_path, ranks = tp_server
    assert _stop(proc, signal.SIGTERM) == 0, log_path.read_text()
    psutil.wait_procs(ranks, timeout=10)
    assert not any(rank.is_running() for rank in ranks)
    assert "labkit serve: stopped by SIGTERM; 2 ranks stopped" in log_path.read_text()


def test_a_rank_that_dies_takes_the_server_down_with_one_line(tmp_path):
    proc, url, log_path = _start(tmp_path, "dies")
    (rank,) = _ranks(proc)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30, json={
                "model": MODEL, "prompt": PROMPTS[1], "max_tokens": 2000, "stream": True,
                "ignore_eos": True}) as stream:
            events = (line for line in stream.iter_lines() if line.startswith("data:"))
            next(events)
            rank.kill()  # SIGKILL, as the OOM killer would
            rest = list(events)  # the stream ends instead of hanging: an error event, then [DONE]
        assert rest[-1] == "data: [DONE]" and '"error"' in rest[-2]
        assert proc.wait(timeout=60) == 1
    finally:
        _stop(proc)
    log = log_path.read_text()
    assert "labkit serve: stopped: rank 1 exited (code -9) while serving: the server cannot go on without it" in log


def test_bad_tensor_parallel_sizes_are_refused_in_one_line(run_cli):
    code, _, err = run_cli("serve", "--model", "tiny-smollm2", "--dummy", "--device", "cpu", "--port", "0",
                           "--tensor-parallel-size", "3")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("labkit serve: tiny-smollm2 cannot be split over 3 ranks") and "work: 1, 2, 4" in err
    code, _, err = run_cli("serve", "--tensor-parallel-size", "0")
    assert code == 2 and "argument --tensor-parallel-size/-tp: expected a positive integer, got '0'" in err
