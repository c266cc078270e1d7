"""The server's Prometheus metrics: request counters, latency histograms and engine gauges (text format 0.0.4).

Latency buckets are vLLM's, so dashboards built for it read these too. Engine gauges (running and waiting
requests, batch size, KV blocks, preemptions, prefix-cache hits) come from a snapshot the engine's own thread
publishes: whoever renders the page never touches the engine.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labkit.generation import EngineStats

# Histogram buckets in seconds (vLLM's).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS_S = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # rows per engine step


class Histogram:
    """A cumulative-bucket histogram; not thread-safe on its own (ServerMetrics holds the lock)."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        """Its samples; labels is `key="value",...` (may be empty)."""
        sep = "," if labels else ""
        out, total = [], 0
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            total += count
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        out += [f"{name}_sum{{{labels}}} {self.sum!r}", f"{name}_count{{{labels}}} {self.count}"]
        return out


class ServerMetrics:
    """Counters and histograms of one server; updated from the event loop and the engine's thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (route, status) -> count
        self.accepted = 0  # generations queued; each ends once in `finished`
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: collections.Counter = collections.Counter()  # finish reason -> count
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.itl = Histogram(ITL_BUCKETS_S)
        self.e2e = Histogram(E2E_BUCKETS_S)
        self.queue_time = Histogram(E2E_BUCKETS_S)
        self.rows = Histogram(ROWS_BUCKETS)

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def count_accepted(self) -> None:
        with self._lock:
            self.accepted += 1

    def observe_first_token(self, queue_s: float, ttft_s: float, num_prompt_tokens: int) -> None:
        with self._lock:
            self.queue_time.observe(queue_s)
            self.ttft.observe(ttft_s)
            self.prompt_tokens += num_prompt_tokens

    def observe_tokens(self, num_tokens: int, gap_s: float | None) -> None:
        """num_tokens arrived together after gap_s: one ITL sample of gap_s / num_tokens per token."""
        with self._lock:
            self.generation_tokens += num_tokens
            if gap_s is not None:
                for _ in range(num_tokens):
                    self.itl.observe(gap_s / num_tokens)

    def observe_finished(self, reason: str, e2e_s: float) -> None:
        with self._lock:
            self.finished[reason] += 1
            self.e2e.observe(e2e_s)

    def observe_step(self, num_rows: int) -> None:
        with self._lock:
            self.rows.observe(num_rows)

    def render(self, model: str, num_waiting: int, stats: EngineStats) -> str:
        """The Prometheus text exposition of every metric; stats is the engine's latest snapshot."""
        m = f'model="{_label(model)}"'
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, *samples: str) -> None:
            lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples))

        usage = stats.num_used_blocks / stats.num_kv_blocks if stats.num_kv_blocks else 0.0
        hit_rate = "NaN" if stats.prefix_hit_rate is None else repr(float(stats.prefix_hit_rate))
        with self._lock:
            family("labkit_requests_total", "counter", "HTTP responses, by route and status code.",
                   *(f'labkit_requests_total{{route="{_label(route)}",status="{status}"}} {count}'
                     for (route, status), count in sorted(self.requests.items())))
            family("labkit_requests_accepted_total", "counter", "Generations accepted into the queue.",
                   f"labkit_requests_accepted_total{{{m}}} {self.accepted}")
            family("labkit_request_finished_total", "counter",
                   "Generations ended, by reason (stop, length, cancelled, queue_timeout, rejected, error).",
                   *(f'labkit_request_finished_total{{{m},reason="{_label(reason)}"}} {count}'
                     for reason, count in sorted(self.finished.items())))
            family("labkit_prompt_tokens_total", "counter", "Prompt tokens of requests that produced a token.",
                   f"labkit_prompt_tokens_total{{{m}}} {self.prompt_tokens}")
            family("labkit_generation_tokens_total", "counter", "Tokens generated.",
                   f"labkit_generation_tokens_total{{{m}}} {self.generation_tokens}")
            for name, hist, help_text in (
                    ("labkit_time_to_first_token_seconds", self.ttft, "From request accepted to first token."),
                    ("labkit_inter_token_latency_seconds", self.itl,
                     "Between tokens; tokens released together share their gap."),
                    ("labkit_e2e_request_latency_seconds", self.e2e, "From request accepted to last token."),
                    ("labkit_request_queue_time_seconds", self.queue_time,
                     "From request accepted to joining the running batch."),
                    ("labkit_step_rows", self.rows, "Rows (requests) in each engine step.")):
                family(name, "histogram", help_text, *hist.lines(name, m))
        for name, kind, help_text, value in (
                ("labkit_queue_depth", "gauge", "Requests waiting to join the running batch (as "
                 "labkit_requests_waiting).", num_waiting),
                ("labkit_requests_waiting", "gauge", "Requests waiting to join the running batch.", num_waiting),
                ("labkit_requests_running", "gauge", "Requests in the engine's running batch.", stats.num_running),
                ("labkit_batch_size", "gauge", "Rows in the engine's last step.", stats.last_batch_size),
                ("labkit_kv_blocks_used", "gauge", "KV-cache blocks held by requests.", stats.num_used_blocks),
                ("labkit_kv_blocks_total", "gauge", "KV-cache blocks in all.", stats.num_kv_blocks),
                ("labkit_kv_cache_usage_ratio", "gauge", "Fraction of the KV-cache blocks in use (0 to 1).",
                 repr(usage)),
                ("labkit_preemptions_total", "counter", "Requests sent back to the queue because KV blocks ran out.",
                 stats.num_preemptions),
                ("labkit_prefix_cache_hit_rate", "gauge",
                 "Prompt tokens found in the prefix cache over those looked up (NaN before the first lookup).",
                 hit_rate)):
            family(name, kind, help_text, f"{name}{{{m}}} {value}")
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


__all__ = ["Histogram", "ServerMetrics", "TTFT_BUCKETS_S", "ITL_BUCKETS_S", "E2E_BUCKETS_S", "ROWS_BUCKETS"]
