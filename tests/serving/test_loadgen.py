"""`labkit bench serve`: the metric arithmetic on scripted streams, validation, a real run against `labkit
serve` that writes the JSON result and a results row, broken servers (test_client.py's), servers without usage,
and vLLM's flag names and result keys (the workload is tested in test_workloads.py)."""

import argparse
import asyncio
import dataclasses
import json
import math
import statistics

import pytest
from tests.serving.test_client import BROKEN_MODELS, BROKEN_STREAMS, WORDS, broken_app, serving

from labkit import cli

from labkit.cli import bench_serve as bench_serve_cli
from labkit.serving import loadgen

from labkit.lab import results
from labkit.engine.engine import Engine
from labkit.serving.load_metrics import RequestOutcome, compute_metrics, request_timing, tokens_per_chunk
from labkit.serving.loadgen import BenchServeConfig, count_tokens, settle
from labkit.model.loader import EMBEDDED_MODEL, convert_embedded
from labkit.serving.protocol import ServerError
from labkit.serving import ServerThread, create_app

METRIC_KEYS = ["duration_s", "num_completed", "num_failed", "total_input_tokens", "total_output_tokens",
               "request_throughput_req_per_s", "output_throughput_tokens_per_s",
               "total_token_throughput_tokens_per_s", "request_goodput_req_per_s"] + [
    f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "std", "p90",
                                                                                  "p99")]


# -- the arithmetic ------------------------------------------------------------------------------------------
def test_request_timing_on_a_scripted_stream():
    # sent at t=10 s; chunks bring 1, 1, 3 and 1 tokens; the stream closes at 11.05 s
    timing = request_timing(10.0, [10.5, 10.6, 10.9, 11.0], [1, 1, 3, 1], 11.05, num_output_tokens=6)
    assert timing.ttft_s == pytest.approx(0.5)
    # the 3-token chunk after a 0.3 s gap is three gaps of 0.1 s, not one gap of 0.3 s and two of 0
    assert timing.itl_s == pytest.approx([0.1] * 5)
    assert timing.e2el_s == pytest.approx(1.05)
    assert timing.tpot_s == pytest.approx((1.05 - 0.5) / 5)
    assert timing.num_output_tokens == 6


def test_request_timing_edge_cases():
    # tokens that came with the first one have no ITL of their own: their time is in TTFT
    timing = request_timing(0.0, [0.2, 0.5], [3, 2], 0.5, num_output_tokens=5)
    assert timing.ttft_s == pytest.approx(0.2) and timing.itl_s == pytest.approx([0.15, 0.15])
    assert timing.tpot_s == pytest.approx(0.3 / 4)
    # a chunk without tokens (say, a finish_reason-only chunk with text) does not reset the gap
    timing = request_timing(0.0, [0.1, 0.2, 0.4], [1, 0, 1], 0.4, num_output_tokens=2)
    assert timing.itl_s == pytest.approx([0.3])
    # one token: no TPOT, no ITL
    timing = request_timing(0.0, [0.25], [1], 0.3, num_output_tokens=1)
    assert timing.tpot_s is None and timing.itl_s == [] and timing.e2el_s == pytest.approx(0.3)
    with pytest.raises(ValueError):
        request_timing(0.0, [], [], 1.0, num_output_tokens=0)
    with pytest.raises(ValueError):
        request_timing(0.0, [0.1], [1, 1], 1.0, num_output_tokens=2)


def test_tokens_per_chunk_uses_server_counts_then_shares_usage():
    assert tokens_per_chunk([1, 2, 1], 4) == [1, 2, 1]
    # no per-chunk counts: the usage total (7) shared over 3 chunks, earliest first
    assert tokens_per_chunk([None, None, None], 7) == [3, 2, 2]
    assert tokens_per_chunk([1, None, None], 5) == [1, 2, 2]
    # every chunk with text carried at least one token, whatever usage says
    assert tokens_per_chunk([None, None], 1) == [1, 1]
    assert tokens_per_chunk([None, None], None) == [1, 1]
    # without counts, a 2-chunk stream of 5 tokens: ITL samples are the second gap split over its share
    timing = request_timing(0.0, [0.1, 0.4], [None, None], 0.4, num_output_tokens=5)
    assert timing.itl_s == pytest.approx([0.15, 0.15])  # counts [3, 2]


def _outcome(index, ttft, gaps, tokens_each=1, input_tokens=10):
    """A successful request sent at 0 whose chunks arrive at ttft, then after each gap."""
    times = [ttft]
    for gap in gaps:
        times.append(times[-1] + gap)
    n = tokens_each * len(times)
    out = RequestOutcome(index=index, success=True, start_s=0.0, end_s=times[-1], input_tokens=input_tokens,
                         output_tokens=n, expected_output_tokens=n, chunk_times_s=times,
                         chunk_tokens=[tokens_each] * len(times))
    out.timing = request_timing(0.0, times, out.chunk_tokens, out.end_s, n)
    return out


def test_compute_metrics_arithmetic():
    fast = _outcome(0, ttft=0.1, gaps=[0.01] * 4)  # 5 tokens, e2el 0.14, tpot 0.01
    slow = _outcome(1, ttft=0.5, gaps=[0.05] * 4)  # 5 tokens, e2el 0.70, tpot 0.05
    failed = RequestOutcome(index=2, success=False, error="HTTP 500: boom")
    m = compute_metrics([fast, slow, failed], duration_s=2.0, slo={"ttft_ms": 200, "tpot_ms": 20})
    assert set(m) == set(METRIC_KEYS)
    assert (m["num_completed"], m["num_failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (20, 10)
    assert m["request_throughput_req_per_s"] == pytest.approx(1.0)
    assert m["output_throughput_tokens_per_s"] == pytest.approx(5.0)
    assert m["total_token_throughput_tokens_per_s"] == pytest.approx(15.0)
    assert m["request_goodput_req_per_s"] == pytest.approx(0.5)  # only the fast one meets both SLOs
    assert m["mean_ttft_ms"] == pytest.approx(300) and m["median_ttft_ms"] == pytest.approx(300)
    assert m["p90_ttft_ms"] == pytest.approx(100 + 0.9 * 400) and m["p99_ttft_ms"] == pytest.approx(496)
    assert m["std_ttft_ms"] == pytest.approx(200)
    assert m["mean_tpot_ms"] == pytest.approx(30) and m["mean_e2el_ms"] == pytest.approx((140 + 700) / 2)
    itls = [10.0] * 4 + [50.0] * 4
    assert m["mean_itl_ms"] == pytest.approx(statistics.fmean(itls))
    assert m["median_itl_ms"] == pytest.approx(30) and m["p99_itl_ms"] == pytest.approx(50)
    assert compute_metrics([fast], 1.0)["request_goodput_req_per_s"] is None  # no SLO, no goodput
    # e2el SLOs, and a one-token request counts TPOT 0 like vLLM does
    one = _outcome(3, ttft=0.1, gaps=[])
    m = compute_metrics([one, slow], 1.0, slo={"tpot_ms": 1, "e2el_ms": 500})
    assert m["request_goodput_req_per_s"] == pytest.approx(1.0)
    assert m["mean_tpot_ms"] == pytest.approx(50)  # TPOT statistics skip one-token requests
    nothing = compute_metrics([failed], 1.0)
    assert nothing["num_completed"] == 0 and nothing["mean_ttft_ms"] is None


def test_config_and_slo_validation():
    assert loadgen.parse_slo("ttft_ms=500, tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert loadgen.parse_slo(None) == {}
    for bad in ("ttft=5", "ttft_ms", "ttft_ms=abc", "tpot_ms=-1", "e2el_ms=inf"):
        with pytest.raises(ValueError):
            loadgen.parse_slo(bad)
    for bad in (dict(num_prompts=0), dict(range_ratio=1.0), dict(request_rate=0), dict(burstiness=0),
                dict(max_concurrency=0), dict(endpoint="embeddings"), dict(base_url="127.0.0.1:8000"),
                dict(slo={"itl_ms": 5})):
        with pytest.raises(ValueError):
            BenchServeConfig(**bad)
    assert BenchServeConfig(api_key="secret").to_dict().get("api_key") is None  # never written out


@pytest.mark.parametrize("argv, message", [
    (["--slo", "latency=5"], "unknown SLO 'latency'"),
    (["--range-ratio", "1.5"], "range_ratio must be in [0, 1)"),
    (["--burstiness", "0"], "burstiness must be"),
    (["--base-url", "localhost:8000"], "base_url must start with http://"),
])
def test_cli_bad_options_are_one_line(capsys, argv, message):
    assert cli.main(["bench", "serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("labkit bench serve: ") and message in err[0]


# -- against a running labkit serve --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer, name="tiny-smollm2")
    with ServerThread(create_app(engine, max_queue=128)) as running:
        yield running


def test_bench_serve_against_labkit_serve_writes_json_and_row(server, tmp_path, capsys):
    result_file = tmp_path / "bench.json"  # in an existing folder: bench serve creates none
    argv = ["bench", "serve", "--base-url", server.url, "--num-prompts", "12", "--input-len", "16",
            "--output-len", "6", "--range-ratio", "0.5", "--request-rate", "40", "--burstiness", "0.5",
            "--max-concurrency", "4", "--num-warmups", "2", "--slo", "ttft_ms=60000,tpot_ms=60000",
            "--result-file", str(result_file), "--json"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # stdout holds the JSON and nothing else
    assert "Time to first token" in captured.err and "wrote" in captured.err
    written = json.loads(result_file.read_text())
    assert written == printed
    assert written["schema"] == loadgen.SCHEMA
    m = written["metrics"]
    assert set(METRIC_KEYS) <= set(m)
    assert all(m[key] is not None for key in METRIC_KEYS), {k: m[k] for k in METRIC_KEYS if m[k] is None}
    assert (m["num_completed"], m["num_failed"]) == (12, 0)
    assert m["request_goodput_req_per_s"] == pytest.approx(m["request_throughput_req_per_s"])  # generous SLOs
    assert 0 < m["median_ttft_ms"] <= m["p99_ttft_ms"] and m["mean_e2el_ms"] > m["mean_ttft_ms"]

    requests = written["requests"]
    assert [r["index"] for r in requests] == list(range(12))
    prompts = loadgen.make_prompts(12, 16, 6, 0.5, seed=0)
    for r, spec in zip(requests, prompts):
        # ignore_eos makes the output length exact; the counts are the server's usage
        assert r["success"] and r["output_tokens"] == r["expected_output_tokens"] == spec.output_len
        assert len(r["itl_ms"]) == r["output_tokens"] - 1  # per-token ITL from the server's token_ids
        assert r["ttft_ms"] <= r["e2el_ms"]
    assert m["total_output_tokens"] == sum(p.output_len for p in prompts)
    assert m["total_input_tokens"] == sum(r["input_tokens"] for r in requests) > 0
    assert written["config"]["request_rate"] == 40 and written["config"]["max_concurrency"] == 4
    assert written["server"]["model"] == "tiny-smollm2" and written["env"]["torch"]
    # counted from the server's usage; vLLM's keys (its default ttft,tpot,itl at p99) mirror the lab's
    assert written["token_count_source"] == "usage" and {r["token_count_source"] for r in requests} == {"usage"}
    assert (written["completed"], written["failed"]) == (12, 0)
    assert written["total_output_tokens"] == m["total_output_tokens"] and written["duration"] == m["duration_s"]
    assert written["request_throughput"] == m["request_throughput_req_per_s"] and written["request_rate"] == 40
    assert written["output_throughput"] == m["output_throughput_tokens_per_s"]
    assert written["p99_ttft_ms"] == m["p99_ttft_ms"] and written["median_itl_ms"] == m["median_itl_ms"]
    assert written["model_id"] == "tiny-smollm2" and "mean_e2el_ms" not in written

    rows = [row for row in results.read_rows() if row["technique"] == "bench_serve"]
    assert len(rows) == 1
    row = rows[0]
    assert row["metrics"]["mean_ttft_ms"] == m["mean_ttft_ms"] and row["env"]["python"]
    assert row["params"]["result_file"] == str(result_file) and row["params"]["model"] == "tiny-smollm2"
    # the server's card says its prefix cache is on: the result, its row and the table say so
    assert written["server"]["prefix_caching"] is True and row["params"]["prefix_caching"] is True
    assert "Server prefix caching:                  on" in captured.err
    assert row["seed"] == 0


def test_same_seed_runs_and_warm_ups_never_send_prompts_the_server_has_cached(tiny):
    """Run twice with one --seed against one server: no timed or warm-up prompt finds a block in its prefix
    cache (the salt differs per run); with the salt pinned, the second run would be served from the cache."""
    def hit_rate(url: str) -> float:
        from tests.serving.test_server import _metric

        return _metric(url, "labkit_prefix_cache_hit_rate")

    engine = Engine.from_hf(tiny.model, tiny.tokenizer, name="tiny-smollm2")
    with ServerThread(create_app(engine, max_queue=64)) as server:
        config = BenchServeConfig(base_url=server.url, num_prompts=4, input_len=40, output_len=2, num_warmups=2,
                                  seed=3)
        first, second = loadgen.benchmark(config), loadgen.benchmark(config)
        assert first["metrics"]["num_completed"] == second["metrics"]["num_completed"] == 4
        assert first["config"]["prompt_salt"] != second["config"]["prompt_salt"]
        assert first["config"]["seed"] == second["config"]["seed"] == 3
        assert hit_rate(server.url) == 0  # 12 prompts of 2+ blocks each, none found cached
        pinned = dataclasses.replace(config, prompt_salt="again")
        loadgen.benchmark(pinned)
        assert hit_rate(server.url) == 0
        loadgen.benchmark(pinned)  # the same prompts again: the check above can fail
        assert hit_rate(server.url) > 0


def test_salted_prompts_keep_lengths_and_later_words():
    specs = loadgen.make_prompts(50, 12, 4, 0.5, seed=1)
    a, b = loadgen.salt_prompts(specs, "a"), loadgen.salt_prompts(specs, "b")
    assert loadgen.salt_prompts(specs, "a") == a  # a salt replays its run
    for spec, x, y in zip(specs, a, b):
        assert (x.index, x.input_words, x.output_len) == (spec.index, spec.input_words, spec.output_len)
        words, xs, ys = spec.prompt.split(), x.prompt.split(), y.prompt.split()
        assert len(xs) == len(words) and xs[loadgen.SALT_WORDS:] == words[loadgen.SALT_WORDS:]
        assert xs[:loadgen.SALT_WORDS] != ys[:loadgen.SALT_WORDS]
    warm = loadgen.salt_prompts(specs, "a", "warmup")
    assert all(w.prompt.split()[:3] != x.prompt.split()[:3] for w, x in zip(warm, a))
    with pytest.raises(ValueError, match="prompt_salt"):
        BenchServeConfig(prompt_salt="")


def test_bench_serve_chat_without_extensions_and_failures(server, tmp_path, capsys):
    # chat, no token_ids and no ignore_eos: counts still come from usage, ITL shares them among chunks
    config = BenchServeConfig(base_url=server.url, endpoint="chat", num_prompts=4, input_len=8, output_len=5,
                              num_warmups=0, return_token_ids=False, ignore_eos=False)
    result = loadgen.benchmark(config)
    m = result["metrics"]
    assert m["num_completed"] == 4 and 0 < m["total_output_tokens"] <= 20
    assert all(len(r["itl_ms"]) <= r["output_tokens"] - 1 for r in result["requests"])
    path = loadgen.save_result(result)
    assert path.parent == results.data_dir() / "bench_serve" and json.loads(path.read_text())["metrics"] == m

    # an unknown model: every request fails with the server's 404, counted once, never retried
    config = BenchServeConfig(base_url=server.url, model="gpt-9", num_prompts=3, output_len=2, num_warmups=0)
    result = loadgen.benchmark(config)
    assert result["metrics"]["num_failed"] == 3 and result["metrics"]["num_completed"] == 0
    assert list(result["errors"].values()) == [3] and "HTTP 404" in next(iter(result["errors"]))
    # the CLI says so in one line when the warm-up fails, and exits 1
    assert cli.main(["bench", "serve", "--base-url", server.url, "--model", "gpt-9", "--num-prompts", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"warm-up request to {server.url}/v1/completions failed: HTTP 404" in err[0]


# -- counting tokens without usage ---------------------------------------------------------------------------
class _WordTokenizer:
    """One token per space-separated word: enough to check which text `settle` counted."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(range(len(text.split())))}


def test_settle_counts_from_usage_else_with_the_tokenizer():
    def streamed(usage):
        return RequestOutcome(index=0, success=False, start_s=0.0, end_s=0.4, chunk_times_s=[0.1, 0.2, 0.4],
                              chunk_tokens=[None, None, None], text="one two three four", usage=usage)

    def no_tokenizer():
        raise AssertionError("the server's usage was enough")

    out = settle(streamed({"prompt_tokens": 9, "completion_tokens": 6}), "a b", no_tokenizer)
    assert out.success and (out.input_tokens, out.output_tokens, out.token_count_source) == (9, 6, "usage")
    out = settle(streamed(None), "a b c", _WordTokenizer)
    assert out.success and (out.input_tokens, out.output_tokens, out.token_count_source) == (3, 4, "tokenizer")
    assert out.timing.itl_s == pytest.approx([0.1, 0.2])  # 4 tokens over 3 chunks: [2, 1, 1]
    out = settle(streamed({"prompt_tokens": None, "completion_tokens": 2}), "a b c", _WordTokenizer)
    assert (out.input_tokens, out.output_tokens, out.token_count_source) == (3, 2, "usage")
    failed = RequestOutcome(index=0, success=False, error="HTTP 500: boom")
    assert settle(failed, "a", no_tokenizer) is failed and not failed.success


@pytest.fixture(scope="module")
def broken_server():
    with serving(broken_app()) as running:
        yield running


@pytest.fixture(scope="module")
def embedded_tokenizer():
    return loadgen.load_tokenizer()


def test_benchmark_runs_from_a_thread_whose_event_loop_is_running(broken_server):
    async def cell():  # as a notebook cell calls it: a loop already runs in this thread
        return loadgen.benchmark(BenchServeConfig(base_url=broken_server.url, model="good", num_prompts=2,
                                                  num_warmups=0))

    result = asyncio.run(cell())
    assert result["metrics"]["num_completed"] == 2 and result["metrics"]["total_output_tokens"] == 6


def test_bench_serve_counts_with_the_tokenizer_when_the_server_sends_no_usage(broken_server, embedded_tokenizer):
    # llama.cpp's server ignores stream_options.include_usage: the warm-up passes and the text is re-tokenized
    config = BenchServeConfig(base_url=broken_server.url, model="no-usage", num_prompts=3, input_len=5,
                              output_len=3, num_warmups=1, prompt_salt="s")
    result = loadgen.benchmark(config)
    assert result["server"]["prefix_caching"] is None  # a server that does not say: unknown, not off
    m, requests = result["metrics"], result["requests"]
    assert (m["num_completed"], m["num_failed"]) == (3, 0) and result["errors"] == {}
    assert result["token_count_source"] == "tokenizer" and result["tokenizer_id"] == EMBEDDED_MODEL
    n_out = count_tokens(embedded_tokenizer, "".join(WORDS))
    prompts = loadgen.salt_prompts(loadgen.make_prompts(3, 5, 3, seed=0), "s")
    assert [r["output_tokens"] for r in requests] == [n_out] * 3
    assert [r["input_tokens"] for r in requests] == [count_tokens(embedded_tokenizer, p.prompt) for p in prompts]
    assert {r["token_count_source"] for r in requests} == {"tokenizer"}
    assert all(len(r["itl_ms"]) == n_out - 1 for r in requests)  # the count shared among the 3 chunks
    assert "re-tokenized with smollm2" in bench_serve_cli.format_table(result)
    # a server with usage, through the same fake: counted from usage
    result = loadgen.benchmark(BenchServeConfig(base_url=broken_server.url, model="good", num_prompts=2,
                                                num_warmups=0), tokenizer=embedded_tokenizer)
    assert result["token_count_source"] == "usage" and result["metrics"]["total_output_tokens"] == 6


def test_bench_serve_tokenizer_option(broken_server, tmp_path, capsys):
    path = str(convert_embedded())
    argv = ["bench", "serve", "--base-url", broken_server.url, "--model", "no-usage", "--num-prompts", "2",
            "--num-warmups", "0", "--result-file", str(tmp_path / "r.json")]
    assert cli.main([*argv, "--tokenizer", path]) == 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["tokenizer_id"] == path and written["config"]["tokenizer"] == path
    assert written["token_count_source"] == "tokenizer"
    row = [r for r in results.read_rows() if r["params"].get("result_file") == str(tmp_path / "r.json")][0]
    assert row["params"]["token_count_source"] == "tokenizer"
    capsys.readouterr()
    # a bad tokenizer fails in one line before any request is sent
    assert cli.main([*argv, "--tokenizer", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a directory" in err[0]


# -- broken servers ------------------------------------------------------------------------------------------
MALFORMED = ["string-event", "number-event", "error-string", "choices-string", "usage-list", "usage-strings",
             "not-json", "no-done", "token-ids-string"]


@pytest.mark.parametrize("case", MALFORMED)
def test_bench_serve_counts_a_malformed_reply_as_one_failed_request(broken_server, tmp_path, capsys, case):
    result_file = tmp_path / "r.json"
    argv = ["bench", "serve", "--base-url", broken_server.url, "--model", f"every-3rd:{case}", "--num-prompts", "6",
            "--num-warmups", "0", "--max-concurrency", "1", "--result-file", str(result_file)]
    assert cli.main(argv) == 0  # the run goes on
    assert "Traceback" not in capsys.readouterr().err
    written = json.loads(result_file.read_text())
    assert (written["metrics"]["num_completed"], written["metrics"]["num_failed"]) == (4, 2)
    [(error, count)] = written["errors"].items()
    assert count == 2 and BROKEN_STREAMS[case][1] in error
    assert [r["success"] for r in written["requests"]] == [True, True, False, True, True, False]


@pytest.mark.parametrize("case", ["usage-strings", "error-string", "number-event"])
def test_bench_serve_reports_a_broken_warm_up_in_one_line(broken_server, capsys, case):
    assert cli.main(["bench", "serve", "--base-url", broken_server.url, "--model", case, "--num-prompts", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"labkit bench serve: warm-up request to {broken_server.url}/v1/completions failed: ")
    assert BROKEN_STREAMS[case][1] in err[0]


@pytest.mark.parametrize("key", ["ints", "data-ints", "html", "empty"])
def test_bench_serve_reports_a_broken_model_list_in_one_line(broken_server, capsys, key):
    assert cli.main(["bench", "serve", "--base-url", broken_server.url, "--api-key", key]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"labkit bench serve: {broken_server.url}/v1/models")
    assert BROKEN_MODELS[key][1] in err[0]


def test_bench_serve_rejects_ports_out_of_range_in_one_line(capsys):
    for url in ("http://127.0.0.1:99999", "http://127.0.0.1:0", "http://:8000"):
        with pytest.raises(ValueError):
            BenchServeConfig(base_url=url)
        assert cli.main(["bench", "serve", "--base-url", url]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "port in 1..65535" in err[0]
    with pytest.raises(SystemExit) as caught:
        cli.main(["bench", "serve", "--port", "99999"])
    assert caught.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# -- the API key ---------------------------------------------------------------------------------------------
def test_bench_serve_sends_an_environment_key_to_loopback_only(monkeypatch, capsys):
    sent = []

    def fake_benchmark(config):
        sent.append(config.api_key)
        raise ServerError("stop here")

    monkeypatch.setattr(loadgen, "benchmark", fake_benchmark)
    monkeypatch.delenv("LABKIT_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    assert cli.main(["bench", "serve", "--base-url", "https://api.example.com"]) == 1
    err = capsys.readouterr().err
    assert "$OPENAI_API_KEY is set but not sent to https://api.example.com" in err
    assert cli.main(["bench", "serve", "--base-url", "https://api.example.com", "--use-env-key"]) == 1
    assert cli.main(["bench", "serve", "--host", "localhost"]) == 1
    assert cli.main(["bench", "serve", "--base-url", "https://api.example.com", "--api-key", "given"]) == 1
    assert sent == [None, "sk-secret", "sk-secret", "given"]
    assert "not sent" not in capsys.readouterr().err  # no note when a key is given or allowed
    help_text = bench_serve_cli.add_parser(argparse.ArgumentParser().add_subparsers()).format_help()
    assert "loopback" in help_text and "--use-env-key" in help_text


# -- vLLM's dialect ------------------------------------------------------------------------------------------
def test_vllm_flag_names_and_result_keys(broken_server, tmp_path, capsys):
    argv = ["bench", "serve", "--base-url", broken_server.url, "--model", "good", "--dataset-name", "random",
            "--random-input-len", "8", "--random-output-len", "3", "--random-range-ratio", "0.25",
            "--max-concurrency", "2", "--request-rate", "200", "--burstiness", "0.5", "--num-prompts", "5",
            "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99.9", "--goodput", "ttft:60000",
            "e2el:60000", "--save-result", "--result-dir", str(tmp_path / "vllm"), "--result-filename", "run.json",
            "--endpoint", "/v1/chat/completions", "--json"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    written = json.loads((tmp_path / "vllm" / "run.json").read_text())
    assert written == json.loads(captured.out) and "P99.9 TTFT (ms)" in captured.err
    c, m = written["config"], written["metrics"]
    assert (c["input_len"], c["output_len"], c["range_ratio"], c["max_concurrency"]) == (8, 3, 0.25, 2)
    assert (c["burstiness"], c["endpoint"], c["slo"]) == (0.5, "chat", {"ttft_ms": 60000.0, "e2el_ms": 60000.0})
    assert (written["completed"], written["failed"], written["num_prompts"]) == (5, 0, 5)
    assert written["backend"] == "openai-chat" and written["model_id"] == "good" and written["max_concurrency"] == 2
    assert written["request_goodput"] == written["request_throughput"] == m["request_throughput_req_per_s"]
    assert written["total_input_tokens"] == m["total_input_tokens"] == 15  # the fake's usage: 3 per request
    for name in ("ttft", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p99.9"):
            assert written[f"{stat}_{name}_ms"] == m[f"{stat}_{name}_ms"] is not None
    assert not any(key.endswith(("_tpot_ms", "_itl_ms")) for key in written)  # not asked for
    assert {"p90_tpot_ms", "p99_itl_ms", "p50_itl_ms"} <= set(m)  # the lab's own metrics keep every latency


def test_vllm_keys_and_percentiles_arithmetic():
    fast, slow = _outcome(0, ttft=0.1, gaps=[0.01] * 4), _outcome(1, ttft=0.5, gaps=[0.05] * 4)
    m = compute_metrics([fast, slow], 2.0, percentiles=[50, 99.9])
    assert m["p50_ttft_ms"] == pytest.approx(300) and m["p99.9_ttft_ms"] == pytest.approx(100 + 0.999 * 400)
    assert m["p90_ttft_ms"] == pytest.approx(460)  # p90 and p99 always there
    config = BenchServeConfig(metric_percentiles=(50, 99.9), percentile_metrics=("tpot",))
    keys = loadgen.vllm_keys(config, "m", "tok", m, loadgen.datetime(2025, 1, 2, 3, 4, 5))
    assert keys["date"] == "20250102-030405" and keys["request_rate"] == "inf" and keys["tokenizer_id"] == "tok"
    assert {k for k in keys if k.endswith("_ms")} == {"mean_tpot_ms", "median_tpot_ms", "std_tpot_ms",
                                                      "p50_tpot_ms", "p99.9_tpot_ms"}
    assert keys["output_throughput"] == m["output_throughput_tokens_per_s"] == pytest.approx(5.0)
    assert loadgen.parse_goodput(["ttft:500", "tpot:50"]) == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    for bad in (["ttft=500"], ["itl:5"], ["ttft:x"], ["e2el:-1"]):
        with pytest.raises(ValueError):
            loadgen.parse_goodput(bad)
    for bad in (dict(percentile_metrics=("queue",)), dict(metric_percentiles=(101,)), dict(tokenizer="")):
        with pytest.raises(ValueError):
            BenchServeConfig(**bad)
    assert math.isinf(BenchServeConfig().request_rate)


def test_replicas_run_sends_other_prompts_than_the_one_replica_run(monkeypatch):
    import contextlib

    from labkit.serving import replicas, router_app, server

    seen = []

    class FakeServer:
        def __init__(self, app):
            self.url = "http://127.0.0.1:9"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    @contextlib.contextmanager
    def fake_replicas(num_replicas, serve_args, threads_per_replica=None):
        yield [f"http://127.0.0.1:{8000 + i}" for i in range(num_replicas)]

    monkeypatch.setattr(replicas, "ReplicaSet", fake_replicas)
    monkeypatch.setattr(server, "ServerThread", FakeServer)
    monkeypatch.setattr(router_app, "create_router_app", lambda router: None)
    monkeypatch.setattr(loadgen, "benchmark", lambda config: seen.append(config) or {"seed": config.seed})
    config = loadgen.BenchServeConfig(num_prompts=4, seed=5)
    out = loadgen.measure_replicas([], 2, config)
    assert [c.seed for c in seen] == [5, 6] and out == {"one": {"seed": 5}, "replicas": {"seed": 6}}
    first, second = (loadgen.make_prompts(4, config.input_len, config.output_len, seed=s) for s in (5, 6))
    assert not {p.prompt for p in first} & {p.prompt for p in second}
