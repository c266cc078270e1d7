"""`labkit bench serve`: a load generator for any OpenAI-compatible server (labkit serve, vLLM, TGI, llama.cpp).

Metrics follow vLLM's `benchmark_serving.py`: TTFT (request sent -> first token), TPOT ((E2E - TTFT) / (output
tokens - 1)), ITL (the gaps between token arrivals; a chunk that brings k tokens after a gap g counts as k gaps
of g/k), E2E latency, request and token throughput, and goodput (requests per second that meet every SLO).
Token counts come from the server's `usage`; a server that sends none (llama.cpp's) has its output re-tokenized
after the run, as vLLM's benchmark does, and the result says which way each request was counted. Arrivals are
Poisson (burstiness 1) or gamma-distributed; there are no client retries, so every failure is counted once, and
a malformed reply fails its request, not the run. vLLM's flag names are accepted and its result keys written.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from labkit.lab.stats import percentile
from labkit.serving.client import add_api_key_options, transport_error
from labkit.model.loader import EMBEDDED_MODEL
from labkit.serving.protocol import (DONE, ENDPOINTS, REPLICA_HEADER, ServerError, api_key_for, auth_headers, chunk_text,
                             error_message, model_ids, parse_sse_line, server_url, stream_usage)
from labkit.serving.workloads import PromptSpec, arrival_offsets, make_prompts

SCHEMA = "labkit.bench_serve/1"
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")
METRICS = ("ttft", "tpot", "itl", "e2el")  # each reported as mean/median/std/p90/p99 in ms
PERCENTILES = (90.0, 99.0)  # always in the lab's metrics; --metric-percentiles adds more
TOKEN_COUNT_SOURCES = ("usage", "tokenizer")  # the server's usage, or the text re-tokenized on the client


# -- configuration -------------------------------------------------------------------------------------------
@dataclass
class BenchServeConfig:
    """One load-generation run; validated on creation (one-line errors naming the option)."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model at /v1/models
    endpoint: str = "completions"  # or "chat"
    num_prompts: int = 50
    input_len: int = 64  # words per prompt, about one token each
    output_len: int = 32  # max_tokens per request (exact with ignore_eos)
    range_ratio: float = 0.0  # lengths uniform in [len * (1 - r), len * (1 + r)]
    request_rate: float = math.inf  # requests per second; inf sends all at once
    burstiness: float = 1.0  # gamma shape of the inter-arrival times: 1 = Poisson, < 1 burstier
    max_concurrency: int | None = None  # in-flight cap on the client side
    num_warmups: int = 1  # requests before the timed run, excluded from the metrics
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True  # vLLM's extension: fixed output lengths
    return_token_ids: bool = True  # vLLM's extension: per-chunk token ids, so ITL splits multi-token chunks exactly
    slo: dict = field(default_factory=dict)  # {"ttft_ms": ..., "tpot_ms": ..., "e2el_ms": ...}
    timeout_s: float = 300.0  # per request
    api_key: str | None = None
    tokenizer: str | None = None  # counts tokens when the server sends no usage; None: the embedded model's
    percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl")  # vLLM's keys written for these (its default)
    metric_percentiles: tuple[float, ...] = (99.0,)  # ... at these percentiles

    def __post_init__(self):
        from urllib.parse import urlsplit

        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        try:
            parts = urlsplit(self.base_url)
            port = parts.port
        except ValueError:
            raise ValueError(f"base_url {self.base_url!r} is not a URL with a port in 1..65535") from None
        if not parts.hostname or port == 0:
            raise ValueError(f"base_url {self.base_url!r} needs a host and a port in 1..65535")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {self.endpoint!r}: choose one of {', '.join(ENDPOINTS)}")
        for name in ("num_prompts", "input_len", "output_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (or inf), got {self.request_rate!r}")
        if not 0 < self.burstiness < math.inf:
            raise ValueError(f"burstiness must be a finite number > 0, got {self.burstiness!r}")
        if self.max_concurrency is not None and (not isinstance(self.max_concurrency, int) or self.max_concurrency < 1):
            raise ValueError(f"max_concurrency must be an integer >= 1, got {self.max_concurrency!r}")
        if not isinstance(self.num_warmups, int) or self.num_warmups < 0:
            raise ValueError(f"num_warmups must be an integer >= 0, got {self.num_warmups!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        self.slo = dict(self.slo)
        for key, value in self.slo.items():
            if key not in SLO_KEYS:
                raise ValueError(f"unknown SLO {key!r}: choose among {', '.join(SLO_KEYS)}")
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"SLO {key} must be a number > 0, got {value!r}")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise ValueError(f"tokenizer must be an HF id or a local path, got {self.tokenizer!r}")
        self.percentile_metrics = tuple(self.percentile_metrics)
        for name in self.percentile_metrics:
            if name not in METRICS:
                raise ValueError(f"unknown percentile metric {name!r}: choose among {', '.join(METRICS)}")
        self.metric_percentiles = tuple(self.metric_percentiles)
        for p in self.metric_percentiles:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
                raise ValueError(f"metric percentiles must be numbers in [0, 100], got {p!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("api_key")  # never written to disk
        out["request_rate"] = None if math.isinf(self.request_rate) else self.request_rate  # JSON has no inf
        return out


def parse_slo(text: str | None) -> dict:
    """`ttft_ms=500,tpot_ms=50` -> {"ttft_ms": 500.0, "tpot_ms": 50.0}; ValueError naming a bad item."""
    slo = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"SLO item {item.strip()!r} is not key=value (e.g. ttft_ms=500,tpot_ms=50)")
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO {key!r}: choose among {', '.join(SLO_KEYS)}")
        try:
            slo[key] = float(value)
        except ValueError:
            raise ValueError(f"SLO {key} needs a number of milliseconds, got {value.strip()!r}") from None
        if not 0 < slo[key] < math.inf:
            raise ValueError(f"SLO {key} must be > 0, got {value.strip()!r}")
    return slo


def parse_goodput(pairs: Sequence[str] | None) -> dict:
    """vLLM's `--goodput ttft:500 tpot:50` -> {"ttft_ms": 500.0, "tpot_ms": 50.0}; ValueError naming a bad item."""
    slo = {}
    for pair in pairs or ():
        key, sep, value = pair.partition(":")
        if not sep:
            raise ValueError(f"goodput item {pair!r} is not KEY:MS (e.g. ttft:500 tpot:50)")
        slo.update(parse_slo(f"{key.strip()}_ms={value}"))
    return slo


def percentile_key(p: float) -> str:
    """p99 for 99, p99.9 for 99.9: vLLM's spelling in result keys."""
    return f"p{int(p)}" if p == int(p) else f"p{p}"


# -- the metric arithmetic (pure functions, unit-tested on scripted streams) -----------------------------------
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
    values = [v * 1e3 for v in values_s]
    stats = {f"mean_{name}_ms": statistics.fmean(values) if values else None,
             f"median_{name}_ms": statistics.median(values) if values else None,
             f"std_{name}_ms": statistics.pstdev(values) if values else None}
    for p in percentiles:
        stats[f"{percentile_key(p)}_{name}_ms"] = percentile(values, p) if values else None
    return stats


def compute_metrics(outcomes: Sequence["RequestOutcome"], duration_s: float, slo: dict | None = None,
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


def replica_load(outcomes: Sequence["RequestOutcome"], duration_s: float) -> dict:
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


# -- sending requests ----------------------------------------------------------------------------------------
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


def request_body(config: BenchServeConfig, model: str, spec: PromptSpec) -> dict:
    body = {"model": model, "max_tokens": spec.output_len, "temperature": config.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.return_token_ids:
        body["return_token_ids"] = True
    return body


async def send_request(client, url: str, body: dict, headers: dict, index: int = 0) -> RequestOutcome:
    """POST one streaming request and record when each content chunk arrived, its text and the server's usage;
    never raises, never retries. A reply that is not OpenAI's stream fails the request with what was wrong.
    `settle` then counts its tokens and computes its latencies."""
    import httpx

    is_chat = "messages" in body
    out = RequestOutcome(index=index, success=False, expected_output_tokens=body.get("max_tokens", 0))
    parts, is_done = [], False
    out.start_s = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            out.replica = response.headers.get(REPLICA_HEADER)
            if response.status_code != 200:
                out.error = error_message(response.status_code, await response.aread())
                out.end_s = time.perf_counter()
                return out
            async for line in response.aiter_lines():
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event is DONE:
                    is_done = True
                    break
                now = time.perf_counter()
                text, token_ids, _ = chunk_text(event, is_chat)
                if text or token_ids:
                    out.chunk_times_s.append(now)
                    out.chunk_tokens.append(len(token_ids) if token_ids is not None else None)
                    parts.append(text)
                out.usage = stream_usage(event) or out.usage
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    except ServerError as exc:
        out.error = str(exc)
    out.end_s = time.perf_counter()
    out.text = "".join(parts)
    if out.error is None and not is_done:
        out.error = "the stream ended without data: [DONE]"
    elif out.error is None and not out.chunk_times_s:
        out.error = "the stream brought no text"
    return out


def count_tokens(tokenizer, text: str) -> int:
    """Tokens in `text` without special tokens, as vLLM's benchmark counts a reply that came without usage."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def settle(out: RequestOutcome, prompt: str, get_tokenizer: Callable[[], object]) -> RequestOutcome:
    """Count a streamed request's tokens and compute its latencies (run after the timed requests, so no client
    tokenizing competes with them). Output tokens: the server's `usage.completion_tokens`, else the text
    re-tokenized with `get_tokenizer()`; input tokens: `usage.prompt_tokens`, else the prompt re-tokenized."""
    if out.error is not None or out.success:
        return out
    usage = out.usage or {}
    n_in, n_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    out.token_count_source = "usage" if n_out is not None else "tokenizer"
    if n_out is None:
        n_out = count_tokens(get_tokenizer(), out.text)
    if n_in is None:
        n_in = count_tokens(get_tokenizer(), prompt)
    out.input_tokens, out.output_tokens = n_in, n_out
    try:
        out.timing = request_timing(out.start_s, out.chunk_times_s, out.chunk_tokens, out.end_s, n_out)
        out.success = True
    except ValueError as exc:
        out.error = str(exc)
    return out


def load_tokenizer(name: str | None = None):
    """The tokenizer that counts tokens for a server that sends no usage: an HF hub id (offline: from the local
    cache only) or a local directory; None: the embedded model's."""
    from transformers import AutoTokenizer

    from labkit.model import loader as models

    if name is None or name in models.EMBEDDED_ALIASES:
        return AutoTokenizer.from_pretrained(models.convert_embedded())
    path = Path(name).expanduser()
    if not path.is_dir() and (path.exists() or name.startswith((".", "/", "~"))):
        raise ValueError(f"tokenizer path {name!r} is not a directory (leave --tokenizer out for the embedded "
                         f"model's)")
    local_only = not path.is_dir() and (models._in_hf_cache(name) or not models._hub_reachable())
    try:
        return AutoTokenizer.from_pretrained(path if path.is_dir() else name, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"cannot load tokenizer {name!r}: {first[:160]}") from None


def _count_source(outcomes: Sequence[RequestOutcome]) -> str | None:
    """How a run's successful requests were counted: one of TOKEN_COUNT_SOURCES, "mixed", or None (none were)."""
    sources = {o.token_count_source for o in outcomes if o.success}
    return sources.pop() if len(sources) == 1 else "mixed" if sources else None


async def run_benchmark(config: BenchServeConfig, prompts: Sequence[PromptSpec] | None = None,
                        tokenizer=None) -> dict:
    """Warm up, send the workload on its arrival schedule, and return the result document (see the schema doc).

    `tokenizer` counts tokens for a server that sends no usage (default: `load_tokenizer(config.tokenizer)`,
    loaded only when needed, and up front when config.tokenizer names one, so a bad name fails before the work).
    """
    import httpx

    prompts = list(prompts) if prompts is not None else make_prompts(
        config.num_prompts, config.input_len, config.output_len, config.range_ratio, config.seed)
    get_tokenizer = functools.cache(lambda: load_tokenizer(config.tokenizer) if tokenizer is None else tokenizer)
    if config.tokenizer is not None:
        get_tokenizer()
    headers = auth_headers(config.api_key)
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    timeout = httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s))
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        models = await _list_models(client, config.base_url, headers)
        model = config.model or (models[0] if models else None)
        if model is None:
            raise ServerError(f"{config.base_url}/v1/models lists no model: pass --model")
        url = config.base_url + ENDPOINTS[config.endpoint]
        # warm-up prompts of the same shape but other words, so a prefix cache cannot favour the timed ones
        warmups = make_prompts(config.num_warmups, config.input_len, config.output_len, config.range_ratio,
                               seed=f"warmup-{config.seed}")
        for spec in warmups:
            warm = await send_request(client, url, request_body(config, model, spec), headers)
            if not settle(warm, spec.prompt, get_tokenizer).success:
                raise ServerError(f"warm-up request to {url} failed: {warm.error}")

        semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

        async def one(spec: PromptSpec) -> RequestOutcome:
            body = request_body(config, model, spec)
            if semaphore is None:
                return await send_request(client, url, body, headers, spec.index)
            async with semaphore:
                return await send_request(client, url, body, headers, spec.index)

        offsets = arrival_offsets(len(prompts), config.request_rate, config.burstiness, config.seed)
        origin = time.perf_counter()
        tasks = []
        for spec, offset in zip(prompts, offsets):
            delay = origin + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec)))
        outcomes = await asyncio.gather(*tasks)
        duration = max(o.end_s for o in outcomes) - origin
    outcomes = [settle(o, spec.prompt, get_tokenizer) for o, spec in zip(outcomes, prompts)]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    from labkit.device import describe_environment

    metrics = compute_metrics(outcomes, duration, config.slo, config.metric_percentiles)
    replicas = replica_load(outcomes, duration)
    if replicas:
        metrics["num_replicas"] = len(replicas)
    now = datetime.now(timezone.utc)
    tokenizer_id = config.tokenizer or getattr(tokenizer, "name_or_path", None) or EMBEDDED_MODEL
    return {
        "schema": SCHEMA,
        "timestamp": now.isoformat(timespec="milliseconds"),
        "config": config.to_dict(),
        "server": {"base_url": config.base_url, "endpoint_url": url, "model": model, "models": models},
        "env": describe_environment(),  # the client's machine; the server is only named above
        "token_count_source": _count_source(outcomes),
        "metrics": metrics,
        "errors": errors,
        "replicas": replicas,
        "requests": [o.to_dict(origin) for o in outcomes],
        **vllm_keys(config, model, tokenizer_id, metrics, now),
    }


def vllm_keys(config: BenchServeConfig, model: str, tokenizer_id: str | None, metrics: dict,
              when: datetime) -> dict:
    """The flat keys `vllm bench serve --save-result` writes (without --save-detailed), from a run's metrics, so
    scripts that read vLLM's result files read ours: mean/median/std and `config.metric_percentiles` of each
    of `config.percentile_metrics`."""
    backend = "openai-chat" if config.endpoint == "chat" else "openai"
    keys = {"date": when.strftime("%Y%m%d-%H%M%S"), "endpoint_type": backend, "backend": backend, "label": None,
            "model_id": model, "tokenizer_id": tokenizer_id,
            "num_prompts": metrics["num_completed"] + metrics["num_failed"],
            "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
            "burstiness": config.burstiness, "max_concurrency": config.max_concurrency,
            "duration": metrics["duration_s"], "completed": metrics["num_completed"],
            "failed": metrics["num_failed"], "total_input_tokens": metrics["total_input_tokens"],
            "total_output_tokens": metrics["total_output_tokens"],
            "request_throughput": metrics["request_throughput_req_per_s"],
            "request_goodput": metrics["request_goodput_req_per_s"],
            "output_throughput": metrics["output_throughput_tokens_per_s"],
            "total_token_throughput": metrics["total_token_throughput_tokens_per_s"]}
    for name in config.percentile_metrics:
        for stat in ("mean", "median", "std", *map(percentile_key, config.metric_percentiles)):
            keys[f"{stat}_{name}_ms"] = metrics[f"{stat}_{name}_ms"]
    return keys


async def _list_models(client, base_url: str, headers: dict) -> list[str]:
    import httpx

    url = f"{base_url}/v1/models"
    try:
        response = await client.get(url, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise transport_error(url, exc) from None
    return model_ids(url, response.status_code, response.content)


def benchmark(config: BenchServeConfig, prompts: Sequence[PromptSpec] | None = None, tokenizer=None) -> dict:
    """`run_benchmark` from synchronous code (a notebook cell with a running loop should await it instead)."""
    return asyncio.run(run_benchmark(config, prompts, tokenizer))


# -- reporting -----------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """vLLM-style text summary of a result document."""
    m, c = result["metrics"], result["config"]

    def fmt(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    rate = "inf" if c["request_rate"] is None else c["request_rate"]
    counted = {"usage": "the server's usage", "tokenizer": f"re-tokenized with {result.get('tokenizer_id')}",
               "mixed": f"usage, else re-tokenized with {result.get('tokenizer_id')}"}
    lines = [f"{' Serving benchmark ':=^56}",
             f"{'Model / endpoint:':<40}{result['server']['model']} {c['endpoint']}",
             f"{'Request rate / burstiness:':<40}{rate} / {c['burstiness']}",
             f"{'Max concurrency:':<40}{c['max_concurrency'] or 'none'}",
             f"{'Successful / failed requests:':<40}{m['num_completed']} / {m['num_failed']}",
             f"{'Duration (s):':<40}{fmt(m['duration_s'])}",
             f"{'Total input / output tokens:':<40}{m['total_input_tokens']} / {m['total_output_tokens']}",
             f"{'Token counts from:':<40}{counted.get(result.get('token_count_source'), 'n/a')}",
             f"{'Request throughput (req/s):':<40}{fmt(m['request_throughput_req_per_s'])}",
             f"{'Output token throughput (tok/s):':<40}{fmt(m['output_throughput_tokens_per_s'])}",
             f"{'Total token throughput (tok/s):':<40}{fmt(m['total_token_throughput_tokens_per_s'])}"]
    if m["request_goodput_req_per_s"] is not None:
        lines.append(f"{'Goodput (req/s):':<40}{fmt(m['request_goodput_req_per_s'])}")
    titles = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
              "itl": "Inter-token latency", "e2el": "End-to-end latency"}
    stats = ["mean", "median", *map(percentile_key, sorted({*PERCENTILES, *c.get("metric_percentiles", ())}))]
    for name in METRICS:
        lines.append(f"{' ' + titles[name] + ' ':-^56}")
        for stat in stats:
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms):':<40}{fmt(m[f'{stat}_{name}_ms'])}")
    for replica, r in (result.get("replicas") or {}).items():
        lines.append(f"{f'Replica {replica} (req ok/failed, tok/s):':<40}{r['num_completed']} / {r['num_failed']}, "
                     f"{r['output_throughput_tokens_per_s']:.1f}")
    lines.append("=" * 56)
    for error, count in result["errors"].items():
        lines.append(f"{count} × {error}")
    return "\n".join(lines)


def default_result_name() -> str:
    return f"bench_serve_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}.json"


def save_result(result: dict, result_file: str | Path | None = None) -> Path:
    """Write the result document atomically and append its row (with the environment stamp) to the results."""
    from labkit.lab import results

    if result_file is None:
        result_file = results.data_dir() / "bench_serve" / default_result_name()
    path = results.write_json_atomic(result_file, result)
    params = {**result["config"], "model": result["server"]["model"], "result_file": str(path),
              "token_count_source": result["token_count_source"], "tokenizer": result["tokenizer_id"]}
    results.append_rows(results.make_row("bench_serve", params, result["metrics"], env=result["env"]))
    return path


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from labkit.lab.results import data_dir, to_jsonable

    result_file = args.result_file
    if args.result_dir is not None or args.result_filename is not None:
        if result_file is not None:
            raise ValueError("give --result-file (a whole path) or --result-dir/--result-filename, not both")
        result_file = Path(args.result_dir or data_dir() / "bench_serve") / (args.result_filename
                                                                            or default_result_name())
    base_url = args.base_url or server_url(args.host, args.port)
    api_key, note = api_key_for(base_url, args.api_key, args.use_env_key)
    config = BenchServeConfig(
        base_url=base_url, model=args.model, endpoint=args.endpoint, num_prompts=args.num_prompts,
        input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
        request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups, seed=args.seed, temperature=args.temperature, ignore_eos=args.ignore_eos,
        return_token_ids=args.return_token_ids, slo={**parse_slo(args.slo), **parse_goodput(args.goodput)},
        timeout_s=args.timeout, api_key=api_key, tokenizer=args.tokenizer,
        percentile_metrics=args.percentile_metrics, metric_percentiles=args.metric_percentiles)
    if note:
        print(f"labkit bench serve: {note}", file=sys.stderr)
    try:
        result = benchmark(config)
    except ServerError as exc:
        print(f"labkit bench serve: {exc}", file=sys.stderr)
        return 1
    path = save_result(result, result_file)
    print(format_table(result), file=sys.stderr)
    print(f"labkit bench serve: wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_jsonable(result), allow_nan=False))
    return 0 if result["metrics"]["num_completed"] else 1


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second or inf, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a rate > 0 or inf, got {text!r}")
    return value


def _endpoint(text: str) -> str:
    """chat or completions, or vLLM's spelling: the path."""
    return {path: name for name, path in ENDPOINTS.items()}.get(text.rstrip("/"), text)


def _names(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected percentiles like 50,90,99, got {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `labkit bench serve` on the `labkit bench` subparsers."""
    from labkit.cli.arguments import (add_server_options, non_negative_float, non_negative_int, positive_float,
                                  positive_int)

    parser = subparsers.add_parser(
        "serve", help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, throughput, goodput)",
        description="Send a seeded workload of random-word prompts to an OpenAI-compatible server (labkit\n"
                    "serve, vLLM, TGI, llama.cpp) and measure it as vLLM's benchmark_serving does. Writes one\n"
                    "JSON result (docs/bench_serve_schema.md; it also carries vLLM's result keys) and a row in\n"
                    "the results store. The table goes to stderr; --json prints the result to stdout.\n"
                    "vLLM's `vllm bench serve` flag names work too (--random-input-len, --goodput, ...).\n"
                    "A key in $LABKIT_API_KEY or $OPENAI_API_KEY is sent only to a loopback address\n"
                    "(127.0.0.1, ::1, localhost) unless --use-env-key; --api-key is always sent.",
        epilog="examples:\n"
               "  labkit bench serve --num-prompts 20 --request-rate 2 --slo ttft_ms=500,tpot_ms=100\n"
               "  labkit bench serve --base-url http://127.0.0.1:8001 --endpoint chat --max-concurrency 4 --json\n"
               "  labkit bench serve --no-ignore-eos --no-return-token-ids   # a server without vLLM's extensions\n"
               "  labkit bench serve --dataset-name random --random-input-len 128 --random-output-len 32 \\\n"
               "      --goodput ttft:500 tpot:50 --metric-percentiles 50,90,99 --result-dir results --save-result",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_options(parser)
    parser.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (overrides --host/--port)")
    parser.add_argument("--endpoint", type=_endpoint, choices=tuple(ENDPOINTS), default="completions",
                        help="which API to load: completions or chat, or vLLM's /v1/completions or "
                             "/v1/chat/completions (default: %(default)s)")
    parser.add_argument("--dataset-name", choices=("random",), default="random",
                        help="vLLM's workload name: random (random-word prompts) is the one supported")
    parser.add_argument("--num-prompts", type=positive_int, default=50, help="timed requests (default: %(default)s)")
    parser.add_argument("--input-len", "--random-input-len", dest="input_len", type=positive_int, default=64,
                        help="words per prompt, about one token each (default: %(default)s)")
    parser.add_argument("--output-len", "--random-output-len", dest="output_len", type=positive_int, default=32,
                        help="max_tokens per request (default: %(default)s)")
    parser.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=non_negative_float,
                        default=0.0, help="lengths uniform in len*(1±r), r in [0, 1) (default: %(default)s)")
    parser.add_argument("--request-rate", type=_rate, default=math.inf,
                        help="requests per second, or inf to send all at once (default: %(default)s)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of inter-arrival times: 1 is Poisson, < 1 burstier (default: %(default)s)")
    parser.add_argument("--max-concurrency", type=positive_int, default=None,
                        help="cap on requests in flight (default: no cap)")
    parser.add_argument("--num-warmups", type=non_negative_int, default=1,
                        help="untimed requests first (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and arrivals (default: %(default)s)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="(default: %(default)s)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="send vLLM's ignore_eos so outputs have exactly --output-len tokens (default: on)")
    parser.add_argument("--return-token-ids", action=argparse.BooleanOptionalAction, default=True,
                        help="ask for vLLM's per-chunk token_ids so ITL splits multi-token chunks exactly; "
                             "without them the usage total is shared among chunks (default: on)")
    parser.add_argument("--slo", default=None, metavar="KEY=MS,...",
                        help=f"goodput targets among {', '.join(SLO_KEYS)}, e.g. ttft_ms=500,tpot_ms=50")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help="vLLM's spelling of --slo: ttft:500 tpot:50 e2el:2000")
    parser.add_argument("--percentile-metrics", type=_names, default=("ttft", "tpot", "itl"), metavar="NAMES",
                        help=f"metrics whose vLLM keys go into the result, among {','.join(METRICS)} "
                             "(default: ttft,tpot,itl)")
    parser.add_argument("--metric-percentiles", type=_percentiles, default=(99.0,), metavar="PERCENTILES",
                        help="percentiles of those metrics, e.g. 50,90,99 (default: 99; the lab's own metrics "
                             "always have p90 and p99)")
    parser.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                        help="counts tokens when the server sends no usage (llama.cpp): an HF id or a local "
                             "directory (default: the embedded model's tokenizer)")
    parser.add_argument("--timeout", type=positive_float, default=300.0, metavar="SECONDS",
                        help="per-request timeout (default: %(default)s)")
    add_api_key_options(parser)
    parser.add_argument("--result-file", type=Path, default=None,
                        help="where the JSON goes (default: data/bench_serve/bench_serve_<UTC>.json)")
    parser.add_argument("--result-dir", type=Path, default=None,
                        help="vLLM's spelling: the folder for the JSON (default: data/bench_serve)")
    parser.add_argument("--result-filename", default=None,
                        help="vLLM's spelling: the JSON's file name in --result-dir (default: bench_serve_<UTC>.json)")
    parser.add_argument("--save-result", action="store_true",
                        help="accepted for vLLM's command lines: the result is always saved")
    parser.add_argument("--json", action="store_true", help="print the result JSON to stdout")
    parser.set_defaults(func=cmd_bench_serve)
    return parser


__all__ = ["BenchServeConfig", "PromptSpec", "RequestOutcome", "RequestTiming", "parse_slo", "parse_goodput",
           "percentile_key", "replica_load", "make_prompts", "arrival_offsets", "tokens_per_chunk", "request_timing",
           "compute_metrics", "request_body", "send_request", "count_tokens", "settle", "load_tokenizer",
           "run_benchmark", "benchmark", "vllm_keys", "format_table", "default_result_name", "save_result",
           "cmd_bench_serve", "add_parser"]
