"""Sequential HF generate, static, dynamic and continuous batching on one trace.

Every policy serves the same trace (`labkit.serving.workloads`) with the same model weights: "hf-sequential" runs HF
`generate` on one request at a time in arrival order; "static", "dynamic" and "continuous" replay the trace
against a labkit Engine with that scheduling policy (`labkit.engine.scheduler`) and one batch limit for all three,
over one shared compact model. The driver adds each request when its arrival time comes (offline: all at
t=0), steps the engine in between and sleeps while it is idle; it records when every token arrived, so TTFT,
TPOT, ITL, E2E and throughput come from `loadgen.compute_metrics`, the arithmetic of `bench serve`, with
latencies counted from each request's arrival. Greedy outputs must be token-identical across policies (HF
up to the first EOS, see `token_mismatches`): the run fails loudly when they are not. `--server` sends the
same requests through `labkit serve` in-process instead: one at a time, then all at once. The command is
`labkit bench batching` (`labkit.cli.bench_batching`).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from labkit.bench.hf import HFEngine
from labkit.engine import Engine, EngineConfig, SchedulerConfig
from labkit.model.llama import Transformer, from_hf
from labkit.model.rewrites import apply_rewrites
from labkit.serving.load_metrics import RequestOutcome, compute_metrics, request_timing
from labkit.serving.loadgen import BenchServeConfig, benchmark
from labkit.model.loader import LoadedModel
from labkit.model.sampling import SamplingParams
from labkit.serving.workloads import LengthDist, Trace, TraceConfig, make_trace

SCHEMA = "labkit.bench.batching/1"
POLICIES = ("hf-sequential", "static", "dynamic", "continuous")
ENGINE_POLICIES = POLICIES[1:]
# The default trace: offline, output lengths lognormal with sigma 2 (median 4 tokens, mean 17 after the clip at
# 128), so nearly every static batch waits on a straggler; 384 requests make 6 static batches of 64, so the
# continuous run's own tail (its last long requests, alone at the end: a fixed cost of a finite offline trace)
# is a minority of its time. On 2 CPU cores the whole run takes about 8 minutes, HF generate 4 of them.
DEFAULT_TRACE = TraceConfig(num_requests=384, prompt_len=LengthDist("fixed", 16),
                            output_len=LengthDist("lognormal", 32, 2.0, max_len=128))
# 64 rows: on 2 cores a decode step of 64 rows still yields ~1.4x the tokens/s of 32 rows (fp32 SmolLM2-135M)
DEFAULT_ENGINE = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512))
NUM_WARMUPS = 2  # untimed requests on each engine first (allocator, kernels), with other words than the trace's
MAX_IDLE_SLEEP_S = 0.002  # while a dynamic batcher waits for a fuller batch, poll this often
DTYPE = "fp32"  # the HF baseline's dtype too: greedy tokens can then be checked against it


@dataclass
class RequestRecord:
    """What the driver saw of one request; times are perf_counter seconds."""

    index: int
    arrival_s: float  # when it arrived: the run's origin + the trace's arrival time
    expected_output_tokens: int
    added_s: float | None = None  # when the driver handed it to the engine
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    token_ids: list[int] = field(default_factory=list)
    chunk_times_s: list[float] = field(default_factory=list)  # when each step brought it tokens
    chunk_tokens: list[int] = field(default_factory=list)  # how many
    end_s: float | None = None
    finish_reason: str | None = None

    def add(self, token_ids: Sequence[int], now_s: float) -> None:
        if token_ids:
            self.token_ids.extend(token_ids)
            self.chunk_times_s.append(now_s)
            self.chunk_tokens.append(len(token_ids))

    def outcome(self) -> RequestOutcome:
        """As `bench serve` would have seen it: sent at its arrival, one chunk per step that brought tokens."""
        out = RequestOutcome(self.index, success=False, start_s=self.arrival_s, end_s=self.end_s or math.nan,
                             input_tokens=self.num_prompt_tokens, output_tokens=len(self.token_ids),
                             expected_output_tokens=self.expected_output_tokens,
                             chunk_times_s=self.chunk_times_s, chunk_tokens=list(self.chunk_tokens))
        if self.end_s is None or not self.token_ids:
            out.error = "unfinished" if self.end_s is None else "no tokens"
            return out
        out.timing = request_timing(self.arrival_s, self.chunk_times_s, self.chunk_tokens, self.end_s,
                                    len(self.token_ids))
        out.success = True
        return out


@dataclass
class PolicyRun:
    """One policy's replay of a trace: per-request records, per-step engine samples, engine counters."""

    policy: str
    origin_s: float  # perf_counter at t=0 of the trace
    records: list[RequestRecord]
    steps: list[dict] = field(default_factory=list)  # one sample after each engine step (see `replay`)
    num_preemptions: int | None = None
    num_kv_blocks: int | None = None

    @property
    def duration_s(self) -> float:
        return max(r.end_s for r in self.records if r.end_s is not None) - self.origin_s

    def outcomes(self) -> list[RequestOutcome]:
        return [r.outcome() for r in self.records]

    def metrics(self, slo: dict | None = None) -> dict:
        """`bench serve`'s metrics plus the engine's: steps, mean requests per step, the share of rows that were
        padding, peak KV blocks, prefix hits."""
        m = compute_metrics(self.outcomes(), self.duration_s, slo)
        prompt_tokens = sum(r.num_prompt_tokens for r in self.records)
        m["output_tokens_per_s"] = m["output_throughput_tokens_per_s"]
        m["num_steps"] = len(self.steps) if self.num_kv_blocks is not None else None
        rows = sum(s["num_rows"] for s in self.steps)
        padding = sum(s["num_padding_rows"] for s in self.steps)
        # requests computed per step; padding rows (a padded static batch's finished rows) are not requests
        m["mean_batch_size"] = (rows - padding) / len(self.steps) if self.steps else None
        m["padding_row_fraction"] = padding / rows if rows else None
        m["num_preemptions"] = self.num_preemptions
        m["num_kv_blocks"] = self.num_kv_blocks
        m["peak_kv_blocks"] = max((s["num_used_blocks"] for s in self.steps), default=None)
        m["prefix_hit_rate"] = (sum(r.num_cached_tokens for r in self.records) / prompt_tokens
                                if self.num_kv_blocks is not None and prompt_tokens else None)
        return m

    def steps_frame(self):
        """The per-step samples as a pandas DataFrame (time, rows, new tokens, blocks used, ...)."""
        import pandas as pd

        return pd.DataFrame(self.steps)


def _params(output_len: int) -> SamplingParams:
    # greedy, exactly output_len tokens: every policy must produce the same tokens
    return SamplingParams(max_new_tokens=output_len, ignore_eos=True, detokenize=False)


def _check_trace(trace: Trace) -> None:
    if not trace.has_token_ids:
        raise ValueError("this benchmark needs a trace with token ids: build or load it with a tokenizer")


def replay(engine: Engine, trace: Trace, on_tokens: Callable[[int], object] | None = None) -> PolicyRun:
    """Replay a trace against an engine: each request joins when its arrival time comes, the engine steps in
    between, and the driver sleeps until the next arrival while the engine is idle.

    After each step that ran, a sample records t_s (from the origin), step_ms, num_rows, num_new_tokens,
    num_running, num_waiting, num_used_blocks and num_tokens_in_cache. `on_tokens(n)` hears of new tokens.
    """
    _check_trace(trace)
    if engine.has_unfinished:
        raise ValueError("the engine is busy: replay needs an idle engine")
    before = engine.stats()
    num_steps = before.num_steps
    pending = deque(trace.requests)
    records: dict[str, RequestRecord] = {}
    steps: list[dict] = []
    origin = time.perf_counter()
    while pending or engine.has_unfinished:
        now = time.perf_counter()
        while pending and origin + pending[0].arrival_s <= now:
            request = pending.popleft()
            record = RequestRecord(request.index, origin + request.arrival_s, request.output_len)
            # arrival_s in the scheduler's clock (perf_counter), so a dynamic batcher counts the real wait
            rid = engine.add_request(request.prompt_ids, _params(request.output_len), request_id=str(request.index),
                                     arrival_s=record.arrival_s)
            record.added_s = time.perf_counter()
            records[rid] = record
        if not engine.has_unfinished:
            time.sleep(max(0.0, origin + pending[0].arrival_s - time.perf_counter()))
            continue
        start = time.perf_counter()
        outputs = engine.step()
        now_after = time.perf_counter()
        stats = engine.stats()
        if stats.num_steps == num_steps:  # nothing ran: a dynamic batcher is waiting for a fuller batch
            time.sleep(MAX_IDLE_SLEEP_S)
            continue
        num_steps = stats.num_steps
        steps.append({"t_s": now_after - origin, "step_ms": (now_after - start) * 1e3,
                      "num_rows": stats.last_batch_size, "num_padding_rows": stats.last_num_padding_rows,
                      "num_new_tokens": stats.last_num_tokens,
                      "num_running": stats.num_running, "num_waiting": stats.num_waiting,
                      "num_used_blocks": stats.num_used_blocks, "num_tokens_in_cache": stats.num_tokens_in_cache})
        for out in outputs:
            record = records[out.request_id]
            record.num_prompt_tokens, record.num_cached_tokens = out.num_prompt_tokens, out.num_cached_tokens
            record.add(out.new_token_ids, now_after)
            if out.finished:
                record.end_s, record.finish_reason = now_after, out.finish_reason
            if on_tokens and out.new_token_ids:
                on_tokens(len(out.new_token_ids))
    after = engine.stats()
    return PolicyRun(engine.config.scheduler.policy, origin, sorted(records.values(), key=lambda r: r.index), steps,
                     num_preemptions=after.num_preemptions - before.num_preemptions,
                     num_kv_blocks=after.num_kv_blocks)


def replay_hf(hf: HFEngine, trace: Trace, on_tokens: Callable[[int], object] | None = None) -> PolicyRun:
    """The baseline: HF `generate` on one request at a time, in arrival order, each sent when it arrives."""
    _check_trace(trace)
    records = []
    origin = time.perf_counter()
    for request in trace.requests:
        record = RequestRecord(request.index, origin + request.arrival_s, request.output_len,
                               num_prompt_tokens=request.prompt_len)
        time.sleep(max(0.0, record.arrival_s - time.perf_counter()))
        record.added_s = start = time.perf_counter()
        generation = hf.generate([request.prompt_ids], _params(request.output_len))[0]
        record.end_s, record.finish_reason = time.perf_counter(), generation.finish_reason
        for token, t in zip(generation.tokens, generation.token_times_s):  # times are from the call's start
            record.add([token], start + t)
        records.append(record)
        if on_tokens:
            on_tokens(len(generation.tokens))
    return PolicyRun("hf-sequential", origin, records)


def _first_eos(token_ids: Sequence[int], eos_token_ids: Sequence[int]) -> int:
    return next((i for i, t in enumerate(token_ids) if t in eos_token_ids), len(token_ids))


def token_mismatches(runs: dict[str, PolicyRun], eos_token_ids: Sequence[int] = ()) -> list[str]:
    """One line per request whose greedy tokens differ between policies.

    The engine policies are compared token for token with the first of them. "hf-sequential" is compared with
    it up to the first EOS token of either: under ignore_eos, HF (through min_new_tokens) never emits EOS,
    while the labkit engine, like vLLM, emits it and goes on, so the two part there by design.
    """
    if not runs:
        return []
    ref_name = next((name for name in runs if name != "hf-sequential"), next(iter(runs)))
    ref = runs[ref_name]
    lines = []
    for name, run in runs.items():
        if name == ref_name:
            continue
        with_hf = "hf-sequential" in (name, ref_name)
        for a, b in zip(ref.records, run.records):
            end = min(_first_eos(a.token_ids, eos_token_ids), _first_eos(b.token_ids, eos_token_ids)) \
                if with_hf else None
            ours, theirs = a.token_ids[:end], b.token_ids[:end]
            if ours == theirs:
                continue
            at = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
            mine, ref_token = (ids[at] if at < len(ids) else "end" for ids in (theirs, ours))
            lines.append(f"request {a.index}: {name} differs from {ref_name} at output token {at} "
                         f"({mine} vs {ref_token}; {len(b.token_ids)} vs {len(a.token_ids)} tokens)")
    return lines


@dataclass
class BatchingResult:
    """The policies' runs on one trace, their result rows, and any token mismatches between them."""

    trace: Trace
    runs: dict[str, PolicyRun]
    rows: list[dict]
    mismatches: list[str]

    def check(self) -> None:
        """Raise AssertionError naming the requests whose greedy tokens differ between policies."""
        if self.mismatches:
            raise AssertionError("greedy tokens differ between policies:\n" + "\n".join(self.mismatches))

    def document(self) -> dict:
        """The JSON document of the run: rows, the trace, and per policy its step samples and requests."""
        return {"schema": SCHEMA, "rows": self.rows, "trace": self.trace.describe(), "mismatches": self.mismatches,
                "runs": {name: {"steps": run.steps, "requests": [o.to_dict(run.origin_s) for o in run.outcomes()]}
                         for name, run in self.runs.items()}}


def _progress_bar(policy: str, total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{policy:>13s}", unit="tok", file=sys.stderr, disable=not show,
                dynamic_ncols=True)


def _warmup_trace(trace: Trace, tokenizer) -> Trace:
    # other words than the trace's, so the prefix cache starts with nothing the timed requests could reuse
    config = TraceConfig(num_requests=NUM_WARMUPS, prompt_len=LengthDist("fixed", 16),
                         output_len=LengthDist("fixed", 4), seed=-1 - int(trace.source.get("seed") or 0))
    return make_trace(config, tokenizer)


def _engine(model, loaded: LoadedModel, config: EngineConfig, policy: str, eos_token_ids) -> Engine:
    return Engine(model, loaded.tokenizer, name=loaded.name, eos_token_ids=eos_token_ids,
                  config=replace(config, scheduler=replace(config.scheduler, policy=policy)))


def run_batching_bench(trace: Trace, loaded: LoadedModel, config: EngineConfig = DEFAULT_ENGINE,
                       policies: Sequence[str] = POLICIES, slo: dict | None = None, progress: bool = True,
                       env: dict | None = None, model: Transformer | None = None) -> BatchingResult:
    """Serve one trace with each policy in turn (one shared model, a fresh engine per policy, warm-up
    excluded) and build the result rows: metrics, speedups over static and HF measured in this run.

    `model`: the compact model of `loaded` the engines serve, when the caller has built it already (building
    it rewrites every layer: seconds for the embedded model); by default it is built here."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ValueError(f"unknown policy {unknown[0] if unknown else ''!r}: choose among {', '.join(POLICIES)}")
    if len(set(policies)) != len(policies):
        raise ValueError(f"each policy once, please: got {', '.join(policies)}")
    _check_trace(trace)
    hf = HFEngine(loaded.model, loaded.tokenizer, name=loaded.name)
    if model is None and set(policies) & set(ENGINE_POLICIES):
        model = apply_rewrites(from_hf(loaded.model))
    warmup = _warmup_trace(trace, loaded.tokenizer)
    total = sum(r.output_len for r in trace)
    runs: dict[str, PolicyRun] = {}
    for policy in policies:
        if policy == "hf-sequential":
            replay_hf(hf, warmup)
            with _progress_bar(policy, total, progress) as bar:
                runs[policy] = replay_hf(hf, trace, bar.update)
            continue
        engine = _engine(model, loaded, config, policy, hf.eos_token_ids)
        replay(engine, warmup)
        with _progress_bar(policy, total, progress) as bar:
            runs[policy] = replay(engine, trace, bar.update)
        del engine  # its KV cache goes before the next one is allocated
    mismatches = token_mismatches(runs, hf.eos_token_ids)
    rows = make_rows(runs, trace, config, loaded, slo, env, tokens_identical=not mismatches)
    return BatchingResult(trace, runs, rows, mismatches)


def measures_prefix_cache(trace: Trace, prefix_caching: bool | None) -> bool:
    """Whether a run of this trace measures the prefix cache on purpose: caching on, and prompts that start with
    one of the trace's shared prefixes (`--num-prefixes`), which later requests find cached."""
    return bool(prefix_caching) and any(r.prefix_index is not None for r in trace.requests)


def make_rows(runs: dict[str, PolicyRun], trace: Trace, config: EngineConfig, loaded: LoadedModel,
              slo: dict | None = None, env: dict | None = None, tokens_identical: bool | None = None) -> list[dict]:
    """Result rows (technique "batching"), one per policy, with speedups over static and HF from this run.

    `params.prefix_caching` says whether the engine's prefix cache was on (None: HF), and
    `params.measures_prefix_cache` whether the trace's shared prefixes let it serve prompts on purpose."""
    from labkit.device import describe_environment
    from labkit.lab.results import make_row

    env = env or describe_environment(loaded.device)
    metrics = {name: run.metrics(slo) for name, run in runs.items()}

    def speedup(m: dict, base: str) -> float | None:
        return m["output_tokens_per_s"] / metrics[base]["output_tokens_per_s"] if base in metrics else None

    rows = []
    for name, m in metrics.items():
        m.update(speedup_vs_static=speedup(m, "static"), speedup_vs_hf=speedup(m, "hf-sequential"),
                 tokens_identical=tokens_identical)
        engine = None if name == "hf-sequential" else {**config.to_dict(), "policy": name,
                                                       "num_kv_blocks": runs[name].num_kv_blocks}
        caching = None if engine is None else config.enable_prefix_caching
        params = {"policy": name, "mode": "offline" if trace.is_offline else "online", "trace": trace.describe(),
                  "engine": engine, "model": loaded.name, "device": str(loaded.device), "dtype": DTYPE,
                  "seed": trace.source.get("seed"), "prefix_caching": caching,
                  "measures_prefix_cache": measures_prefix_cache(trace, caching)}
        rows.append(make_row("batching", params, m, env))
    return rows


def run_server_bench(trace: Trace, loaded: LoadedModel, config: EngineConfig = DEFAULT_ENGINE,
                     slo: dict | None = None, num_warmups: int = 1, env: dict | None = None) -> list[dict]:
    """The trace's requests through `labkit serve` in-process: one at a time, then all at once (arrival times
    are not replayed). Rows (policy "server") carry `speedup_vs_sequential`: how many times sooner the
    concurrent run finished."""
    from labkit.device import describe_environment
    from labkit.lab.results import make_row
    from labkit.serving import ServerThread, create_app  # FastAPI and uvicorn: only when asked for

    hf = HFEngine(loaded.model, loaded.tokenizer, name=loaded.name)
    model = apply_rewrites(from_hf(loaded.model))
    prompts = trace.prompt_specs()
    results = {}
    for concurrency in (1, None):
        # a server (and KV cache) of its own per run: both runs send the same prompts, which the first run
        # would leave in the prefix cache for the second, so the second would time the cache
        engine = _engine(model, loaded, config, "continuous", hf.eos_token_ids)
        with ServerThread(create_app(engine, max_queue=max(64, len(prompts)))) as server:
            bench = BenchServeConfig(
                base_url=server.url, num_prompts=len(prompts), input_len=max(p.input_words for p in prompts),
                output_len=max(p.output_len for p in prompts), max_concurrency=concurrency,
                num_warmups=num_warmups, seed=int(trace.source.get("seed") or 0), slo=slo or {})
            results[concurrency] = benchmark(bench, prompts)
        num_kv_blocks = engine.blocks.num_blocks
        del engine  # its KV cache goes before the next one is allocated
    env = env or describe_environment(loaded.device)
    sequential_s = results[1]["metrics"]["duration_s"]
    rows = []
    for concurrency, result in results.items():
        m = {**result["metrics"], "output_tokens_per_s": result["metrics"]["output_throughput_tokens_per_s"],
             "speedup_vs_sequential": sequential_s / result["metrics"]["duration_s"], "errors": result["errors"]}
        params = {"policy": "server", "max_concurrency": concurrency, "trace": trace.describe(),
                  "engine": {**config.to_dict(), "policy": "continuous", "num_kv_blocks": num_kv_blocks},
                  "model": loaded.name, "device": str(loaded.device), "dtype": DTYPE,
                  "seed": trace.source.get("seed"), "prefix_caching": config.enable_prefix_caching,
                  "measures_prefix_cache": measures_prefix_cache(trace, config.enable_prefix_caching)}
        rows.append(make_row("batching", params, m, env))
    return rows


__all__ = ["POLICIES", "DEFAULT_TRACE", "DEFAULT_ENGINE", "RequestRecord", "PolicyRun", "BatchingResult", "replay",
           "replay_hf", "token_mismatches", "run_batching_bench", "make_rows", "measures_prefix_cache",
           "run_server_bench"]
