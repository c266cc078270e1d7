"""A load generator for any OpenAI-compatible server (labkit serve, vLLM, TGI, llama.cpp): `labkit bench serve`.

Metrics follow vLLM's `benchmark_serving.py` (the arithmetic is `labkit.serving.load_metrics`): TTFT, TPOT,
ITL, E2E latency, request and token throughput, and goodput. `measure_replicas` runs the same load through
the router to one replica and to several. Token counts come from the server's `usage`; a server that sends
none (llama.cpp's) has its output re-tokenized after the run, as vLLM's benchmark does, and the result says
which way each request was counted. Arrivals are Poisson (burstiness 1) or gamma-distributed; there are no
client retries, so every failure is counted once, and a malformed reply fails its request, not the run.
vLLM's result keys are written too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import secrets
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from labkit.checks import check_choice, check_int, check_optional_int
from labkit.serving.addresses import auth_headers
from labkit.serving.client import transport_error
from labkit.serving.events import DONE, aread_events, chunk_text, stream_usage
from labkit.serving.load_metrics import (METRICS, RequestOutcome, compute_metrics, percentile_key, replica_load,
                                         request_timing)
from labkit.serving.protocol import ENDPOINTS, REPLICA_HEADER, ServerError, error_message, model_ids
from labkit.serving.workloads import PromptSpec, arrival_offsets, make_prompts

SCHEMA = "labkit.bench_serve/1"
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


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
    prompt_salt: str | None = None  # draws each prompt's first words (see salt_prompts); None: a fresh one per run
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
        check_choice("endpoint", self.endpoint, ENDPOINTS)
        for name in ("num_prompts", "input_len", "output_len"):
            check_int(name, getattr(self, name))
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (or inf), got {self.request_rate!r}")
        if not 0 < self.burstiness < math.inf:
            raise ValueError(f"burstiness must be a finite number > 0, got {self.burstiness!r}")
        check_optional_int("max_concurrency", self.max_concurrency)
        check_int("num_warmups", self.num_warmups, minimum=0)
        if self.prompt_salt is not None and not (isinstance(self.prompt_salt, str) and self.prompt_salt):
            raise ValueError(f"prompt_salt must be a non-empty string or None, got {self.prompt_salt!r}")
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


# -- prompts -------------------------------------------------------------------------------------------------
SALT_WORDS = 3  # leading words drawn per run: 1 in ~250**3 that two runs' prompts start alike


def salt_prompts(specs: Sequence[PromptSpec], salt: str, kind: str = "timed") -> list[PromptSpec]:
    """The prompts with their first SALT_WORDS words drawn from (salt, kind, index), the rest kept.

    A prefix cache hashes a prompt's blocks from its first token on, so a prompt whose first words are new finds
    nothing cached. Lengths, arrivals and all later words still come from the seed; a fresh salt per run means
    the same --seed run twice against one server (or warm-ups, `kind` "warmup", before the timed prompts) never
    sends a prompt that server has cached, and the salt in the result replays a run word for word.
    """
    import random

    from labkit.serving.workloads import WORDS

    salted = []
    for spec in specs:
        rng = random.Random(f"{salt}-{kind}-{spec.index}")
        words = spec.prompt.split(" ")
        n = min(SALT_WORDS, len(words))
        words[:n] = [rng.choice(WORDS) for _ in range(n)]
        salted.append(dataclasses.replace(spec, prompt=" ".join(words)))
    return salted


# -- sending requests ----------------------------------------------------------------------------------------
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
            async with aclosing(aread_events(response.aiter_bytes())) as events:
                async for event in events:
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


async def _send_on_schedule(client, url: str, headers: dict, config: BenchServeConfig, model: str,
                            prompts: Sequence[PromptSpec]) -> tuple[list[RequestOutcome], float]:
    """Send the timed prompts at their arrival offsets (at most max_concurrency in flight): (outcomes, start)."""
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
    return list(await asyncio.gather(*tasks)), origin


async def run_benchmark(config: BenchServeConfig, prompts: Sequence[PromptSpec] | None = None,
                        tokenizer=None) -> dict:
    """Warm up, send the workload on its arrival schedule, and return the result document (see the schema doc).

    `tokenizer` counts tokens for a server that sends no usage (default: `load_tokenizer(config.tokenizer)`,
    loaded only when needed, and up front when config.tokenizer names one, so a bad name fails before the work).
    """
    import httpx

    salt, prompts_given = config.prompt_salt or secrets.token_hex(4), prompts
    prompts = list(prompts) if prompts is not None else salt_prompts(make_prompts(
        config.num_prompts, config.input_len, config.output_len, config.range_ratio, config.seed), salt)
    get_tokenizer = functools.cache(lambda: load_tokenizer(config.tokenizer) if tokenizer is None else tokenizer)
    if config.tokenizer is not None:
        get_tokenizer()
    headers = auth_headers(config.api_key)
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    timeout = httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s))
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        models, cards = await _list_models(client, config.base_url, headers)
        model = config.model or (models[0] if models else None)
        if model is None:
            raise ServerError(f"{config.base_url}/v1/models lists no model: pass --model")
        prefix_caching = await _prefix_caching(client, config.base_url, headers, cards.get(model))
        url = config.base_url + ENDPOINTS[config.endpoint]
        # warm-up prompts of the same shape but other words, so a prefix cache cannot favour the timed ones
        warmups = salt_prompts(make_prompts(config.num_warmups, config.input_len, config.output_len,
                                            config.range_ratio, seed=f"warmup-{config.seed}"), salt, "warmup")
        for spec in warmups:
            warm = await send_request(client, url, request_body(config, model, spec), headers)
            if not settle(warm, spec.prompt, get_tokenizer).success:
                raise ServerError(f"warm-up request to {url} failed: {warm.error}")

        outcomes, origin = await _send_on_schedule(client, url, headers, config, model, prompts)
        duration = max(o.end_s for o in outcomes) - origin
    outcomes = [settle(o, spec.prompt, get_tokenizer) for o, spec in zip(outcomes, prompts)]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    from labkit.device import describe_environment
    from labkit.model.loader import EMBEDDED_MODEL

    metrics = compute_metrics(outcomes, duration, config.slo, config.metric_percentiles)
    replicas = replica_load(outcomes, duration)
    if replicas:
        metrics["num_replicas"] = len(replicas)
    now = datetime.now(timezone.utc)
    tokenizer_id = config.tokenizer or getattr(tokenizer, "name_or_path", None) or EMBEDDED_MODEL
    return {
        "schema": SCHEMA,
        "timestamp": now.isoformat(timespec="milliseconds"),
        "config": {**config.to_dict(), "prompt_salt": salt if prompts_given is None else None},
        "server": {"base_url": config.base_url, "endpoint_url": url, "model": model, "models": models,
                   "prefix_caching": prefix_caching},  # None: the server does not say
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


async def _list_models(client, base_url: str, headers: dict) -> tuple[list[str], dict[str, dict]]:
    """The server's model ids and their cards, by id."""
    import httpx

    url = f"{base_url}/v1/models"
    try:
        response = await client.get(url, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise transport_error(url, exc) from None
    ids = model_ids(url, response.status_code, response.content)
    return ids, {card["id"]: card for card in (response.json().get("data") or [])} if ids else {}


async def _prefix_caching(client, base_url: str, headers: dict, card: dict | None) -> bool | None:
    """Whether the server's prefix cache is on, as its model card or its /metrics page says; None if neither does."""
    import httpx

    from labkit.serving.server_info import prefix_caching_in_card, prefix_caching_in_metrics

    found = prefix_caching_in_card(card)
    if found is not None:
        return found
    try:
        response = await client.get(f"{base_url}/metrics", headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL):
        return None
    return prefix_caching_in_metrics(response.text) if response.status_code == 200 else None


def benchmark(config: BenchServeConfig, prompts: Sequence[PromptSpec] | None = None, tokenizer=None) -> dict:
    """`run_benchmark` from synchronous code; where this thread already runs an event loop (a notebook cell), on a
    thread of its own, since a second loop cannot run in this one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop here: the usual case
        return asyncio.run(run_benchmark(config, prompts, tokenizer))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(benchmark, config, prompts, tokenizer).result()


# -- data-parallel replicas ---------------------------------------------------------------------------------
def measure_replicas(serve_args: Sequence[str], num_replicas: int, bench_config, policy: str = "least_outstanding",
                     threads_per_replica: int | None = None) -> dict:
    """The same `labkit bench serve` load through the router to one replica, then to num_replicas replicas, each
    with the same cores (on one CPU, a core's share each: one device per replica, as on GPUs):
    {"one": result, "replicas": result}. The second run draws its prompts with seed + 1 (same lengths, other
    words), so the first replica's prefix cache holds none of them."""
    import dataclasses

    from labkit.serving.replicas import ReplicaSet
    from labkit.serving.router import Router, RouterConfig
    from labkit.serving.router_app import create_router_app
    from labkit.serving.server import ServerThread

    def bench(urls: list[str], seed: int = bench_config.seed) -> dict:
        with ServerThread(create_router_app(Router(urls, RouterConfig(policy=policy)))) as front:
            return benchmark(dataclasses.replace(bench_config, base_url=front.url, seed=seed))

    with ReplicaSet(num_replicas, serve_args, threads_per_replica=threads_per_replica) as urls:
        one = bench(urls[:1])
        # other prompts (seed + 1) for the second run: its first replica served the first run, and its prefix
        # cache would answer the same prompts again, so "replicas" would time that cache and not the work
        return {"one": one, "replicas": bench(urls, seed=bench_config.seed + 1)}


# -- the result ---------------------------------------------------------------------------------------------
def default_result_name() -> str:
    return f"bench_serve_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}.json"


def save_result(result: dict, result_file: str | Path | None = None) -> Path:
    """Write the result document atomically and append its row (with the environment stamp) to the results."""
    from labkit.lab import results

    if result_file is None:
        result_file = results.data_dir() / "bench_serve" / default_result_name()
    path = results.write_json_atomic(result_file, result)
    params = {**result["config"], "model": result["server"]["model"], "result_file": str(path),
              "prefix_caching": result["server"].get("prefix_caching"),
              "token_count_source": result["token_count_source"], "tokenizer": result["tokenizer_id"]}
    results.append_rows(results.make_row("bench_serve", params, result["metrics"], env=result["env"]))
    return path


__all__ = ["SCHEMA", "SLO_KEYS", "SALT_WORDS", "BenchServeConfig", "PromptSpec", "parse_slo", "parse_goodput",
           "make_prompts", "salt_prompts",
           "arrival_offsets", "request_body", "send_request", "count_tokens", "settle", "load_tokenizer",
           "run_benchmark", "benchmark", "vllm_keys", "measure_replicas", "default_result_name", "save_result"]
