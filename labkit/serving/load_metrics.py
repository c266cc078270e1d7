"""The load generator's metric arithmetic (pure functions, unit-tested on scripted streams), after vLLM's
`benchmark_serving.py`: TTFT (request sent -> first token), TPOT ((E2E - TTFT) / (output tokens - 1)), ITL (the
gaps between token arrivals; a chunk that brings k tokens after a gap g counts as k gaps of g/k), E2E latency,
request and token throughput, goodput (requests per second that meet every SLO), and the load per replica.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

METRICS = ("ttft", "tpot", "itl", "e2el")  # each reported as mean/median/std/p90/p99 in ms
PERCENTILES = (90.0, 99.0)  # always in the lab's metrics; --metric-percentiles adds more
TOKEN_COUNT_SOURCES = ("usage", "tokenizer")  # the server's usage, or the text re-tokenized on the client


def percentile_key(p: float) -> str:
    """p99 for 99, p99.9 for 99.9: vLLM's spelling in result keys."""
    return f"p{int(p)}" if p == int(p) else f"p{p}"


def tokens_per_chunk(chunk_tokens: Sequence[int | None], num_output_tokens: int | None) -> list[int]:
    """Tokens each content chunk brought: the server's per-chunk count where it sent one; the rest of the
    `usage` total is shared evenly among the chunks without a count (each had text, so at least one token)."""
    counts = [k if k is not None else 0 for k in chunk_tokens]
    unknown = [i for i, k in enumerate(chunk_tokens) if k is None]
    if unknown:
        left = len(unknown) if num_output_tokens is None else num_output_tokens - sum(counts)
        share, extra = divmod(max(left, len(unknown)), len(unknown))
        for j, i in enumerate(unknown):
            counts[i] = share + (1 if j < extra else 0)
    return counts


@dataclass
class RequestTiming:
    """One streamed request's latencies in seconds (vLLM's definitions)."""

    ttft_s: float
    tpot_s: float | None  # None with fewer than 2 output tokens
    itl_s: list[float]
    e2el_s: float
    num_output_tokens: int


def request_timing(start_s: float, chunk_times_s: Sequence[float], chunk_tokens: Sequence[int | None],
                   end_s: float, num_output_tokens: int | None) -> RequestTiming:
    """Latencies of one request from when it was sent, when each content chunk arrived, and when it ended.

    TTFT: to the first chunk that brought a token. ITL: for each later chunk that brought k tokens after a
    gap g since the previous one, k samples of g/k (tokens that came with the first one have no ITL: their
    time is in TTFT). E2E: to the end of the stream. TPOT: (E2E - TTFT) / (output tokens - 1).
    """
    if len(chunk_times_s) != len(chunk_tokens):
        raise ValueError("chunk_times_s and chunk_tokens must have the same length")
    counts = tokens_per_chunk(chunk_tokens, num_output_tokens)
    arrivals = [(t, k) for t, k in zip(chunk_times_s, counts) if k > 0]
    if not arrivals:
        raise ValueError("the stream brought no tokens")
    ttft = arrivals[0][0] - start_s
    itl: list[float] = []
    for (previous, _), (t, k) in zip(arrivals, arrivals[1:]):
        itl.extend([(t - previous) / k] * k)
    e2el = end_s - start_s
    n = num_output_tokens if num_output_tokens is not None else sum(counts)
    tpot = (e2el - ttft) / (n - 1) if n > 1 else None
    return RequestTiming(ttft_s=ttft, tpot_s=tpot, itl_s=itl, e2el_s=e2el, num_output_tokens=n)


def _stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict:
    from labkit.lab.stats import percentile  # that module brings torch, which a load generator does not need

    values = [v * 1e3 for v in values_s]
    stats = {f"mean_{name}_ms": statistics.fmean(values) if values else None,
             f"median_{name}_ms": statistics.median(values) if values else None,
             f"std_{name}_ms": statistics.pstdev(values) if values else None}
    for p in percentiles:
        stats[f"{percentile_key(p)}_{name}_ms"] = percentile(values, p) if values else None
    return stats


def compute_metrics(outcomes: Sequence[RequestOutcome], duration_s: float, slo: dict | None = None,
                    percentiles: Sequence[float] = PERCENTILES) -> dict:
    """The flat metrics of a run: counts, throughputs, goodput, and mean/median/std and percentiles (p90, p99
    and any others asked for) of each latency."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    percentiles = sorted({*PERCENTILES, *percentiles})
    done = [o for o in outcomes if o.success]
    total_in = sum(o.input_tokens for o in done)
    total_out = sum(o.output_tokens for o in done)
    timings = [o.timing for o in done]
    metrics = {
        "duration_s": duration_s,
        "num_completed": len(done),
        "num_failed": len(outcomes) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput_req_per_s": len(done) / duration_s,
        "output_throughput_tokens_per_s": total_out / duration_s,
        "total_token_throughput_tokens_per_s": (total_in + total_out) / duration_s,
        "request_goodput_req_per_s": None,
    }
    if slo:
        # like vLLM, a one-token request has TPOT 0 for the SLO check
        good = [t for t in timings if t.ttft_s * 1e3 <= slo.get("ttft_ms", math.inf)
                and (t.tpot_s or 0.0) * 1e3 <= slo.get("tpot_ms", math.inf)
                and t.e2el_s * 1e3 <= slo.get("e2el_ms", math.inf)]
        metrics["request_goodput_req_per_s"] = len(good) / duration_s
    metrics.update(_stats("ttft", [t.ttft_s for t in timings], percentiles))
    metrics.update(_stats("tpot", [t.tpot_s for t in timings if t.tpot_s is not None], percentiles))
    metrics.update(_stats("itl", [x for t in timings for x in t.itl_s], percentiles))
    metrics.update(_stats("e2el", [t.e2el_s for t in timings], percentiles))
    return metrics


def replica_load(outcomes: Sequence[RequestOutcome], duration_s: float) -> dict:
    """Per replica (as a router names it in x-labkit-replica): requests answered, completed and failed, output
    tokens and their rate over the run; {} when no answer named a replica."""
    load: dict[str, dict] = {}
    for o in outcomes:
        if o.replica is None:
            continue
        r = load.setdefault(o.replica, {"num_requests": 0, "num_completed": 0, "num_failed": 0, "output_tokens": 0})
        r["num_requests"] += 1
        r["num_completed" if o.success else "num_failed"] += 1
        r["output_tokens"] += o.output_tokens if o.success else 0
    for r in load.values():
        r["output_throughput_tokens_per_s"] = r["output_tokens"] / duration_s
    return dict(sorted(load.items()))


@dataclass
class RequestOutcome:
    """What one request brought back; times are perf_counter seconds."""

    index: int
    success: bool
    error: str | None = None
    start_s: float = 0.0
    end_s: float = 0.0
    input_tokens: int = 0  # usage.prompt_tokens, else the prompt re-tokenized
    output_tokens: int = 0  # usage.completion_tokens, else the text re-tokenized
    expected_output_tokens: int = 0
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int | None] = field(default_factory=list)
    timing: RequestTiming | None = None
    text: str = ""  # the generated text (kept for counting, not written out)
    usage: dict | None = None  # the server's counts ({"prompt_tokens", "completion_tokens"}), None if it sent none
    token_count_source: str | None = None  # where output_tokens came from: one of TOKEN_COUNT_SOURCES
    replica: str | None = None  # the replica that answered, when a router says (its x-labkit-replica header)

    def to_dict(self, origin_s: float) -> dict:
        """A JSON row: times in ms, from `origin_s` (the run's start) for the send time."""
        row = {"index": self.index, "success": self.success, "error": self.error,
               "sent_at_ms": (self.start_s - origin_s) * 1e3, "input_tokens": self.input_tokens,
               "output_tokens": self.output_tokens, "expected_output_tokens": self.expected_output_tokens,
               "token_count_source": self.token_count_source, "num_chunks": len(self.chunk_times_s),
               "replica": self.replica}
        t = self.timing
        row.update(ttft_ms=t.ttft_s * 1e3 if t else None, tpot_ms=t.tpot_s * 1e3 if t and t.tpot_s is not None
                   else None, e2el_ms=t.e2el_s * 1e3 if t else None, itl_ms=[x * 1e3 for x in t.itl_s] if t else [])
        return row


__all__ = ["METRICS", "PERCENTILES", "TOKEN_COUNT_SOURCES", "percentile_key", "tokens_per_chunk", "RequestTiming",
           "request_timing", "compute_metrics", "replica_load", "RequestOutcome"]
