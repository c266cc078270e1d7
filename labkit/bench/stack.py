"""`labkit bench stack`: the full stack one technique at a time, through the server, under one load and at batch 1.

Starting from HF `generate`, each stage adds one technique to the one before (STAGES: the compact engine,
continuous batching, bf16 end to end, a compiled step, speculation, prefix caching) and is measured twice through
`labkit serve` (in this process, on a thread, as notebook 05 does) with `bench serve`'s load generator:
"load", `num_requests` requests sent at once, and "batch1", requests sent one at a time (TPOT with one request
in flight). Every stage gets prompts of its own words (its own seed), so no prefix cache can answer one stage's
requests from another's; within a stage all prompts may share a prefix of `prefix_len` words, a system prompt,
which is what the prefix cache is for. HF has no server here: its stage runs `HFEngine` offline at the same load
(one batched `generate`, prompts cut to a common token length so no padding is needed) and its rows say so.
Peers (`labkit.bench.peers`: vLLM, llama.cpp, `labkit serve` at its defaults) get the same load when their
pythons are given. "prefill" rows measure where quantization collides with a prefill-heavy load: the batching
stage with fp32, bf16 and int8 weights on long prompts and one output token.

A stage's settings are one flat dict (SETTINGS' keys: dtype, quantize, compile, speculative in vLLM's JSON form,
and the scheduler's limits), so they map onto one engine configuration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from labkit.checks import check_int
from labkit.serving.workloads import PromptSpec, make_prompts

SCHEMA = "labkit.bench.stack/1"
HF_TRANSPORT, SERVER_TRANSPORT = "offline, no HTTP", "HTTP, labkit serve in this process"
PEER_TRANSPORT = "HTTP, a server process"
MODES = ("load", "batch1", "prefill")
# where every stage starts: the compact engine's defaults with the prefix cache off, so that stage adds it
BASE_SETTINGS = {"dtype": "fp32", "quantize": None, "compile": False, "speculative": None, "max_num_seqs": 16,
                 "max_num_batched_tokens": 256, "enable_prefix_caching": False}
SETTINGS = tuple(BASE_SETTINGS)
# each stage: its name, its label, and what it changes over the stage before (the table behind the waterfall)
STAGES = (
    {"name": "hf", "label": "HF generate", "changes": {}},
    {"name": "engine", "label": "+ compact engine (one request a step)", "changes": {"max_num_seqs": 1}},
    # 64 rows, 1024 tokens a step: MEASUREMENTS.md's best fp32 flags at 64 requests on 2 cores
    {"name": "batching", "label": "+ continuous batching", "changes": {"max_num_seqs": 64,
                                                                      "max_num_batched_tokens": 1024}},
    {"name": "bf16", "label": "+ bf16 (weights, activations, KV)", "changes": {"dtype": "bf16"}},
    {"name": "compile", "label": "+ compiled step", "changes": {"compile": True}},
    {"name": "speculation", "label": "+ speculation (n-gram)",
     "changes": {"speculative": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}}},
    {"name": "prefix", "label": "+ prefix caching", "changes": {"enable_prefix_caching": True}},
)
STAGE_NAMES = tuple(s["name"] for s in STAGES)
# the prefill collision: the batching stage's settings with each weight format
PREFILL_VARIANTS = {"fp32": {}, "bf16": {"dtype": "bf16"}, "int8": {"quantize": "int8"}}


@dataclass
class StackLoad:
    """One load: `num_requests` sent at once (words ≈ tokens), and `batch1_requests` sent one at a time."""

    num_requests: int = 64
    input_len: int = 64
    output_len: int = 64
    prefix_len: int = 0  # words every prompt of a stage starts with (a system prompt; fresh words per stage)
    batch1_requests: int = 3
    num_warmups: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in ("num_requests", "input_len", "output_len", "batch1_requests"):
            check_int(name, getattr(self, name))
        for name in ("prefix_len", "num_warmups", "seed"):
            check_int(name, getattr(self, name), minimum=0)


def stage_settings(names: Sequence[str] = STAGE_NAMES) -> list[dict]:
    """The chosen stages in STAGES' order, each with its cumulative settings: [{"name", "label", "settings"}].
    A stage left out adds nothing to the stages after it."""
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown stage {unknown[0] if unknown else ''!r}: choose among {', '.join(STAGE_NAMES)}")
    settings, out = dict(BASE_SETTINGS), []
    for stage in STAGES:
        if stage["name"] in names:
            settings = {**settings, **stage["changes"]}
            out.append({"name": stage["name"], "label": stage["label"], "settings": dict(settings)})
    return out


def stage_config(settings: dict):
    """A stage's settings as the one engine configuration (`labkit.engine.EngineConfig`, what `labkit serve`'s
    flags build): the speculative setting is vLLM's --speculative-config JSON object."""
    from labkit.engine.config import EngineConfig, SpeculativeConfig

    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown stage setting {sorted(unknown)[0]!r}: choose among {', '.join(SETTINGS)}")
    s = {**BASE_SETTINGS, **settings}
    spec = SpeculativeConfig.from_json(s["speculative"]) if s["speculative"] is not None else None
    return EngineConfig.from_kwargs(max_num_seqs=s["max_num_seqs"], max_num_batched_tokens=s["max_num_batched_tokens"],
                                    enable_prefix_caching=s["enable_prefix_caching"], compile=s["compile"],
                                    dtype=s["dtype"], quantization=s["quantize"], speculative=spec)


def build_engine(loaded, settings: dict):
    """A labkit Engine over a LoadedModel (fp32 HF weights) with a stage's settings (`stage_config`)."""
    from labkit.engine import Engine

    config = stage_config(settings)
    dtype = None if config.model.quantization or config.model.dtype == "fp32" else config.model.dtype
    return Engine.from_hf(loaded.model, loaded.tokenizer, name=loaded.name, dtype=dtype, config=config)


def stage_prompts(load: StackLoad, tag: str, num: int | None = None, input_len: int | None = None,
                  output_len: int | None = None) -> list[PromptSpec]:
    """Fresh prompts for one stage and mode (`tag`): words of their own seed, after a prefix of prefix_len
    words that all of them share (also fresh per tag)."""
    n, n_in, n_out = num or load.num_requests, input_len or load.input_len, output_len or load.output_len
    prompts = make_prompts(n, n_in, n_out, seed=f"stack-{load.seed}-{tag}")
    if not load.prefix_len:
        return prompts
    prefix = make_prompts(1, load.prefix_len, 1, seed=f"stack-prefix-{load.seed}-{tag}")[0].prompt
    return [dataclasses.replace(p, prompt=f"{prefix} {p.prompt}", input_words=p.input_words + load.prefix_len)
            for p in prompts]


def _bench(base_url: str, prompts: Sequence[PromptSpec], concurrency: int | None, num_warmups: int,
           seed: int) -> dict:
    """`bench serve` of these prompts against a server."""
    from labkit.serving.loadgen import BenchServeConfig, benchmark

    config = BenchServeConfig(base_url=base_url, num_prompts=len(prompts),
                              input_len=max(p.input_words for p in prompts),
                              output_len=max(p.output_len for p in prompts), max_concurrency=concurrency,
                              num_warmups=num_warmups, seed=seed, timeout_s=3600.0)
    return benchmark(config, list(prompts))


def measure_server(base_url: str, load: StackLoad, tag: str, modes: Sequence[str] = ("load", "batch1"),
                   prefill: StackLoad | None = None, warm_load: bool = False) -> dict[str, dict]:
    """`bench serve` results {mode: result} for one server: the load at once, then one request at a time.
    `warm_load`: one untimed pass of the whole load first, with other words (a compiled step compiles each
    batch-size bucket the first time it meets it)."""
    out = {}
    if warm_load:
        _bench(base_url, stage_prompts(load, f"{tag}-warm"), None, 0, load.seed)
    for mode in modes:
        if mode == "load":
            out[mode] = _bench(base_url, stage_prompts(load, f"{tag}-load"), None, load.num_warmups, load.seed)
        elif mode == "batch1":
            prompts = stage_prompts(load, f"{tag}-batch1", num=load.batch1_requests)
            out[mode] = _bench(base_url, prompts, 1, load.num_warmups, load.seed)
        elif mode == "prefill":
            p = prefill or prefill_load(load)
            out[mode] = _bench(base_url, stage_prompts(p, f"{tag}-prefill"), None, p.num_warmups, p.seed)
    return out


def prefill_load(load: StackLoad) -> StackLoad:
    """The prefill-heavy load of the quantization collision: 4x longer prompts, one output token each."""
    return dataclasses.replace(load, input_len=4 * load.input_len, output_len=1)


def measure_labkit(loaded, settings: dict, load: StackLoad, tag: str, modes: Sequence[str] = ("load", "batch1"),
                   prefill: StackLoad | None = None) -> dict[str, dict]:
    """One labkit stage through `labkit serve` in this process: a fresh engine (and KV cache) per stage."""
    from labkit.serving import ServerThread, create_app

    engine = build_engine(loaded, settings)
    queue = max(64, load.num_requests, (prefill or load).num_requests)
    try:
        with ServerThread(create_app(engine, max_queue=queue)) as server:
            return measure_server(server.url, load, tag, modes, prefill, warm_load=settings.get("compile", False))
    finally:
        del engine  # its KV cache goes before the next stage allocates one


def measure_hf(loaded, load: StackLoad, tag: str = "hf") -> dict[str, dict]:
    """HF `generate` offline (no server exists for it here): the load as one batch, then one request at a time;
    results shaped like `bench serve`'s ({"metrics": ...}) for the same rows."""
    from labkit.bench.hf import HFEngine

    hf = HFEngine(loaded.model, loaded.tokenizer, name=loaded.name)
    tokenize = loaded.tokenizer
    warm = [tokenize(p.prompt)["input_ids"] for p in stage_prompts(load, f"{tag}-warm", num=1, output_len=4)]
    hf.generate(warm, _greedy(4))
    out = {}
    for mode, num in (("load", load.num_requests), ("batch1", load.batch1_requests)):
        ids = [tokenize(p.prompt)["input_ids"] for p in stage_prompts(load, f"{tag}-{mode}", num=num)]
        common = min(map(len, ids))
        ids = [i[:common] for i in ids]  # one length: HF batches them without padding
        batches = [ids] if mode == "load" else [[i] for i in ids]
        out[mode] = _hf_run(hf, batches, load.output_len)
        out[mode]["prompt_tokens"] = common
    return out


def _greedy(max_new_tokens: int):
    from labkit.model.sampling import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, detokenize=False)


def _hf_run(hf, batches: list[list[list[int]]], output_len: int) -> dict:
    """Each batch generated in turn, every request's tokens timed from its batch's start."""
    import time

    from labkit.serving.load_metrics import RequestOutcome, compute_metrics, request_timing

    outcomes, origin = [], time.perf_counter()
    for batch in batches:
        start = time.perf_counter()
        generations = hf.generate(batch, _greedy(output_len))
        end = time.perf_counter()
        for prompt, g in zip(batch, generations):
            times = [start + t for t in g.token_times_s]
            out = RequestOutcome(len(outcomes), success=True, start_s=start, end_s=end, input_tokens=len(prompt),
                                 output_tokens=len(g.tokens), expected_output_tokens=output_len,
                                 chunk_times_s=times, chunk_tokens=[1] * len(times))
            out.timing = request_timing(start, times, out.chunk_tokens, end, len(g.tokens))
            outcomes.append(out)
    duration = max(o.end_s for o in outcomes) - origin
    return {"metrics": compute_metrics(outcomes, duration), "errors": {}}


def headline(mode: str, metrics: dict) -> float | None:
    """The number a stage is ranked by: output tokens/s under load; one user's decode tokens/s (1000 / median
    TPOT) at batch 1; prompt tokens/s in the prefill-heavy load."""
    if mode == "batch1":
        tpot = metrics.get("median_tpot_ms")
        return 1e3 / tpot if tpot else None
    if mode == "prefill":
        return metrics["total_input_tokens"] / metrics["duration_s"] if metrics.get("duration_s") else None
    return metrics.get("output_throughput_tokens_per_s")


SUMMARY_METRICS = ("duration_s", "num_completed", "num_failed", "total_input_tokens", "total_output_tokens",
                   "output_throughput_tokens_per_s", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
                   "p99_tpot_ms", "median_itl_ms", "median_e2el_ms")


def make_stage_rows(entries: list[dict], load: StackLoad, env: dict, model: str,
                    prefill: StackLoad | None = None) -> list[dict]:
    """Result rows (technique "stack"), one per entry {stage, label, mode, server, transport, settings, version,
    flags, result}: the summary metrics, the headline `tokens_per_s` (see `headline`) and, per mode, the
    speedups over HF and over the labkit stage before it, from this run."""
    from labkit.lab.results import make_row

    rows, previous, hf = [], {}, {}
    prefill = prefill or prefill_load(load)
    for e in entries:
        m = e["result"]["metrics"]
        value = headline(e["mode"], m)
        metrics = {k: m.get(k) for k in SUMMARY_METRICS}
        metrics["tokens_per_s"] = value
        if e["stage"] == "hf":
            hf[e["mode"]] = value
        base = hf.get(e["mode"])
        metrics["speedup_vs_hf"] = value / base if value and base else None
        before = previous.get(e["mode"]) if e["server"] == "labkit-stage" else None
        metrics["speedup_vs_previous"] = value / before if value and before else None
        metrics["errors"] = e["result"].get("errors") or {}
        if e["server"] in ("hf", "labkit-stage") and e["mode"] != "prefill":
            previous[e["mode"]] = value
        params = {"stage": e["stage"], "label": e["label"], "mode": e["mode"], "server": e["server"],
                  "version": e.get("version"), "flags": e.get("flags"), "transport": e["transport"],
                  "settings": e.get("settings"), "load": asdict(prefill if e["mode"] == "prefill" else load),
                  "hf_prompt_tokens": e["result"].get("prompt_tokens"), "model": model, "seed": load.seed}
        rows.append(make_row("stack", params, metrics, env))
    return rows


@dataclass
class StackResult:
    """A run of `run_stack_bench`: its rows and, per entry, the load generator's whole result."""

    rows: list[dict]
    results: list[dict] = field(default_factory=list)

    def frame(self):
        """One line per row: stage, label, mode, server, transport, tokens_per_s, speedups, TTFT and TPOT."""
        import pandas as pd

        return pd.DataFrame([{**{k: r["params"][k] for k in ("stage", "label", "mode", "server", "version",
                                                               "transport")}, **r["metrics"]} for r in self.rows])

    def document(self) -> dict:
        """The JSON document of the run: the rows and each entry's per-request results."""
        return {"schema": SCHEMA, "rows": self.rows, "results": self.results}


def _entry(stage: dict, mode: str, server: str, transport: str, result: dict, **extra) -> dict:
    return {"stage": stage["name"], "label": stage["label"], "mode": mode, "server": server,
            "transport": transport, "settings": stage.get("settings"), "result": result, **extra}


def run_stack_bench(loaded, stages: Sequence[str] = STAGE_NAMES, load: StackLoad | None = None,
                    peers: Sequence[dict] = (), prefill: StackLoad | bool | None = None,
                    log: Callable[[str], object] | None = None, env: dict | None = None) -> StackResult:
    """Measure each stage (cumulative, STAGES' order) under `load` and at batch 1, then each peer ({"server",
    "python", "flags", "model"} for `labkit.bench.peers.Peer`) the same way, then, with `prefill` (True: the
    default `prefill_load`), the batching stage with each weight format in PREFILL_VARIANTS on that load."""
    from labkit.device import describe_environment

    load = load or StackLoad()
    log = log or (lambda message: None)
    prefill = prefill_load(load) if prefill is True else prefill or None
    env = env or describe_environment(loaded.device)
    entries = []
    for stage in stage_settings(stages):
        log(f"bench stack: stage {stage['name']} ({stage['label']})")
        if stage["name"] == "hf":
            measured = measure_hf(loaded, load)
            entries += [_entry(stage, mode, "hf", HF_TRANSPORT, r, version=_transformers_version())
                        for mode, r in measured.items()]
            continue
        measured = measure_labkit(loaded, stage["settings"], load, stage["name"])
        entries += [_entry(stage, mode, "labkit-stage", SERVER_TRANSPORT, r) for mode, r in measured.items()]
    for peer in peers:
        entries += measure_peer(peer, load, log)
    if prefill is not None:
        batching = stage_settings(["batching"])[0]["settings"]
        for name, changes in PREFILL_VARIANTS.items():
            log(f"bench stack: prefill-heavy load, {name} weights")
            stage = {"name": f"prefill-{name}", "label": f"batching, {name} weights", "settings": {**batching,
                                                                                                **changes}}
            r = measure_labkit(loaded, stage["settings"], load, stage["name"], ("prefill",), prefill)["prefill"]
            entries.append(_entry(stage, "prefill", "labkit-variant", SERVER_TRANSPORT, r))
    rows = make_stage_rows(entries, load, env, loaded.name, prefill)
    return StackResult(rows, [{k: v for k, v in e.items() if k != "result"} | {"result": _slim(e["result"])}
                              for e in entries])


def measure_peer(peer: dict, load: StackLoad, log: Callable[[str], object]) -> list[dict]:
    """One peer server (`labkit.bench.peers.Peer` keywords) under the same load and at batch 1."""
    from labkit.bench.peers import Peer

    p = Peer(**peer)
    log(f"bench stack: peer {p.server} ({p.python}), starting")
    with p:
        measured = measure_server(p.url, load, f"peer-{p.server}")
    stage = {"name": p.server, "label": f"{p.server} (peer)", "settings": None}
    info = p.describe()
    return [_entry(stage, mode, p.server, PEER_TRANSPORT, r, version=info["version"], flags=info["flags"],
                   peer=info) for mode, r in measured.items()]


def _slim(result: dict) -> dict:
    """A load generator's result without its vLLM-compatible duplicate keys (the rows keep the summary)."""
    keep = ("config", "server", "metrics", "errors", "requests", "token_count_source", "prompt_tokens")
    return {k: result[k] for k in keep if k in result}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def format_table(rows: list[dict]) -> str:
    """A text table: one line per row."""
    lines = [f"{'stage':<34}{'mode':<8}{'tok/s':>9}{'x HF':>7}{'x prev':>8}{'TTFT ms':>10}{'TPOT ms':>9}  transport"]

    def num(v, spec):
        width = int(spec.split(".")[0])
        return format(v, spec) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) \
            else "-".rjust(width)

    for r in rows:
        p, m = r["params"], r["metrics"]
        lines.append(f"{p['label'][:33]:<34}{p['mode']:<8}{num(m['tokens_per_s'], '9.1f')}"
                     f"{num(m['speedup_vs_hf'], '7.2f')}{num(m['speedup_vs_previous'], '8.2f')}"
                     f"{num(m['median_ttft_ms'], '10.0f')}{num(m['median_tpot_ms'], '9.1f')}  {p['transport']}")
    return "\n".join(lines)


__all__ = ["SCHEMA", "STAGES", "STAGE_NAMES", "SETTINGS", "BASE_SETTINGS", "PREFILL_VARIANTS", "MODES", "StackLoad",
           "StackResult", "stage_settings", "stage_config", "build_engine", "stage_prompts", "measure_server",
           "prefill_load", "measure_labkit", "measure_hf", "measure_peer", "headline", "make_stage_rows",
           "run_stack_bench", "format_table"]
