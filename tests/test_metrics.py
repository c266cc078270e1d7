"""The server's Prometheus page: valid text exposition, cumulative histograms, engine gauges from a snapshot."""

import math

import pytest

from labkit.generation import EngineStats
from labkit.metrics import ROWS_BUCKETS, Histogram, ServerMetrics


def _stats(**overrides) -> EngineStats:
    values = dict(num_running=3, num_waiting=2, num_kv_blocks=64, num_used_blocks=16, num_tokens_in_cache=200,
                  num_preemptions=1, prefix_hit_rate=0.25, num_steps=10, last_batch_size=3, last_num_tokens=3,
                  last_num_padding_rows=0)
    return EngineStats(**{**values, **overrides})


def _samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} through prometheus_client's own parser (fails on malformed text)."""
    parser = pytest.importorskip("prometheus_client.parser")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def test_histogram_buckets_are_cumulative():
    hist = Histogram(ROWS_BUCKETS)
    for rows in (1, 1, 3, 16, 1000):
        hist.observe(rows)
    lines = hist.lines("rows", 'model="m"')
    assert lines[0] == 'rows_bucket{model="m",le="1.0"} 2'
    assert 'rows_bucket{model="m",le="4.0"} 3' in lines and 'rows_bucket{model="m",le="16.0"} 4' in lines
    assert lines[-3:] == ['rows_bucket{model="m",le="+Inf"} 5', 'rows_sum{model="m"} 1021.0',
                          'rows_count{model="m"} 5']


def test_render_is_valid_exposition_with_engine_gauges():
    metrics = ServerMetrics()
    metrics.count_request("/v1/completions", 200)
    metrics.count_request("/v1/completions", 500)
    metrics.count_accepted()
    metrics.observe_first_token(0.01, 0.05, 7)
    metrics.observe_tokens(2, 0.02)
    metrics.observe_finished("stop", 0.2)
    for rows in (1, 2, 4):
        metrics.observe_step(rows)
    samples = _samples(metrics.render('a "quoted" model', num_waiting=5, stats=_stats()))
    m = frozenset({("model", 'a "quoted" model')})

    def value(name, **labels):
        return samples[(name, m | frozenset(labels.items()))]

    assert samples[("labkit_requests_total", frozenset({("route", "/v1/completions"), ("status", "500")}))] == 1
    assert value("labkit_requests_running") == 3
    assert value("labkit_requests_waiting") == value("labkit_queue_depth") == 5  # the inbox counts as waiting
    assert value("labkit_batch_size") == 3
    assert (value("labkit_kv_blocks_used"), value("labkit_kv_blocks_total")) == (16, 64)
    assert value("labkit_kv_cache_usage_ratio") == 0.25
    assert value("labkit_preemptions_total") == 1 and value("labkit_prefix_cache_hit_rate") == 0.25
    assert value("labkit_step_rows_count") == 3 and value("labkit_step_rows_sum") == 7
    assert value("labkit_step_rows_bucket", le="1.0") == 1 and value("labkit_step_rows_bucket", le="+Inf") == 3
    assert value("labkit_inter_token_latency_seconds_count") == 2
    assert value("labkit_request_finished_total", reason="stop") == 1


def test_render_before_any_lookup_or_block():
    samples = _samples(ServerMetrics().render("m", 0, _stats(num_kv_blocks=0, num_used_blocks=0,
                                                                prefix_hit_rate=None)))
    m = frozenset({("model", "m")})
    assert math.isnan(samples[("labkit_prefix_cache_hit_rate", m)])  # no lookup yet: no rate, not a zero
    assert samples[("labkit_kv_cache_usage_ratio", m)] == 0
