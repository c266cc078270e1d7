"""Workloads: seeded length distributions, arrivals, synthetic traces with shared prefixes, trace-file replay."""

import json
import math
import random
import statistics

import pytest

from labkit.serving.workloads import LengthDist, TraceConfig, arrival_offsets, load_trace, make_prompts, make_trace


def draw(dist: LengthDist, n: int = 4000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [dist.sample(rng) for _ in range(n)]


def p99_over_median(values) -> float:
    return statistics.quantiles(values, n=100)[98] / statistics.median(values)


def assert_one_line_error(make, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        make(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


# -- lengths and arrivals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", [LengthDist("fixed", 7), LengthDist("uniform", 40, 0.5),
                                  LengthDist("lognormal", 32, 1.2, min_len=2, max_len=300),
                                  LengthDist("pareto", 32, 1.5, max_len=500)], ids=lambda d: d.kind)
def test_lengths_are_seeded_and_within_bounds(dist):
    values = draw(dist)
    assert values == draw(dist) and all(isinstance(v, int) for v in values)
    assert min(values) >= dist.min_len and max(values) <= (dist.max_len or math.inf)
    if dist.kind == "fixed":
        assert set(values) == {7}
    else:
        assert values != draw(dist, seed=1) and len(set(values)) > 10
    if dist.kind == "uniform":
        assert min(values) == 20 and max(values) == 60


def test_lengths_follow_their_distribution():
    # medians match the closed forms: lognormal m * exp(-sigma^2 / 2), pareto x_m * 2^(1 / alpha)
    lognormal = draw(LengthDist("lognormal", 100, 1.0), n=20000)
    assert statistics.median(lognormal) == pytest.approx(100 * math.exp(-0.5), rel=0.05)
    assert statistics.fmean(lognormal) == pytest.approx(100, rel=0.05)
    pareto = draw(LengthDist("pareto", 90, 3.0), n=20000)
    assert statistics.median(pareto) == pytest.approx(90 * 2 / 3 * 2 ** (1 / 3), rel=0.05)
    assert statistics.fmean(pareto) == pytest.approx(90, rel=0.05)
    clipped = draw(LengthDist("lognormal", 32, 2.0, max_len=64))
    assert max(clipped) == 64 and clipped.count(64) > 100  # the tail piles up at the clip


def test_heavy_tails_are_heavier():
    uniform = draw(LengthDist("uniform", 32, 0.5))
    lognormal = draw(LengthDist("lognormal", 32, 1.5, max_len=10_000))
    pareto = draw(LengthDist("pareto", 32, 1.5, max_len=10_000))
    assert p99_over_median(uniform) < 1.6
    assert p99_over_median(lognormal) > 15 and p99_over_median(pareto) > 8
    # most of a heavy-tailed trace's tokens are in its few longest requests
    top = sorted(lognormal)[-len(lognormal) // 10:]
    assert sum(top) / sum(lognormal) > 0.4 > sum(sorted(uniform)[-len(uniform) // 10:]) / sum(uniform)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "zipf"}, "unknown length distribution 'zipf'"),
    ({"mean": 0}, "mean length must be an integer >= 1, got 0"),
    ({"kind": "uniform", "shape": 1.0}, "uniform shape (half-width / mean) must be in [0, 1), got 1.0"),
    ({"kind": "lognormal", "shape": 0}, "lognormal shape (sigma) must be > 0, got 0"),
    ({"kind": "pareto", "shape": 1.0}, "pareto shape (tail index alpha) must be > 1"),
    ({"kind": "fixed", "shape": 0.5}, "a fixed length takes no shape, got 0.5"),
    ({"mean": 64, "max_len": 32}, "max_len must be an integer >= the mean (64), got 32"),
    ({"mean": 4, "min_len": 8}, "mean length 4 is below min_len 8"),
])
def test_length_dist_errors_name_the_value(kwargs, message):
    assert_one_line_error(LengthDist, kwargs, message)


def test_prompts_are_seeded_and_lengths_in_range():
    a = make_prompts(50, 20, 10, range_ratio=0.5, seed=3)
    assert a == make_prompts(50, 20, 10, range_ratio=0.5, seed=3)
    assert a != make_prompts(50, 20, 10, range_ratio=0.5, seed=4)
    assert all(10 <= p.input_words <= 30 and 5 <= p.output_len <= 15 for p in a)
    assert all(len(p.prompt.split()) == p.input_words for p in a)
    assert len({p.input_words for p in a}) > 5  # a distribution, not a constant
    fixed = make_prompts(5, 8, 4)
    assert {(p.input_words, p.output_len) for p in fixed} == {(8, 4)}


def test_arrivals_poisson_and_gamma():
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    for burstiness in (1.0, 0.25):
        offsets = arrival_offsets(20000, request_rate=50.0, burstiness=burstiness, seed=1)
        assert offsets == sorted(offsets) and offsets[0] == 0.0
        gaps = [b - a for a, b in zip(offsets, offsets[1:])]
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(1 / 50, rel=0.05)
        # gamma(k): squared coefficient of variation 1/k (1 for Poisson, 4 for burstiness 0.25)
        assert statistics.pvariance(gaps) / mean**2 == pytest.approx(1 / burstiness, rel=0.1)
    assert arrival_offsets(10, 5.0, seed=2) == arrival_offsets(10, 5.0, seed=2)


# -- synthetic traces ----------------------------------------------------------------------------------------
def test_trace_is_seeded_with_exact_token_lengths(tiny):
    config = TraceConfig(num_requests=40, prompt_len=LengthDist("uniform", 24, 0.5),
                         output_len=LengthDist("pareto", 16, 1.5, max_len=128), seed=5)
    trace = make_trace(config, tiny.tokenizer)
    again = make_trace(config, tiny.tokenizer)
    assert [(r.prompt_ids, r.output_len) for r in trace] == [(r.prompt_ids, r.output_len) for r in again]
    other = make_trace(TraceConfig(**{**config.__dict__, "seed": 6}), tiny.tokenizer)
    assert [r.prompt_ids for r in other] != [r.prompt_ids for r in trace]
    lengths = [r.prompt_len for r in trace]
    assert all(12 <= n <= 36 for n in lengths) and len(set(lengths)) > 5
    assert all(len(r.prompt_ids) == n for r, n in zip(trace, lengths))
    assert all(1 <= r.output_len <= 128 for r in trace)
    assert trace.is_offline and trace.has_token_ids and [r.index for r in trace] == list(range(40))
    # each knob has its own random stream: other output lengths leave the prompts alone
    fixed_out = make_trace(TraceConfig(**{**config.__dict__, "output_len": LengthDist("fixed", 3)}), tiny.tokenizer)
    assert [r.prompt_ids for r in fixed_out] == [r.prompt_ids for r in trace]
    # without a tokenizer, lengths are in words
    words = make_trace(config)
    assert not words.has_token_ids and [len(r.prompt.split()) for r in words] == lengths
    summary = trace.describe()
    assert summary["total_output_tokens"] == sum(r.output_len for r in trace) and summary["request_rate"] is None
    assert list(trace.to_frame()["prompt_len"]) == lengths


def test_shared_prefixes_are_shared_in_token_ids(tiny):
    config = TraceConfig(num_requests=200, prompt_len=LengthDist("fixed", 10), num_prefixes=3, prefix_len=32,
                         prefix_fraction=0.5, seed=1)
    trace = make_trace(config, tiny.tokenizer)
    groups = {}
    for r in trace:
        groups.setdefault(r.prefix_index, []).append(r)
    assert set(groups) == {None, 0, 1, 2}
    assert 70 <= sum(len(g) for k, g in groups.items() if k is not None) <= 130
    prefixes = {}
    for k, members in groups.items():
        if k is None:
            assert all(len(r.prompt_ids) == 10 for r in members)
            continue
        heads = {tuple(r.prompt_ids[:32]) for r in members}
        assert len(heads) == 1 and all(len(r.prompt_ids) == 42 for r in members)
        assert len({tuple(r.prompt_ids[32:]) for r in members}) == len(members)  # the rest is each its own
        prefixes[k] = heads.pop()
    assert len(set(prefixes.values())) == 3
    assert not any(tuple(r.prompt_ids[:32]) in prefixes.values() for r in groups[None])
    assert trace.prompt_specs()[0].input_words == trace.requests[0].prompt_len


def test_online_trace_arrivals():
    trace = make_trace(TraceConfig(num_requests=400, request_rate=20.0, prompt_len=LengthDist("fixed", 4)))
    arrivals = [r.arrival_s for r in trace]
    assert not trace.is_offline and arrivals == sorted(arrivals) and arrivals[0] == 0
    assert statistics.fmean(b - a for a, b in zip(arrivals, arrivals[1:])) == pytest.approx(1 / 20, rel=0.15)
    assert trace.describe()["span_s"] == arrivals[-1]


@pytest.mark.parametrize("kwargs, message", [
    ({"num_requests": 0}, "num_requests must be an integer >= 1, got 0"),
    ({"request_rate": 0}, "request_rate must be > 0 (or inf for offline), got 0"),
    ({"burstiness": math.inf}, "burstiness must be a finite number > 0, got inf"),
    ({"prefix_fraction": 1.5}, "prefix_fraction must be in [0, 1], got 1.5"),
    ({"prefix_fraction": 0.5}, "prefix_fraction > 0 needs num_prefixes >= 1 and prefix_len >= 1"),
    ({"num_prefixes": -1}, "num_prefixes must be an integer >= 0, got -1"),
    ({"output_len": 32}, "output_len must be a LengthDist or a dict of its fields, got 32"),
    ({"output_len": {"kind": "pareto", "shape": 0.5}}, "pareto shape (tail index alpha) must be > 1"),
])
def test_trace_config_errors_name_the_value(kwargs, message):
    assert_one_line_error(TraceConfig, kwargs, message)


def test_trace_config_takes_dicts():
    config = TraceConfig(output_len={"kind": "lognormal", "mean": 16, "max_len": 64})
    assert config.output_len == LengthDist("lognormal", 16, 1.0, max_len=64)
    assert config.to_dict()["output_len"]["shape"] == 1.0


# -- replay of trace files -----------------------------------------------------------------------------------
def test_replay_jsonl(tiny, tmp_path):
    path = tmp_path / "trace.jsonl"
    lines = [{"arrival_s": 0.5, "prompt": "the cat sat on the mat", "output_len": 4},
             {"arrival_s": 0.0, "prompt_len": 12, "output_len": 300},
             {"prompt_len": 40, "output_len": 2}]  # no arrival_s: t=0
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    trace = load_trace(path, tiny.tokenizer)
    # sorted by arrival, ties in file order
    assert [(r.arrival_s, r.output_len) for r in trace] == [(0.0, 300), (0.0, 2), (0.5, 4)]
    assert [r.index for r in trace] == [0, 1, 2]
    text_ids = tiny.tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert [r.prompt_len for r in trace] == [12, 40, len(text_ids)]
    assert trace.requests[2].prompt_ids == text_ids
    assert trace.source["format"] == "jsonl" and not trace.is_offline
    assert load_trace(path, tiny.tokenizer).requests[0].prompt_ids == trace.requests[0].prompt_ids  # seeded
    clipped = load_trace(path, tiny.tokenizer, time_scale=0, max_requests=2, max_prompt_len=16, max_output_len=100)
    assert clipped.is_offline and len(clipped) == 2
    assert [(r.prompt_len, r.output_len) for r in clipped] == [(12, 100), (16, 2)]
    words = load_trace(path, time_scale=2.0)
    assert [r.prompt_len for r in words] == [12, 40, 6] and words.requests[2].arrival_s == 1.0


def test_replay_azure_csv(tiny, tmp_path):
    path = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:50.9951690,396,109\n"
                    "2023-11-16 18:15:47.0000000,20,1\n")
    trace = load_trace(path, tiny.tokenizer)
    assert trace.source["format"] == "azure-csv"
    assert [r.arrival_s for r in trace] == pytest.approx([0.0, 0.31941, 4.314579])
    assert [(r.prompt_len, r.output_len) for r in trace] == [(374, 44), (20, 1), (396, 109)]
    numeric = tmp_path / "seconds.csv"
    numeric.write_text("TIMESTAMP,ContextTokens,GeneratedTokens,Extra\n10.5,8,2,x\n12,9,3,y\n")
    assert [r.arrival_s for r in load_trace(numeric)] == [0.0, 1.5]


@pytest.mark.parametrize("content, where, message", [
    ('{"arrival_s": 0, "prompt_len": 4, "output_len": 2}\n{"arrival_s": 1, "prompt_len": 4\n', ":2:", "not JSON"),
    ('{"arrival_s": -1, "prompt_len": 4, "output_len": 2}\n', ":1:", "arrival_s must be a number of seconds >= 0"),
    ('{"prompt_len": 4}\n', ":1:", "output_len is missing"),
    ('{"prompt": "hi", "prompt_len": 4, "output_len": 1}\n', ":1:", "exactly one of prompt"),
    ('{"prompt_len": 4, "output_len": 0}\n', ":1:", "output_len must be an integer >= 1, got 0"),
    ('\n{"prompt_len": 2.5, "output_len": 1}\n', ":2:", "prompt_len must be an integer >= 1, got 2.5"),
    ('{"prompt": "  ", "output_len": 1}\n', ":1:", "prompt must be non-empty text"),
    ("TIMESTAMP,ContextTokens\n1,2\n", ":1:", "the CSV header lacks GeneratedTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\nyesterday,2,3\n", ":3:", "TIMESTAMP must be seconds or an ISO"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,x,3\n", ":3:", "ContextTokens must be an integer >= 1"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2\n", ":2:", "expected 3 columns"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "", "the trace has no requests"),
    ("", "", "the trace has no requests"),
])
def test_replay_errors_name_file_and_line(tmp_path, content, where, message):
    path = tmp_path / "bad.trace"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        load_trace(path)
    text = str(info.value)
    assert text.startswith(f"{path}{where}") and message in text and "\n" not in text


def test_replay_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no such trace file"):
        load_trace(tmp_path / "missing.jsonl")
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt_len": 1, "output_len": 1}\n')
    with pytest.raises(ValueError, match="time_scale must be a number >= 0, got -1"):
        load_trace(path, time_scale=-1)
    with pytest.raises(ValueError, match="max_requests must be an integer >= 1, got 0"):
        load_trace(path, max_requests=0)
