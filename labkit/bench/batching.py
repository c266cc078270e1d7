"""`labkit bench batching`: sequential HF generate, static, dynamic and continuous batching on one trace.

Every policy serves the same trace (`labkit.serving.workloads`) with the same model weights: "hf-sequential" runs HF
`generate` on one request at a time in arrival order; "static", "dynamic" and "continuous" replay the trace
against a labkit Engine with that scheduling policy (`labkit.engine.scheduler`) and one batch limit for all three,
over one shared compact model. The driver adds each request when its arrival time comes (offline: all at
t=0), steps the engine in between and sleeps while it is idle; it records when every token arrived, so TTFT,
TPOT, ITL, E2E and throughput come from `loadgen.compute_metrics`, the arithmetic of `bench serve`, with
latencies counted from each request's arrival. Greedy outputs must be token-identical across policies (HF
up to the first EOS, see `token_mismatches`): the run fails loudly when they are not. `--server` sends the
same requests through `labkit serve` in-process instead: one at a time, then all at once.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from labkit.cli.arguments import add_label_option, comma_list, non_negative_float, non_negative_int, output_file, positive_int
from labkit.bench.hf import HFEngine
from labkit.engine import Engine, EngineConfig, SchedulerConfig
from labkit.model.llama import Transformer, from_hf
from labkit.model.rewrites import apply_rewrites
from labkit.serving.loadgen import BenchServeConfig, RequestOutcome, benchmark, compute_metrics, parse_slo, request_timing
from labkit.model.loader import EMBEDDED_MODEL, LoadedModel, load_model
from labkit.model.sampling import SamplingParams
from labkit.serving.workloads import LENGTH_KINDS, LengthDist, Trace, TraceConfig, load_trace, make_trace

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


def make_rows(runs: dict[str, PolicyRun], trace: Trace, config: EngineConfig, loaded: LoadedModel,
              slo: dict | None = None, env: dict | None = None, tokens_identical: bool | None = None) -> list[dict]:
    """Result rows (technique "batching"), one per policy, with speedups over static and HF from this run."""
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
        params = {"policy": name, "mode": "offline" if trace.is_offline else "online", "trace": trace.describe(),
                  "engine": engine, "model": loaded.name, "device": str(loaded.device), "dtype": DTYPE,
                  "seed": trace.source.get("seed")}
        rows.append(make_row("batching", params, m, env))
    return rows


def run_server_bench(trace: Trace, loaded: LoadedModel, config: EngineConfig = DEFAULT_ENGINE,
                     slo: dict | None = None, num_warmups: int = 1, env: dict | None = None) -> list[dict]:
    """The trace's requests through `labkit serve` in-process: one at a time, then all at once (arrival times
    are not replayed). Rows (policy "server") carry `speedup_vs_sequential`: how many times sooner the
    concurrent run finished."""
    from labkit.device import describe_environment
    from labkit.lab.results import make_row
    from labkit.serving.server import ServerThread, create_app  # FastAPI and uvicorn: only when asked for

    hf = HFEngine(loaded.model, loaded.tokenizer, name=loaded.name)
    engine = _engine(apply_rewrites(from_hf(loaded.model)), loaded, config, "continuous", hf.eos_token_ids)
    prompts = trace.prompt_specs()
    results = {}
    with ServerThread(create_app(engine, max_queue=max(64, len(prompts)))) as server:
        for concurrency in (1, None):
            bench = BenchServeConfig(
                base_url=server.url, num_prompts=len(prompts), input_len=max(p.input_words for p in prompts),
                output_len=max(p.output_len for p in prompts), max_concurrency=concurrency,
                num_warmups=num_warmups, seed=int(trace.source.get("seed") or 0), slo=slo or {})
            results[concurrency] = benchmark(bench, prompts)
    env = env or describe_environment(loaded.device)
    sequential_s = results[1]["metrics"]["duration_s"]
    rows = []
    for concurrency, result in results.items():
        m = {**result["metrics"], "output_tokens_per_s": result["metrics"]["output_throughput_tokens_per_s"],
             "speedup_vs_sequential": sequential_s / result["metrics"]["duration_s"], "errors": result["errors"]}
        params = {"policy": "server", "max_concurrency": concurrency, "trace": trace.describe(),
                  "engine": {**config.to_dict(), "policy": "continuous", "num_kv_blocks": engine.blocks.num_blocks},
                  "model": loaded.name, "device": str(loaded.device), "dtype": DTYPE,
                  "seed": trace.source.get("seed")}
        rows.append(make_row("batching", params, m, env))
    return rows


# -- reporting and the command line --------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    """A text table of the rows: throughput, ratios, latency percentiles, engine counters."""
    def fmt(value, spec):
        return format(value, spec) if value is not None else "n/a".rjust(int(spec.split(".")[0].rstrip("df%")))

    is_server = bool(rows) and rows[0]["params"]["policy"] == "server"
    base = "x 1-by-1" if is_server else "x static"  # server rows: how many times sooner than one at a time
    head = (f"{'policy':14s} {'tok/s':>7s} {base:>8s} {'x HF':>6s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
            f"{'TPOT p50':>9s} {'ITL p99':>8s} {'done s':>7s} {'preempt':>7s} {'peak blk':>8s} {'prefix':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        p, m = r["params"], r["metrics"]
        name = f"server c={p['max_concurrency'] or 'all'}" if is_server else p["policy"]
        ratio = m.get("speedup_vs_sequential") if is_server else m.get("speedup_vs_static")
        lines.append(f"{name:14s} {m['output_tokens_per_s']:7.1f} {fmt(ratio, '8.2f')} "
                     f"{fmt(m.get('speedup_vs_hf'), '6.2f')} {fmt(m['median_ttft_ms'], '9.0f')} "
                     f"{fmt(m['p99_ttft_ms'], '9.0f')} {fmt(m['median_tpot_ms'], '9.1f')} "
                     f"{fmt(m['p99_itl_ms'], '8.1f')} {m['duration_s']:7.1f} {fmt(m.get('num_preemptions'), '7d')} "
                     f"{fmt(m.get('peak_kv_blocks'), '8d')} {fmt(m.get('prefix_hit_rate'), '6.0%')}")
    if rows:
        t, env = rows[0]["params"]["trace"], rows[0]["env"]
        lines.append(f"trace: {t['num_requests']} requests ({'offline' if t['is_offline'] else 'online'}), "
                     f"{t['total_prompt_tokens']} prompt / {t['total_output_tokens']} output tokens, longest output "
                     f"{t['max_output_len']}")
        lines.append(f"hardware: {env['cpu']} ({env['num_cpus']} cpus, {env['cpu_capability']}), "
                     f"{env['torch_threads']} torch threads")
    return "\n".join(lines)


def _length_options(parser, name: str, default: LengthDist, what: str) -> None:
    parser.add_argument(f"--{name}-dist", choices=LENGTH_KINDS, default=default.kind,
                        help=f"distribution of {what} (default: %(default)s)")
    parser.add_argument(f"--{name}-len", type=positive_int, default=default.mean,
                        help=f"mean {what} in tokens, before clipping (default: %(default)s)")
    parser.add_argument(f"--{name}-shape", type=non_negative_float, default=None,
                        help="uniform: half-width / mean; lognormal: sigma; pareto: tail index alpha > 1 "
                             f"(default: {default.shape} for {default.kind}, else the distribution's own)")
    parser.add_argument(f"--{name}-max", type=positive_int, default=default.max_len,
                        help=f"clip {what} to this many tokens (default: %(default)s)")


def _length_dist(args, name: str) -> LengthDist:
    kind, shape = getattr(args, f"{name}_dist"), getattr(args, f"{name}_shape")
    default = getattr(DEFAULT_TRACE, f"{name}_len")
    if shape is None and kind == default.kind:
        shape = default.shape
    return LengthDist(kind, getattr(args, f"{name}_len"), shape, max_len=getattr(args, f"{name}_max"))


def add_parser(subparsers) -> None:
    """Register `labkit bench batching` on the `labkit bench` subparsers."""
    import argparse

    d, e = DEFAULT_TRACE, DEFAULT_ENGINE
    p = subparsers.add_parser(
        "batching", help="HF generate vs static, dynamic and continuous batching on one trace",
        description="Serve one request trace with sequential HF generate and with static, dynamic and continuous\n"
                    "batching on the labkit engine (same batch limit, one shared model), side by side in one run.\n"
                    "Reports throughput, speedups, TTFT/TPOT/ITL percentiles (bench serve's arithmetic), preemptions,\n"
                    "peak KV blocks and prefix-cache hits; checks that every policy gives the same greedy tokens.\n"
                    "Rows go to data/results.jsonl and the run to data/bench_batching.json.",
        epilog="examples:\n"
               "  labkit bench batching                                  # the default heavy-tailed offline trace\n"
               "  labkit bench batching --request-rate 4 --policies static,continuous\n"
               "  labkit bench batching --num-prefixes 4 --prefix-len 64 --prefix-fraction 0.8\n"
               "  labkit bench batching --trace azure_conv.csv --max-requests 64 --time-scale 0.1\n"
               "  labkit bench batching --server --num-requests 32 --output-dist fixed --output-len 32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the trace")
    g.add_argument("--trace", default=None, metavar="FILE",
                   help="replay a JSONL (arrival_s, prompt or prompt_len, output_len) or Azure CSV trace "
                        "instead of a synthetic one")
    g.add_argument("--time-scale", type=non_negative_float, default=1.0,
                   help="multiply a replayed trace's arrival times (0: offline) (default: %(default)s)")
    g.add_argument("--max-requests", type=positive_int, default=None, help="replay only the first N requests")
    g.add_argument("--num-requests", type=positive_int, default=d.num_requests, help="(default: %(default)s)")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, or inf for offline: all at t=0 (default: %(default)s)")
    g.add_argument("--burstiness", type=float, default=d.burstiness,
                   help="gamma shape of inter-arrival times: 1 is Poisson, < 1 burstier (default: %(default)s)")
    _length_options(g, "prompt", d.prompt_len, "prompt lengths (after any shared prefix)")
    _length_options(g, "output", d.output_len, "output lengths")
    g.add_argument("--num-prefixes", type=non_negative_int, default=0, help="shared system prompts (default: 0)")
    g.add_argument("--prefix-len", type=non_negative_int, default=0, help="tokens in each (default: 0)")
    g.add_argument("--prefix-fraction", type=non_negative_float, default=0.0,
                   help="share of requests that start with one (default: 0)")
    g.add_argument("--seed", type=int, default=0, help="seeds the trace (default: %(default)s)")
    g = p.add_argument_group("the engines")
    g.add_argument("--policies", type=comma_list(str), default=POLICIES,
                   help=f"comma-separated, from {', '.join(POLICIES)} (default: all)")
    g.add_argument("--max-num-seqs", type=positive_int, default=e.scheduler.max_num_seqs,
                   help="the batch limit of every policy (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=e.scheduler.max_num_batched_tokens,
                   help="continuous: new tokens per step, the prefill chunk (default: %(default)s)")
    g.add_argument("--max-wait-s", type=non_negative_float, default=e.scheduler.max_wait_s,
                   help="dynamic: start a smaller batch after this wait (default: %(default)s)")
    g.add_argument("--block-size", type=positive_int, default=e.block_size, help="tokens per KV block (default: 16)")
    g.add_argument("--num-kv-blocks", type=positive_int, default=None,
                   help="KV cache size in blocks; small values force preemption (default: from 512 MiB)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    g.add_argument("--model", default=EMBEDDED_MODEL, help="model (default: the embedded SmolLM2)")
    g.add_argument("--dummy", action="store_true", help="random weights from a preset (e.g. tiny-smollm2)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    g = p.add_argument_group("the run")
    g.add_argument("--server", action="store_true",
                   help="instead: the same requests through labkit serve, one at a time vs all at once")
    g.add_argument("--slo", default=None, metavar="KEY=MS,...", help="goodput targets, e.g. ttft_ms=2000,tpot_ms=200")
    g.add_argument("--output", type=output_file, default=None,
                   help="JSON file for this run (default: data/bench_batching.json, with --server "
                        "data/bench_batching_server.json)")
    add_label_option(g)
    g.add_argument("--json", action="store_true", help="print the rows as JSON on stdout; table on stderr")
    g.add_argument("--no-save", action="store_true", help="write nothing under data/")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_batching)


def _trace_config(args) -> TraceConfig | None:
    """The synthetic trace the flags describe (None with --trace), validated before any model loads."""
    if args.trace:
        return None
    return TraceConfig(num_requests=args.num_requests, request_rate=args.request_rate, burstiness=args.burstiness,
                       prompt_len=_length_dist(args, "prompt"), output_len=_length_dist(args, "output"),
                       num_prefixes=args.num_prefixes, prefix_len=args.prefix_len,
                       prefix_fraction=args.prefix_fraction, seed=args.seed)


def cmd_batching(args) -> int:
    import json

    from labkit.lab.results import append_rows, check_store, data_dir, stamp_rows, to_jsonable, write_json_atomic

    if not args.no_save:
        check_store()  # before minutes of measurement, not after
    scheduler = replace(DEFAULT_ENGINE.scheduler, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_wait_s=args.max_wait_s)
    config = replace(DEFAULT_ENGINE, scheduler=scheduler, block_size=args.block_size,
                     num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=not args.no_prefix_caching)
    slo, trace_config = parse_slo(args.slo), _trace_config(args)
    loaded = load_model(args.model, device=args.device, dtype=DTYPE, dummy=args.dummy)
    if loaded.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; use a preset with one (e.g. tiny-smollm2)")
    if trace_config is None:
        trace = load_trace(args.trace, loaded.tokenizer, time_scale=args.time_scale, max_requests=args.max_requests,
                           seed=args.seed)
    else:
        trace = make_trace(trace_config, loaded.tokenizer)
    mismatches = []
    if args.server:
        rows = run_server_bench(trace, loaded, config, slo)
        document = {"schema": SCHEMA, "rows": rows, "trace": trace.describe()}
    else:
        result = run_batching_bench(trace, loaded, config, args.policies, slo, progress=not args.no_progress)
        rows, mismatches, document = result.rows, result.mismatches, result.document()
    rows = stamp_rows(rows, label=args.label)
    print(format_table(rows), file=sys.stderr if args.json else sys.stdout)
    if mismatches:  # a speedup that changes the answer is no speedup: say so, and keep it out of the results
        print("labkit bench batching: greedy tokens differ between policies:\n  " + "\n  ".join(mismatches),
              file=sys.stderr)
        return 1
    if not args.no_save:
        append_rows(rows)
        document["rows"] = rows
        default = "bench_batching_server.json" if args.server else "bench_batching.json"
        path = write_json_atomic(args.output or data_dir() / default, document)
        print(f"labkit bench batching: wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_jsonable(rows), indent=2, allow_nan=False))
    return 0


__all__ = ["POLICIES", "DEFAULT_TRACE", "DEFAULT_ENGINE", "RequestRecord", "PolicyRun", "BatchingResult", "replay",
           "replay_hf", "token_mismatches", "run_batching_bench", "make_rows", "run_server_bench", "format_table",
           "add_parser", "cmd_batching"]
