"""`labkit bench batching` on a tiny model and a tiny trace: rows, identical greedy tokens across policies, arrival
times honoured online, the engine samples, the server comparison, and the command line."""

import json

import pytest

from labkit.bench import batching as bb
from labkit import cli
from labkit.lab import results
from labkit.bench.hf import HFEngine
from labkit.engine import Engine, EngineConfig, SchedulerConfig
from labkit.serving.workloads import LengthDist, TraceConfig, make_trace

ENGINE = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64, max_wait_s=0.01))


@pytest.fixture(scope="module")
def trace(tiny):
    # heavy-tailed outputs and two shared 32-token prefixes (two full blocks each)
    config = TraceConfig(num_requests=8, prompt_len=LengthDist("uniform", 8, 0.5),
                         output_len=LengthDist("lognormal", 6, 1.2, max_len=24), num_prefixes=2, prefix_len=32,
                         prefix_fraction=0.75, seed=3)
    return make_trace(config, tiny.tokenizer)


@pytest.fixture(scope="module")
def result(tiny, trace):
    return bb.run_batching_bench(trace, tiny, ENGINE, progress=False)


def test_rows_have_the_fields(result, trace):
    rows = {r["params"]["policy"]: r for r in result.rows}
    assert list(rows) == list(bb.POLICIES)
    total = sum(r.output_len for r in trace)
    for policy, row in rows.items():
        p, m = row["params"], row["metrics"]
        assert row["technique"] == "batching" and row["env"]["torch"] and row["seed"] == 3
        assert p["trace"]["num_requests"] == 8 and p["trace"]["output_len"]["kind"] == "lognormal"
        assert p["mode"] == "offline" and p["dtype"] == "fp32"
        assert m["num_completed"] == 8 and m["num_failed"] == 0 and m["total_output_tokens"] == total
        for key in ("output_tokens_per_s", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
                    "median_itl_ms", "p99_itl_ms", "speedup_vs_static", "speedup_vs_hf"):
            assert m[key] > 0, key
        assert m["output_tokens_per_s"] == m["output_throughput_tokens_per_s"] and m["tokens_identical"] is True
        assert 0 < m["median_ttft_ms"] <= m["p99_ttft_ms"] <= m["p99_e2el_ms"]
        if policy == "hf-sequential":
            assert p["engine"] is None and m["num_preemptions"] is None and m["prefix_hit_rate"] is None
        else:
            assert p["engine"]["policy"] == policy and p["engine"]["max_num_seqs"] == 3
            assert m["num_preemptions"] == 0 and 0 < m["peak_kv_blocks"] <= m["num_kv_blocks"]
            # 6 of the 8 prompts start with a shared 2-block prefix: the second and later uses hit the cache
            assert 0.2 < m["prefix_hit_rate"] < 1
    assert rows["static"]["metrics"]["speedup_vs_static"] == pytest.approx(1.0)
    assert rows["hf-sequential"]["metrics"]["speedup_vs_hf"] == pytest.approx(1.0)
    speedup = rows["continuous"]["metrics"]["speedup_vs_static"]
    assert speedup == pytest.approx(rows["continuous"]["metrics"]["output_tokens_per_s"]
                                    / rows["static"]["metrics"]["output_tokens_per_s"])
    json.dumps(results.to_jsonable(result.document()), allow_nan=False)


def test_policies_give_identical_greedy_tokens(result, trace):
    assert result.mismatches == []
    result.check()
    for run in result.runs.values():
        assert [len(r.token_ids) for r in run.records] == [r.output_len for r in trace]
    tokens = {name: [r.token_ids for r in run.records] for name, run in result.runs.items()}
    assert all(t == tokens["hf-sequential"] for t in tokens.values())


def test_a_prebuilt_model_serves_the_same_tokens(result, trace, tiny):
    from labkit.model.rewrites import apply_rewrites
    from labkit.model.llama import from_hf

    again = bb.run_batching_bench(trace, tiny, ENGINE, policies=("continuous",), progress=False,
                                  model=apply_rewrites(from_hf(tiny.model)))
    assert [r.token_ids for r in again.runs["continuous"].records] == \
        [r.token_ids for r in result.runs["continuous"].records]


def test_engine_samples_show_the_policies_apart(result):
    runs = result.runs
    for name in bb.ENGINE_POLICIES:
        steps = runs[name].steps
        assert [s["t_s"] for s in steps] == sorted(s["t_s"] for s in steps)
        assert all(0 < s["num_rows"] <= 3 and s["num_used_blocks"] <= runs[name].num_kv_blocks for s in steps)
        assert sum(s["num_new_tokens"] for s in steps) >= runs[name].metrics()["total_input_tokens"] // 2
    # continuous batching refills the rows that static batching leaves empty behind its stragglers
    assert len(runs["continuous"].steps) < len(runs["static"].steps)
    assert runs["continuous"].metrics()["mean_batch_size"] > runs["static"].metrics()["mean_batch_size"]
    assert list(runs["static"].steps_frame().columns)[:3] == ["t_s", "step_ms", "num_rows"]


def _copy(run: bb.PolicyRun, name: str) -> bb.PolicyRun:
    return bb.PolicyRun(name, run.origin_s, [bb.RequestRecord(r.index, r.arrival_s, r.expected_output_tokens,
                                                               token_ids=list(r.token_ids), end_s=r.end_s)
                                             for r in run.records])


def test_token_mismatch_is_reported(result):
    runs = dict(result.runs)
    bad = runs["continuous"] = _copy(runs["continuous"], "continuous")
    i, j = [r.index for r in bad.records if len(r.token_ids) >= 3][:2]
    bad.records[i].token_ids[2] += 1
    bad.records[j].token_ids.pop()
    lines = bb.token_mismatches(runs)
    assert len(lines) == 2  # against static, the first engine policy
    assert lines[0].startswith(f"request {i}: continuous differs from static at output token 2")
    assert lines[1].startswith(f"request {j}: continuous differs from static at output token "
                               f"{len(bad.records[j].token_ids)} (end vs")
    with pytest.raises(AssertionError, match=f"request {i}"):
        bb.BatchingResult(result.trace, runs, [], lines).check()


def test_hf_is_compared_up_to_the_first_eos(result):
    # under ignore_eos the engine emits EOS and goes on, HF never emits it: after an EOS the two may part
    runs = {name: _copy(run, name) for name, run in result.runs.items()}
    record = next(r for r in runs["static"].records if len(r.token_ids) >= 4)
    eos = 49000
    for name in bb.ENGINE_POLICIES:  # the engine sampled EOS at position 2, then other tokens
        ids = runs[name].records[record.index].token_ids
        ids[2:] = [eos] + [7] * (len(ids) - 3)
    assert bb.token_mismatches(runs, eos_token_ids=(eos,)) == []
    lines = bb.token_mismatches(runs)  # without knowing EOS, HF differs at position 2
    assert lines and lines[0].startswith(f"request {record.index}: hf-sequential differs from static at output "
                                         f"token 2")
    runs["hf-sequential"].records[record.index].token_ids[1] += 1  # before the EOS: a real difference
    lines = bb.token_mismatches(runs, eos_token_ids=(eos,))
    assert len(lines) == 1 and "at output token 1" in lines[0]


def test_online_replay_honours_arrivals(tiny):
    trace = make_trace(TraceConfig(num_requests=6, request_rate=25.0, prompt_len=LengthDist("fixed", 6),
                                   output_len=LengthDist("fixed", 3), seed=1), tiny.tokenizer)
    assert trace.requests[-1].arrival_s > 0.05
    engine = Engine.from_hf(tiny.model, tiny.tokenizer, policy="continuous", max_num_seqs=4)
    hf = HFEngine(tiny.model, tiny.tokenizer)
    for run in (bb.replay(engine, trace), bb.replay_hf(hf, trace)):
        for request, record in zip(trace, run.records):
            assert record.arrival_s == pytest.approx(run.origin_s + request.arrival_s)
            assert record.added_s >= record.arrival_s  # never sent early
            assert record.chunk_times_s[0] > record.arrival_s and record.end_s >= record.chunk_times_s[-1]
        assert run.duration_s >= trace.requests[-1].arrival_s
        assert run.metrics()["num_completed"] == 6
    assert not engine.has_unfinished and engine.blocks.num_used_blocks == 0  # no leaked KV block


def test_replay_needs_token_ids_and_known_policies(tiny):
    words = make_trace(TraceConfig(num_requests=2))
    with pytest.raises(ValueError, match="needs a trace with token ids"):
        bb.run_batching_bench(words, tiny, ENGINE, progress=False)
    trace = make_trace(TraceConfig(num_requests=2), tiny.tokenizer)
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        bb.run_batching_bench(trace, tiny, ENGINE, ["static", "fast"], progress=False)
    with pytest.raises(ValueError, match="each policy once"):
        bb.run_batching_bench(trace, tiny, ENGINE, ["static", "static"], progress=False)


def test_server_mode_sequential_vs_concurrent(tiny):
    trace = make_trace(TraceConfig(num_requests=4, prompt_len=LengthDist("fixed", 8),
                                   output_len=LengthDist("fixed", 4)), tiny.tokenizer)
    rows = bb.run_server_bench(trace, tiny, ENGINE, num_warmups=0)
    assert [(r["params"]["policy"], r["params"]["max_concurrency"]) for r in rows] == [("server", 1),
                                                                                       ("server", None)]
    for row in rows:
        m = row["metrics"]
        assert m["num_completed"] == 4 and m["total_output_tokens"] == 16 and m["errors"] == {}
    assert rows[0]["metrics"]["speedup_vs_sequential"] == pytest.approx(1.0)
    assert rows[1]["metrics"]["speedup_vs_sequential"] == pytest.approx(
        rows[0]["metrics"]["duration_s"] / rows[1]["metrics"]["duration_s"])


BASE_ARGS = ["bench", "batching", "--model", "tiny-smollm2", "--dummy", "--num-requests", "5", "--output-len", "3",
             "--output-max", "8", "--prompt-len", "6", "--max-num-seqs", "2", "--no-progress"]


def test_cli_json_stdout_is_only_json(tmp_path, capsys):
    out_file = tmp_path / "b.json"
    assert cli.main([*BASE_ARGS, "--json", "--output", str(out_file)]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)  # stdout holds the JSON and nothing else
    assert [r["params"]["policy"] for r in rows] == list(bb.POLICIES)
    assert "tok/s" in captured.err and "wrote" in captured.err
    document = json.loads(out_file.read_text())
    assert document["schema"] == bb.SCHEMA and document["rows"] == rows
    assert set(document["runs"]) == set(bb.POLICIES) and document["runs"]["continuous"]["steps"]
    assert len(document["runs"]["static"]["requests"]) == 5
    stored = [r for r in results.read_rows() if r["technique"] == "batching"]
    assert [r["params"]["policy"] for r in stored] == list(bb.POLICIES)


def test_cli_no_save_and_errors(capsys, monkeypatch):
    # `make test` shares one data folder across tests: count rows rather than expect none
    num_rows = len(results.read_rows())
    saved = results.data_dir() / "bench_batching.json"
    mtime = saved.stat().st_mtime_ns if saved.exists() else None
    assert cli.main([*BASE_ARGS, "--policies", "static,continuous", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "continuous" in out and "hf-sequential" not in out
    assert (saved.stat().st_mtime_ns if saved.exists() else None) == mtime and len(results.read_rows()) == num_rows
    assert cli.main([*BASE_ARGS, "--output-dist", "pareto", "--output-shape", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["labkit bench batching: pareto shape (tail index alpha) must be > 1 for a finite mean, got 0.5"]

    # a policy that changes the tokens fails loudly, and nothing is saved
    replay_hf = bb.replay_hf

    def corrupt(*args, **kwargs):
        run = replay_hf(*args, **kwargs)
        run.records[1].token_ids[0] += 1
        return run

    monkeypatch.setattr(bb, "replay_hf", corrupt)
    assert cli.main(BASE_ARGS) == 1
    err = capsys.readouterr().err
    assert "greedy tokens differ between policies" in err and "request 1: hf-sequential differs from static" in err
    assert len(results.read_rows()) == num_rows


def test_cli_replays_a_trace_file(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival_s": 0.0, "prompt": "the cat sat on the mat", "output_len": 3}\n'
                    '{"arrival_s": 0.05, "prompt_len": 9, "output_len": 2}\n')
    assert cli.main([*BASE_ARGS, "--trace", str(path), "--policies", "continuous", "--no-save", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    trace = row["params"]["trace"]
    assert trace["kind"] == "file" and trace["path"] == str(path) and trace["num_requests"] == 2
    assert row["params"]["mode"] == "online" and row["metrics"]["total_output_tokens"] == 5
    assert cli.main([*BASE_ARGS, "--trace", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"labkit bench batching: {tmp_path / 'nope.jsonl'}: no such trace file"


def test_rows_say_whether_they_measure_the_prefix_cache(result, trace, tiny):
    rows = {r["params"]["policy"]: r["params"] for r in result.rows}
    assert rows["hf-sequential"]["prefix_caching"] is None and not rows["hf-sequential"]["measures_prefix_cache"]
    for policy in bb.ENGINE_POLICIES:  # the trace's shared prefixes meet a cache that is on: on purpose
        assert rows[policy]["prefix_caching"] is True and rows[policy]["measures_prefix_cache"] is True
    plain = make_trace(TraceConfig(num_requests=2, prompt_len=LengthDist("fixed", 8),
                                   output_len=LengthDist("fixed", 2)), tiny.tokenizer)
    assert not bb.measures_prefix_cache(plain, True) and not bb.measures_prefix_cache(trace, False)


def test_server_runs_get_an_engine_each_so_the_second_finds_nothing_cached(tiny, monkeypatch):
    engines = []
    real = bb._engine

    def spy(*args, **kwargs):
        engines.append(real(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(bb, "_engine", spy)
    # 40-token prompts, no shared prefix: two full blocks each, which a second run on one engine would reuse
    trace = make_trace(TraceConfig(num_requests=3, prompt_len=LengthDist("fixed", 40),
                                   output_len=LengthDist("fixed", 2)), tiny.tokenizer)
    rows = bb.run_server_bench(trace, tiny, ENGINE, num_warmups=0)
    assert len(engines) == 2 and all(e.blocks.num_hit_tokens == 0 for e in engines)
    assert [(r["params"]["prefix_caching"], r["params"]["measures_prefix_cache"]) for r in rows] == [(True, False)] * 2
