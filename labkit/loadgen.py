"""`labkit bench serve`: a load generator for any OpenAI-compatible server (labkit serve, vLLM, TGI, llama.cpp).

Metrics follow vLLM's `benchmark_serving.py`: TTFT (request sent -> first token), TPOT ((E2E - TTFT) / (output
tokens - 1)), ITL (the gaps between token arrivals; a chunk that brings k tokens after a gap g counts as k gaps
of g/k), E2E latency, request and token throughput, and goodput (requests per second that meet every SLO).
Token counts come from the server's `usage`, never from re-tokenizing. Arrivals are Poisson (burstiness 1) or
gamma-distributed; there are no client retries, so every failure is counted once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from labkit.bench import percentile
from labkit.protocol import DONE, ENDPOINTS, ServerError, auth_headers, chunk_text, error_message, parse_sse_line
from labkit.workloads import PromptSpec, arrival_offsets, make_prompts

SCHEMA = "labkit.bench_serve/1"
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")
METRICS = ("ttft", "tpot", "itl", "e2el")  # each reported as mean/median/std/p90/p99 in ms


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

    def __post_init__(self):
        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
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


def _stats(name: str, values_s: Sequence[float]) -> dict:
    values = [v * 1e3 for v in values_s]
    if not values:
        return {f"{stat}_{name}_ms": None for stat in ("mean", "median", "std", "p90", "p99")}
    return {f"mean_{name}_ms": statistics.fmean(values), f"median_{name}_ms": statistics.median(values),
            f"std_{name}_ms": statistics.pstdev(values), f"p90_{name}_ms": percentile(values, 90),
            f"p99_{name}_ms": percentile(values, 99)}


def compute_metrics(outcomes: Sequence["RequestOutcome"], duration_s: float, slo: dict | None = None) -> dict:
    """The flat metrics of a run: counts, throughputs, goodput, and mean/median/std/p90/p99 of each latency."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
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
    metrics.update(_stats("ttft", [t.ttft_s for t in timings]))
    metrics.update(_stats("tpot", [t.tpot_s for t in timings if t.tpot_s is not None]))
    metrics.update(_stats("itl", [x for t in timings for x in t.itl_s]))
    metrics.update(_stats("e2el", [t.e2el_s for t in timings]))
    return metrics


# -- sending requests ----------------------------------------------------------------------------------------
@dataclass
class RequestOutcome:
    """What one request brought back; times are perf_counter seconds."""

    index: int
    success: bool
    error: str | None = None
    start_s: float = 0.0
    end_s: float = 0.0
    input_tokens: int = 0  # usage.prompt_tokens
    output_tokens: int = 0  # usage.completion_tokens
    expected_output_tokens: int = 0
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int | None] = field(default_factory=list)
    timing: RequestTiming | None = None

    def to_dict(self, origin_s: float) -> dict:
        """A JSON row: times in ms, from `origin_s` (the run's start) for the send time."""
        row = {"index": self.index, "success": self.success, "error": self.error,
               "sent_at_ms": (self.start_s - origin_s) * 1e3, "input_tokens": self.input_tokens,
               "output_tokens": self.output_tokens, "expected_output_tokens": self.expected_output_tokens,
               "num_chunks": len(self.chunk_times_s)}
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
    """POST one streaming request and record when each content chunk arrived; never raises, never retries."""
    import httpx

    is_chat = "messages" in body
    out = RequestOutcome(index=index, success=False, expected_output_tokens=body.get("max_tokens", 0))
    usage, got_done = None, False
    out.start_s = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                out.error = error_message(response.status_code, await response.aread())
                out.end_s = time.perf_counter()
                return out
            async for line in response.aiter_lines():
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event is DONE:
                    got_done = True
                    break
                now = time.perf_counter()
                if not isinstance(event, dict):
                    out.error = f"the server sent an event that is not a JSON object: {str(event)[:100]}"
                    break
                if "error" in event:
                    error = event["error"]
                    out.error = f"stream error: {error.get('message') if isinstance(error, dict) else error}"
                    break
                text, token_ids, _ = chunk_text(event, is_chat)
                if text or token_ids:
                    out.chunk_times_s.append(now)
                    out.chunk_tokens.append(len(token_ids) if token_ids is not None else None)
                usage = event.get("usage") or usage
    except (httpx.HTTPError, ServerError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.end_s = time.perf_counter()
    if out.error is None:
        if not got_done:
            out.error = "the stream ended without data: [DONE]"
        elif not usage or usage.get("completion_tokens") is None:
            out.error = "no usage in the stream: the server ignores stream_options.include_usage"
        elif not out.chunk_times_s:
            out.error = "the stream brought no text"
    if out.error is None:
        out.input_tokens = int(usage.get("prompt_tokens") or 0)
        out.output_tokens = int(usage["completion_tokens"])
        try:
            out.timing = request_timing(out.start_s, out.chunk_times_s, out.chunk_tokens, out.end_s,
                                        out.output_tokens)
            out.success = True
        except ValueError as exc:
            out.error = str(exc)
    return out


async def run_benchmark(config: BenchServeConfig, prompts: Sequence[PromptSpec] | None = None) -> dict:
    """Warm up, send the workload on its arrival schedule, and return the result document (see the schema doc)."""
    import httpx

    prompts = list(prompts) if prompts is not None else make_prompts(
        config.num_prompts, config.input_len, config.output_len, config.range_ratio, config.seed)
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
            if not warm.success:
                raise ServerError(f"warm-up request failed: {warm.error}")

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
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    from labkit.device import describe_environment

    return {
        "schema": SCHEMA,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "config": config.to_dict(),
        "server": {"base_url": config.base_url, "endpoint_url": url, "model": model, "models": models},
        "env": describe_environment(),  # the client's machine; the server is only named above
        "metrics": compute_metrics(outcomes, duration, config.slo),
        "errors": errors,
        "requests": [o.to_dict(origin) for o in outcomes],
    }


async def _list_models(client, base_url: str, headers: dict) -> list[str]:
    import httpx

    try:
        response = await client.get(f"{base_url}/v1/models", headers=headers)
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach {base_url}: {exc}") from None
    if response.status_code != 200:
        raise ServerError(f"{base_url}/v1/models: {error_message(response.status_code, response.content)}")
    return [m.get("id") for m in response.json().get("data") or []]


def benchmark(config: BenchServeConfig, prompts: Sequence[PromptSpec] | None = None) -> dict:
    """`run_benchmark` from synchronous code (a notebook cell with a running loop should await it instead)."""
    return asyncio.run(run_benchmark(config, prompts))


# -- reporting -----------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """vLLM-style text summary of a result document."""
    m, c = result["metrics"], result["config"]

    def fmt(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    rate = "inf" if c["request_rate"] is None else c["request_rate"]
    lines = [f"{' Serving benchmark ':=^56}",
             f"{'Model / endpoint:':<40}{result['server']['model']} {c['endpoint']}",
             f"{'Request rate / burstiness:':<40}{rate} / {c['burstiness']}",
             f"{'Max concurrency:':<40}{c['max_concurrency'] or 'none'}",
             f"{'Successful / failed requests:':<40}{m['num_completed']} / {m['num_failed']}",
             f"{'Duration (s):':<40}{fmt(m['duration_s'])}",
             f"{'Total input / output tokens:':<40}{m['total_input_tokens']} / {m['total_output_tokens']}",
             f"{'Request throughput (req/s):':<40}{fmt(m['request_throughput_req_per_s'])}",
             f"{'Output token throughput (tok/s):':<40}{fmt(m['output_throughput_tokens_per_s'])}",
             f"{'Total token throughput (tok/s):':<40}{fmt(m['total_token_throughput_tokens_per_s'])}"]
    if m["request_goodput_req_per_s"] is not None:
        lines.append(f"{'Goodput (req/s):':<40}{fmt(m['request_goodput_req_per_s'])}")
    titles = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
              "itl": "Inter-token latency", "e2el": "End-to-end latency"}
    for name in METRICS:
        lines.append(f"{' ' + titles[name] + ' ':-^56}")
        for stat in ("mean", "median", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms):':<40}{fmt(m[f'{stat}_{name}_ms'])}")
    lines.append("=" * 56)
    for error, count in result["errors"].items():
        lines.append(f"{count} × {error}")
    return "\n".join(lines)


def save_result(result: dict, result_file: str | Path | None = None) -> Path:
    """Write the result document atomically and append its row (with the environment stamp) to the results."""
    from labkit import results

    if result_file is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        result_file = results.data_dir() / "bench_serve" / f"bench_serve_{stamp}.json"
    path = results.write_json_atomic(result_file, result)
    params = {**result["config"], "model": result["server"]["model"], "result_file": str(path)}
    results.append_rows(results.make_row("bench_serve", params, result["metrics"], env=result["env"]))
    return path


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from labkit.results import to_jsonable

    base_url = args.base_url or f"http://{args.host}:{args.port}"
    config = BenchServeConfig(
        base_url=base_url, model=args.model, endpoint=args.endpoint, num_prompts=args.num_prompts,
        input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
        request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups, seed=args.seed, temperature=args.temperature, ignore_eos=args.ignore_eos,
        return_token_ids=args.return_token_ids, slo=parse_slo(args.slo), timeout_s=args.timeout,
        api_key=args.api_key or os.environ.get("LABKIT_API_KEY") or os.environ.get("OPENAI_API_KEY") or None)
    try:
        result = benchmark(config)
    except ServerError as exc:
        print(f"labkit bench serve: {exc}", file=sys.stderr)
        return 1
    path = save_result(result, args.result_file)
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


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `labkit bench serve` on the `labkit bench` subparsers."""
    from labkit.arguments import add_server_options, non_negative_float, non_negative_int, positive_int

    parser = subparsers.add_parser(
        "serve", help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, throughput, goodput)",
        description="Send a seeded workload of random-word prompts to an OpenAI-compatible server (labkit\n"
                    "serve, vLLM, TGI, llama.cpp) and measure it as vLLM's benchmark_serving does. Writes one\n"
                    "JSON result (docs/bench_serve_schema.md) and a row in the results store. The table goes\n"
                    "to stderr; --json prints the result to stdout.",
        epilog="examples:\n"
               "  labkit bench serve --num-prompts 20 --request-rate 2 --slo ttft_ms=500,tpot_ms=100\n"
               "  labkit bench serve --base-url http://127.0.0.1:8001 --endpoint chat --max-concurrency 4 --json\n"
               "  labkit bench serve --no-ignore-eos --no-return-token-ids   # a server without vLLM's extensions",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_options(parser)
    parser.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (overrides --host/--port)")
    parser.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions",
                        help="which API to load (default: %(default)s)")
    parser.add_argument("--num-prompts", type=positive_int, default=50, help="timed requests (default: %(default)s)")
    parser.add_argument("--input-len", type=positive_int, default=64,
                        help="words per prompt, about one token each (default: %(default)s)")
    parser.add_argument("--output-len", type=positive_int, default=32,
                        help="max_tokens per request (default: %(default)s)")
    parser.add_argument("--range-ratio", type=non_negative_float, default=0.0,
                        help="lengths uniform in len*(1±r), r in [0, 1) (default: %(default)s)")
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
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="per-request timeout (default: %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help="bearer key (default: $LABKIT_API_KEY, then $OPENAI_API_KEY, else none)")
    parser.add_argument("--result-file", type=Path, default=None,
                        help="where the JSON goes (default: data/bench_serve/bench_serve_<UTC>.json)")
    parser.add_argument("--json", action="store_true", help="print the result JSON to stdout")
    parser.set_defaults(func=cmd_bench_serve)
    return parser


__all__ = ["BenchServeConfig", "PromptSpec", "RequestOutcome", "RequestTiming", "parse_slo", "make_prompts",
           "arrival_offsets", "tokens_per_chunk", "request_timing", "compute_metrics", "request_body",
           "send_request", "run_benchmark", "benchmark", "format_table", "save_result", "cmd_bench_serve",
           "add_parser"]
