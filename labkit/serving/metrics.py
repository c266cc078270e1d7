"""The server's Prometheus metrics: request counters, latency histograms and engine gauges, via prometheus_client.

Each server keeps its metrics in a CollectorRegistry of its own (never the process-wide default one), so two
servers in one process, or a test after another, count apart. Latency buckets are vLLM's, so dashboards built
for it read these too. Engine gauges (running and waiting requests, batch size, KV blocks, preemptions,
prefix-cache hits) are read at scrape time from a snapshot the engine's own thread publishes: whoever renders
the page never touches the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from labkit.serving.server_info import INFO_METRIC, info_labels

if TYPE_CHECKING:
    from labkit.engine.engine import EngineStats

# Histogram buckets in seconds (vLLM's).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS_S = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # rows per engine step

EngineSnapshot = Callable[[], "tuple[int, EngineStats]"]  # () -> (requests waiting for the batch, engine stats)


class ServerMetrics:
    """Counters and histograms of one server, labelled with its model; updated from the event loop and the
    engine's thread (prometheus_client's metrics are thread-safe)."""

    def __init__(self, model: str):
        self.model = model
        self.registry = CollectorRegistry()
        r, m = self.registry, {"model": model}
        self.requests = Counter("labkit_requests_total", "HTTP responses, by route and status code.",
                                ["route", "status"], registry=r)
        self.accepted = Counter("labkit_requests_accepted_total", "Generations accepted into the queue.",
                                ["model"], registry=r).labels(**m)
        self.finished = Counter(
            "labkit_request_finished_total",
            "Generations ended, by reason (stop, length, cancelled, queue_timeout, rejected, error).",
            ["model", "reason"], registry=r)
        self.prompt_tokens = Counter("labkit_prompt_tokens_total", "Prompt tokens of requests that produced a token.",
                                     ["model"], registry=r).labels(**m)
        self.generation_tokens = Counter("labkit_generation_tokens_total", "Tokens generated.", ["model"],
                                         registry=r).labels(**m)

        def histogram(name: str, help_text: str, buckets) -> Histogram:
            return Histogram(name, help_text, ["model"], buckets=buckets, registry=r).labels(**m)

        self.ttft = histogram("labkit_time_to_first_token_seconds", "From request accepted to first token.",
                              TTFT_BUCKETS_S)
        self.itl = histogram("labkit_inter_token_latency_seconds",
                             "Between tokens; tokens released together share their gap.", ITL_BUCKETS_S)
        self.e2e = histogram("labkit_e2e_request_latency_seconds", "From request accepted to last token.",
                             E2E_BUCKETS_S)
        self.queue_time = histogram("labkit_request_queue_time_seconds",
                                    "From request accepted to joining the running batch.", E2E_BUCKETS_S)
        self.rows = histogram("labkit_step_rows", "Rows (requests) in each engine step.", ROWS_BUCKETS)

    def watch_engine(self, snapshot: EngineSnapshot) -> None:
        """Publish the engine's gauges, read from snapshot() at each scrape."""
        self.registry.register(EngineCollector(self.model, snapshot))

    def show_techniques(self, techniques: dict[str, str]) -> None:
        """One info metric, labkit_techniques_info{model, dtype, quantization, speculative, ...} 1, naming the
        techniques the engine runs (`Engine.techniques()`), as vLLM's cache_config_info names its settings."""
        Info("labkit_techniques", "The techniques the engine runs, as labels.", ["model"],
             registry=self.registry).labels(model=self.model).info(techniques)

    def publish_engine_config(self, settings: dict) -> None:
        """The engine's settings as an info gauge, `labkit_engine_config_info{model=...,prefix_caching=...} 1`
        (vLLM's `vllm:cache_config_info` likewise), so a scraper or a benchmark knows what it measured."""
        info = Info(INFO_METRIC, "The engine's settings (Engine.describe()), as labels.", ["model"],
                    registry=self.registry)
        info.labels(model=self.model).info(info_labels(settings))

    def count_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def count_accepted(self) -> None:
        self.accepted.inc()

    def observe_first_token(self, queue_s: float, ttft_s: float, num_prompt_tokens: int) -> None:
        self.queue_time.observe(queue_s)
        self.ttft.observe(ttft_s)
        self.prompt_tokens.inc(num_prompt_tokens)

    def observe_tokens(self, num_tokens: int, gap_s: float | None) -> None:
        """num_tokens arrived together after gap_s: one ITL sample of gap_s / num_tokens per token."""
        self.generation_tokens.inc(num_tokens)
        if gap_s is not None:
            for _ in range(num_tokens):
                self.itl.observe(gap_s / num_tokens)

    def observe_finished(self, reason: str, e2e_s: float) -> None:
        self.finished.labels(model=self.model, reason=reason).inc()
        self.e2e.observe(e2e_s)

    def observe_step(self, num_rows: int) -> None:
        self.rows.observe(num_rows)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(the page, its content type): Prometheus text, or OpenMetrics when the Accept header asks for it."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class EngineCollector:
    """The engine's gauges, from a snapshot taken at scrape time (a prometheus_client custom collector)."""

    def __init__(self, model: str, snapshot: EngineSnapshot):
        self.model, self.snapshot = model, snapshot

    def collect(self) -> Iterator[Metric]:
        num_waiting, stats = self.snapshot()
        usage = stats.num_used_blocks / stats.num_kv_blocks if stats.num_kv_blocks else 0.0
        hit_rate = float("nan") if stats.prefix_hit_rate is None else float(stats.prefix_hit_rate)
        for name, family, help_text, value in (
                ("labkit_queue_depth", GaugeMetricFamily,
                 "Requests waiting to join the running batch (as labkit_requests_waiting).", num_waiting),
                ("labkit_requests_waiting", GaugeMetricFamily, "Requests waiting to join the running batch.",
                 num_waiting),
                ("labkit_requests_running", GaugeMetricFamily, "Requests in the engine's running batch.",
                 stats.num_running),
                ("labkit_batch_size", GaugeMetricFamily, "Rows in the engine's last step.", stats.last_batch_size),
                ("labkit_kv_blocks_used", GaugeMetricFamily, "KV-cache blocks held by requests.",
                 stats.num_used_blocks),
                ("labkit_kv_blocks_total", GaugeMetricFamily, "KV-cache blocks in all.", stats.num_kv_blocks),
                ("labkit_kv_cache_usage_ratio", GaugeMetricFamily, "Fraction of the KV-cache blocks in use (0 to 1).",
                 usage),
                ("labkit_preemptions_total", CounterMetricFamily,
                 "Requests sent back to the queue because KV blocks ran out.", stats.num_preemptions),
                ("labkit_prefix_cache_hit_rate", GaugeMetricFamily,
                 "Prompt tokens found in the prefix cache over those looked up (NaN before the first lookup).",
                 hit_rate)):
            metric = family(name, help_text, labels=["model"])
            metric.add_metric([self.model], value)
            yield metric


__all__ = ["ServerMetrics", "EngineCollector", "EngineSnapshot", "TTFT_BUCKETS_S", "ITL_BUCKETS_S",
           "E2E_BUCKETS_S", "ROWS_BUCKETS"]
