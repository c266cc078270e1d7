"""The server's Prometheus page through prometheus_client: every metric name and label the dashboards read,
a registry per server, engine gauges from a snapshot taken at scrape time, OpenMetrics on request."""

import math

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from labkit.engine.engine import EngineStats
from labkit.serving.metrics import ServerMetrics


def _stats(**overrides) -> EngineStats:
    values = dict(num_running=3, num_waiting=2, num_kv_blocks=64, num_used_blocks=16, num_tokens_in_cache=200,
                  num_preemptions=1, prefix_hit_rate=0.25, num_steps=10, last_batch_size=3, last_num_tokens=3,
                  last_num_padding_rows=0)
    return EngineStats(**{**values, **overrides})


def _samples(metrics: ServerMetrics) -> dict:
    """{(name, frozenset(labels)): value} of the text page, read back by prometheus_client's own parser."""
    page, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(page.decode()) for s in family.samples}


def test_every_metric_keeps_its_name_labels_and_type():
    metrics = ServerMetrics('a "quoted" model')
    metrics.watch_engine(lambda: (5, _stats()))
    metrics.count_request("/v1/completions", 200)
    metrics.count_request("/v1/completions", 500)
    metrics.count_accepted()
    metrics.observe_first_token(0.01, 0.05, 7)
    metrics.observe_tokens(2, 0.02)
    metrics.observe_finished("stop", 0.2)
    for rows in (1, 2, 4):
        metrics.observe_step(rows)
    samples = _samples(metrics)
    m = frozenset({("model", 'a "quoted" model')})

    def value(name, **labels):
        return samples[(name, m | frozenset(labels.items()))]

    assert samples[("labkit_requests_total", frozenset({("route", "/v1/completions"), ("status", "500")}))] == 1
    assert value("labkit_requests_accepted_total") == 1 and value("labkit_prompt_tokens_total") == 7
    assert value("labkit_generation_tokens_total") == 2
    assert value("labkit_requests_running") == 3
    assert value("labkit_requests_waiting") == value("labkit_queue_depth") == 5  # the inbox counts as waiting
    assert value("labkit_batch_size") == 3
    assert (value("labkit_kv_blocks_used"), value("labkit_kv_blocks_total")) == (16, 64)
    assert value("labkit_kv_cache_usage_ratio") == 0.25
    assert value("labkit_preemptions_total") == 1 and value("labkit_prefix_cache_hit_rate") == 0.25
    assert value("labkit_step_rows_count") == 3 and value("labkit_step_rows_sum") == 7
    assert value("labkit_step_rows_bucket", le="1.0") == 1 and value("labkit_step_rows_bucket", le="4.0") == 3
    assert value("labkit_step_rows_bucket", le="+Inf") == 3
    # two tokens released together after 20 ms: two ITL samples of 10 ms each
    assert value("labkit_inter_token_latency_seconds_count") == 2
    assert value("labkit_inter_token_latency_seconds_sum") == 0.02
    assert value("labkit_inter_token_latency_seconds_bucket", le="0.01") == 2
    assert value("labkit_time_to_first_token_seconds_bucket", le="0.06") == 1
    assert value("labkit_request_queue_time_seconds_count") == 1
    assert value("labkit_e2e_request_latency_seconds_count") == 1
    assert value("labkit_request_finished_total", reason="stop") == 1
    page = metrics.render()[0].decode()
    for name, kind in (("labkit_requests_total", "counter"), ("labkit_request_finished_total", "counter"),
                       ("labkit_preemptions_total", "counter"), ("labkit_queue_depth", "gauge"),
                       ("labkit_time_to_first_token_seconds", "histogram"), ("labkit_step_rows", "histogram")):
        assert f"# TYPE {name} {kind}" in page


def test_before_any_lookup_or_block():
    metrics = ServerMetrics("m")
    metrics.watch_engine(lambda: (0, _stats(num_kv_blocks=0, num_used_blocks=0, prefix_hit_rate=None)))
    samples = _samples(metrics)
    m = frozenset({("model", "m")})
    assert math.isnan(samples[("labkit_prefix_cache_hit_rate", m)])  # no lookup yet: no rate, not a zero
    assert samples[("labkit_kv_cache_usage_ratio", m)] == 0


def test_each_server_counts_in_its_own_registry():
    first, second = ServerMetrics("a"), ServerMetrics("a")  # the same names twice: no clash
    first.count_request("/health", 200)
    assert ("labkit_requests_total", frozenset({("route", "/health"), ("status", "200")})) in _samples(first)
    assert not any(name == "labkit_requests_total" for name, _ in _samples(second))
    assert prometheus_client.REGISTRY.get_sample_value(  # the process-wide registry is left alone
        "labkit_requests_total", {"route": "/health", "status": "200"}) is None


def test_engine_snapshot_is_read_at_each_scrape_and_openmetrics_on_request():
    running = [1]
    metrics = ServerMetrics("m")
    metrics.watch_engine(lambda: (0, _stats(num_running=running[0])))
    assert _samples(metrics)[("labkit_requests_running", frozenset({("model", "m")}))] == 1
    running[0] = 4
    assert _samples(metrics)[("labkit_requests_running", frozenset({("model", "m")}))] == 4
    page, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and page.endswith(b"# EOF\n")
