"""`labkit baseline`: generate from one prompt and report load time, TTFT, decode tokens/s, latency and peak
memory: one cold run reported apart, then the medians of warm runs."""

from __future__ import annotations

import dataclasses
import random
import statistics
import sys
import time
from collections.abc import Mapping, Sequence

from labkit.checks import check_int
from labkit.device import describe_environment, dtype_name, peak_memory_mb, reset_peak_memory, seed_everything
from labkit.bench.hf import ENGINES, make_engine
from labkit.engine.outputs import Generation
from labkit.model.loader import EMBEDDED_MODEL, load_model


def generation_metrics(gen: Generation) -> dict:
    """The per-generation metrics every notebook and benchmark reports (units in the names)."""
    total_s = gen.token_times_s[-1] if gen.token_times_s else gen.ttft_s
    return {
        "num_prompt_tokens": len(gen.prompt_tokens),
        "num_new_tokens": gen.num_tokens,
        "ttft_ms": gen.ttft_s * 1e3,
        "decode_tokens_per_s": gen.decode_tokens_per_s if gen.num_tokens > 1 else None,
        "total_latency_ms": total_s * 1e3,
        "finish_reason": gen.finish_reason,
    }


STORY = ("Once upon a time, in a small village at the edge of a great forest, there lived a curious girl who "
         "loved to ask questions about the stars, the rivers and the old stories the elders told by the fire. ")


def synthetic_prompt(engine, num_tokens: int) -> list[int]:
    """A natural-text prompt of exactly num_tokens tokens (a story repeated and cut)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    ids = engine.encode(STORY)
    while len(ids) < num_tokens:
        ids = ids + engine.encode(STORY)
    return ids[:num_tokens]


def prefix_caching_of(engine) -> bool | None:
    """Whether the engine's prefix cache is on: True/False for labkit's engine, None for one without (HF)."""
    return engine.describe().get("prefix_caching")


def prefix_hit_tokens(engine) -> int | None:
    """Prompt tokens the engine's prefix cache has served so far (a counter), or None for an engine without."""
    blocks = getattr(engine, "blocks", None)
    return getattr(blocks, "num_hit_tokens", None)


def fresh_prompt(engine, num_tokens: int, rng: random.Random) -> list[int]:
    """A prompt of exactly num_tokens tokens of random common words drawn with `rng`: each call its own, so a
    prefix cache holds none of it (random token ids for an engine without a tokenizer)."""
    from labkit.serving.workloads import WORDS

    check_int("num_tokens", num_tokens)
    if getattr(engine, "tokenizer", None) is None:
        vocab = engine.model.args.vocab_size if hasattr(engine.model, "args") else engine.model.config.vocab_size
        return [rng.randrange(vocab) for _ in range(num_tokens)]
    ids: list[int] = []
    while len(ids) < num_tokens:
        ids += engine.encode(" ".join(rng.choice(WORDS) for _ in range(num_tokens - len(ids) + 1)))
    return ids[:num_tokens]


class CachedPromptError(RuntimeError):
    """A timed run was served from the prefix cache: its number would measure the cache, not the work."""


def measure_grid(engine, prompt_lengths=(16,), new_tokens=(16,), repeats: int = 2,
                 rng: random.Random | int = 0, **sampling) -> list[dict]:
    """TTFT, decode tokens/s and latency for each (prompt length, new tokens), median over repeats.

    Fixed output lengths (ignore_eos) so every cell does the same work; one warm-up run first. Every timed
    run gets its own prompt of random common words drawn with `rng` (a random.Random, or a seed for a new
    one): a repeated prompt would be answered from the labkit engine's prefix cache (a 256-token prompt's TTFT
    falls ~7x), so that TTFT would measure the cache. Share one `rng` across calls that use one engine; a call
    whose timed runs still hit the cache raises CachedPromptError. Rows record `prefix_caching` (None: HF).
    """
    from labkit.lab.stats import summarize

    rng = rng if isinstance(rng, random.Random) else random.Random(check_int("rng", rng, minimum=0))
    engine.generate([synthetic_prompt(engine, 8)], engine.sampling_params(max_new_tokens=4, ignore_eos=True))
    described = engine.describe()
    hits_before = prefix_hit_tokens(engine)
    rows = []
    for num_prompt in prompt_lengths:
        for num_new in new_tokens:
            params = engine.sampling_params(max_new_tokens=num_new, ignore_eos=True, **sampling)
            runs = [generation_metrics(engine.generate([fresh_prompt(engine, num_prompt, rng)], params)[0])
                    for _ in range(repeats)]
            row = {"engine": described["engine"], "model": described["model"], "device": described["device"],
                   "dtype": described["dtype"], "prompt_tokens": num_prompt, "new_tokens": num_new, "repeats": repeats,
                   "prefix_caching": described.get("prefix_caching")}
            for key in ("ttft_ms", "decode_tokens_per_s", "total_latency_ms"):
                values = [r[key] for r in runs if r[key] is not None]
                row[key] = summarize(values).median_ms if values else None  # the median, whatever the unit
            rows.append(row)
    hits = None if hits_before is None else prefix_hit_tokens(engine) - hits_before
    if hits:
        raise CachedPromptError(f"the prefix cache served {hits} prompt tokens of the timed runs: their TTFT "
                                f"measures the cache; give each call on this engine its own rng (or share one)")
    return rows


SWEEP_PARAMS = ("engine", "model", "device", "dtype", "prompt_tokens", "new_tokens", "repeats", "prefix_caching")
SWEEP_METRICS = ("ttft_ms", "decode_tokens_per_s", "total_latency_ms")


def sweep_rows(grid_rows: Sequence[Mapping], env: Mapping | None = None) -> list[dict]:
    """Results rows (technique "baseline-sweep") from `measure_grid` rows: params name the engine, model,
    device, dtype, repeats, the cell's lengths and whether prefix caching was on (None: HF); `env` defaults to
    the stamp of the rows' device."""
    from labkit.lab.results import make_row

    rows = list(grid_rows)
    if env is None:
        env = describe_environment(rows[0]["device"] if rows else None)
    return [make_row("baseline-sweep", {k: r[k] for k in SWEEP_PARAMS}, {k: r[k] for k in SWEEP_METRICS}, env)
            for r in rows]


TIMED_METRICS = ("ttft_ms", "decode_tokens_per_s", "total_latency_ms")


def run_baseline(prompt: str = "Hello, world!", max_tokens: int = 20, model: str = EMBEDDED_MODEL,
                 engine: str = "hf", device: str = "auto", dtype: str = "fp32", temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, chat: bool = False, dummy: bool = False,
                 compile: bool = False, repeats: int = 3, progress: bool = False, engine_config=None) -> dict:
    """Load a model, generate once cold, then `repeats` times warm; return a results row (technique "baseline").

    The first generation of a process pays one-off costs (lazy initialisation, allocator growth, kernel
    selection): it is reported apart as `cold_*`; `ttft_ms`, `decode_tokens_per_s` and `total_latency_ms` are
    the medians of the warm runs (each run's values in `*_runs`). Every run sends the same prompt, so the labkit
    engine runs without its prefix cache (`params.prefix_caching` False; None for HF, which has none).
    engine_config: the labkit engine's EngineConfig (quantization, KV dtype, speculation, ...; its compile and
    prefix caching are this function's), recorded in the row as `params.engine_config`.
    """
    from tqdm.auto import tqdm

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if not prompt:
        raise ValueError("prompt must not be empty")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    seed_everything(seed)
    loaded = load_model(model, device=device, dtype=dtype, dummy=dummy, seed=seed)  # a bad model fails in one line
    reset_peak_memory(loaded.device)
    start = time.perf_counter()
    # every run sends the same prompt: with the labkit engine's prefix cache on, the warm runs would be
    # answered from the blocks the cold run left and their TTFT would time the cache. Off for this measurement.
    kwargs = {"compile": compile, "enable_prefix_caching": False} if engine == "labkit" else {}
    if engine_config is not None and engine == "labkit":
        kwargs = {"config": dataclasses.replace(engine_config, **kwargs)}
    runner = make_engine(engine, loaded, **kwargs)
    convert_s = time.perf_counter() - start
    params = runner.sampling_params(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, seed=seed)
    prompt_ids = runner.encode(prompt, chat=chat)
    with tqdm(total=1 + repeats, desc="baseline", unit="run", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        if compile:
            bar.set_postfix_str("compiling")
        compile_s = runner.warmup() if compile else None
        runs = []
        for i in range(1 + repeats):
            bar.set_postfix_str("cold run" if i == 0 else f"warm run {i}/{repeats}")
            gen = runner.generate([prompt_ids], params)[0]
            runs.append(generation_metrics(gen))
            bar.update()
    cold, warm = runs[0], runs[1:]
    params_out = {"prompt": prompt, "max_tokens": max_tokens, "model": loaded.name, "model_source": loaded.source,
                  "engine": engine, "device": str(loaded.device), "dtype": dtype_name(loaded.dtype),
                  "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed, "chat": chat,
                  "compile": compile, "repeats": repeats, "prefix_caching": prefix_caching_of(runner)}
    if "config" in kwargs:
        params_out["engine_config"] = kwargs["config"].to_dict()
    metrics = {"load_s": loaded.load_s, "engine_setup_s": convert_s, "compile_s": compile_s, **warm[-1],
               "num_warmup": 1, "num_repeats": repeats, "peak_memory_mb": peak_memory_mb(loaded.device)}
    for key in TIMED_METRICS:
        values = [run[key] for run in warm if run[key] is not None]
        metrics[key] = statistics.median(values) if values else None
        metrics[f"{key}_runs"] = [run[key] for run in warm]
        metrics[f"cold_{key}"] = cold[key]
    return {"technique": "baseline", "params": params_out, "metrics": metrics, "text": gen.text,
            "env": describe_environment(loaded.device)}
