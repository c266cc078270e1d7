"""Decode throughput of the engines side by side in one run, as ratios to HF.

Engines: HF `generate` at the run's dtype (the baseline; fp32 by default), labkit eager, bf16, int8, compiled,
with CUDA graphs or the Triton kernels, and llama.cpp (llama-cpp-python, when installed) on the same GGUF. Each
row: decode tokens/s after warm-up, the ratio to HF at the same batch size, the roofline fraction (steps/s over
measured bandwidth / weight bytes per step), and compile and graph-capture times apart. The labkit variants of
one weight format share one compact model (only their KV caches are their own), so a GPU holds the HF weights
and one copy; dummy presets without a tokenizer get a seeded synthetic prompt.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from labkit.lab.stats import memory_bandwidth_gbps, weight_bytes_per_token
from labkit.device import (describe_environment, dtype_name, format_environment, pick_device, pick_dtype,
                           seed_everything)
from labkit.bench.hf import HFEngine
from labkit.engine import Engine, EngineConfig, SchedulerConfig
from labkit.engine.model_runner import MIN_STATIC_CONTEXT
from labkit.model.llama import from_hf
from labkit.model.rewrites import apply_rewrites, with_backends
from labkit.model.loader import EMBEDDED_MODEL, embedded_gguf_path, load_model


@dataclass(frozen=True)
class Variant:
    name: str
    engine: str  # "hf", "labkit" or "llama.cpp"
    dtype: str = "fp32"
    compile: bool = False
    linear_layout: str = "auto"
    gemm: str = "auto"  # few-row products: oneDNN's packed weights where it is fast (auto), or MKL ("plain")
    quantize: str | None = None
    cuda_graphs: bool = False  # the decode step replayed from CUDA graphs (a GPU only)
    kernels: str = "torch"  # the kernel and attention backends: "triton" for both, or torch and sdpa
    attention: str = "sdpa"
    kv_cache_dtype: str = "auto"  # "int8": the paged KV cache stored in int8 with a scale per head

    @property
    def model_key(self) -> tuple:
        """The weight format: variants with one key share one compact model."""
        return self.dtype, self.linear_layout, self.gemm, self.quantize


BENCH_DTYPES = ("fp32", "bf16", "fp16")


def _gpu_variants(dt: str) -> list[Variant]:
    """Per dtype: HF, eager, compiled, CUDA graphs (eager and compiled step), Triton kernels (eager, graphs)."""
    triton = dict(kernels="triton", attention="triton")
    return [Variant(f"hf-{dt}", "hf", dtype=dt), Variant(f"labkit-{dt}-graphs", "labkit", dtype=dt, cuda_graphs=True),
            Variant(f"labkit-{dt}-compile-graphs", "labkit", dtype=dt, compile=True, cuda_graphs=True),
            Variant(f"labkit-{dt}-triton", "labkit", dtype=dt, **triton),
            Variant(f"labkit-{dt}-triton-graphs", "labkit", dtype=dt, cuda_graphs=True, **triton)]


VARIANTS = {v.name: v for v in [
    Variant("hf-fp32", "hf"),
    Variant("labkit-fp32-nk", "labkit", linear_layout="nk"),
    Variant("labkit-fp32-mkl", "labkit", gemm="plain"),
    Variant("labkit-fp32", "labkit"),
    Variant("labkit-fp32-compile", "labkit", compile=True),
    Variant("labkit-int8", "labkit", dtype="int8", quantize="int8"),
    Variant("labkit-int8-compile", "labkit", dtype="int8", quantize="int8", compile=True),
    *[Variant(f"labkit-{q}{'-compile' * c}", "labkit", dtype=q, quantize=q, compile=c)
      for q in ("int4-g32", "int4-g64", "int4-g128", "gguf") for c in (False, True)],
    Variant("labkit-bf16", "labkit", dtype="bf16"),
    Variant("labkit-bf16-compile", "labkit", dtype="bf16", compile=True),
    Variant("labkit-fp16", "labkit", dtype="fp16"),
    Variant("labkit-fp16-compile", "labkit", dtype="fp16", compile=True),
    *[v for dt in BENCH_DTYPES for v in _gpu_variants(dt)],
    Variant("llama.cpp", "llama.cpp", dtype="q4_1"),
]}
DEFAULT_VARIANTS = ("hf-fp32", "labkit-fp32-nk", "labkit-fp32-mkl", "labkit-fp32", "labkit-bf16", "labkit-fp32-compile",
                    "labkit-int8", "labkit-int8-compile", "llama.cpp")
DEFAULT_PROMPT = "Once upon a time, in a small village,"
DEFAULT_PROMPT_TOKENS = 32  # the synthetic prompt of a model without a tokenizer (dummy presets)


def default_variants(dtype: str = "fp32", device: str = "auto") -> tuple[str, ...]:
    """DEFAULT_VARIANTS for fp32 on a CPU; on a GPU (or at bf16/fp16) HF at that dtype, then labkit eager,
    compiled, with CUDA graphs (on a GPU) and with the Triton kernels under graphs."""
    dev = pick_device(device)
    if dtype == "fp32" and dev.type != "cuda":
        return DEFAULT_VARIANTS
    names = [f"hf-{dtype}", f"labkit-{dtype}", f"labkit-{dtype}-compile"]
    if dev.type == "cuda":
        names += [f"labkit-{dtype}-graphs", f"labkit-{dtype}-compile-graphs", f"labkit-{dtype}-triton-graphs"]
    return tuple(names)


def variant_problem(variant: Variant, device: torch.device) -> str | None:
    """Why a variant cannot run on this device (None when it can)."""
    if variant.cuda_graphs and device.type != "cuda":
        return f"{variant.name} replays CUDA graphs: it needs --device cuda"
    if variant.kernels == "triton" and device.type != "cuda":
        from labkit.kernels.common import can_run_on

        if not can_run_on(device):
            return f"{variant.name} runs Triton kernels: it needs --device cuda (or TRITON_INTERPRET=1, very slow)"
    return None


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class _TorchRunner:
    """One generate call of an HF or labkit engine: returns (aggregate decode tokens/s, TTFT ms)."""

    def __init__(self, engine, weights, prompt_ids, max_tokens):
        self.engine, self.prompt_ids = engine, prompt_ids
        self.bytes_per_step = weight_bytes_per_token(weights)
        self.params = engine.sampling_params(max_new_tokens=max_tokens, ignore_eos=True)

    def warmup(self, batch_size):
        self.engine.generate([self.prompt_ids] * batch_size,
                             self.engine.sampling_params(max_new_tokens=8, ignore_eos=True))

    def __call__(self, batch_size):
        gens = self.engine.generate([self.prompt_ids] * batch_size, self.params)
        times = gens[0].token_times_s
        return batch_size * (len(times) - 1) / (times[-1] - times[0]), gens[0].ttft_s * 1e3


class _LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on the same GGUF file, streaming, EOS suppressed like ignore_eos."""

    def __init__(self, prompt, max_tokens, threads):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=512, n_threads=threads, n_batch=512,
                         verbose=False, seed=0)
        self.prompt, self.max_tokens = prompt, max_tokens
        self.logit_bias = {self.llm.token_eos(): -1e9}
        self.bytes_per_step = embedded_gguf_path().stat().st_size

    def warmup(self, batch_size):
        self.llm.create_completion(self.prompt, max_tokens=8, temperature=0.0)

    def __call__(self, batch_size):
        # llama-cpp-python keeps the last prompt's KV and skips the prefix a new prompt shares with it: every
        # timed run sends the same prompt, so forget it, or TTFT would time that reuse (as a prefix cache would)
        self.llm.reset()
        stamps, start = [], time.perf_counter()
        for _chunk in self.llm.create_completion(self.prompt, max_tokens=self.max_tokens, temperature=0.0,
                                                 stream=True, logit_bias=self.logit_bias):
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), (stamps[0] - start) * 1e3


LLAMA_CPP_INSTALL = "pip install 'labkit[llamacpp]' (or: pip install llama-cpp-python)"


def llama_cpp_problem(model: str, dummy: bool, device: str) -> str | None:
    """Why llama.cpp cannot run in this bench (None when it can): it needs llama-cpp-python, the embedded
    model's GGUF file and a CPU run."""
    if not llama_cpp_available():
        return f"llama.cpp needs llama-cpp-python, which is not installed: {LLAMA_CPP_INSTALL}"
    if model != EMBEDDED_MODEL or dummy:
        return f"llama.cpp runs only the embedded model's GGUF file ({EMBEDDED_MODEL}, without --dummy)"
    if pick_device(device).type != "cpu":
        return "llama.cpp runs here on the CPU only: add --device cpu"
    return None


def run_decode_bench(variants=None, batch_sizes=(1, 4), max_tokens: int = 64, repeats: int = 3,
                     prompt: str = DEFAULT_PROMPT, model: str = EMBEDDED_MODEL, dummy: bool = False,
                     device: str = "auto", log: Callable[[str], object] | None = None,
                     progress: bool = False, dtype: str = "auto", prompt_tokens: int | None = None) -> list[dict]:
    """Measure every (variant, batch size) in one process; return result rows.

    The repeats are interleaved (variant A, B, C, A, B, C, ...) so that drift in a noisy machine's speed
    falls on every engine alike; each cell reports the median of its repeats. `variants=None` runs
    `default_variants(dtype, device)`, leaving llama.cpp out (with a note to `log`) where it cannot run; naming
    llama.cpp where it cannot run is a ValueError that says how to install it. `dtype` is the weights' dtype
    as loaded and the HF baseline's (`hf-<dtype>`, always measured; "auto": bf16 on CUDA, else fp32).
    `prompt_tokens` replaces the prompt text
    by that many seeded random token ids (the default, DEFAULT_PROMPT_TOKENS, for a model without a
    tokenizer). `progress` shows a tqdm bar on stderr.
    """
    from tqdm.auto import tqdm

    dev = pick_device(device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in BENCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of auto, {', '.join(BENCH_DTYPES)}")
    explicit = variants is not None
    variants = tuple(dict.fromkeys(variants)) if explicit else default_variants(dtype, device)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown engine variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    baseline = f"hf-{dtype}"
    if baseline not in variants:
        variants = (baseline, *variants)  # ratios need the baseline measured in the same run
    for name in variants:
        problem = variant_problem(VARIANTS[name], dev)
        if problem:
            raise ValueError(problem)
    if any(VARIANTS[name].engine == "llama.cpp" for name in variants):
        problem = llama_cpp_problem(model, dummy, device)  # before the model loads: fail in seconds, not minutes
        if problem and explicit:
            raise ValueError(problem)
        if problem:
            variants = tuple(name for name in variants if VARIANTS[name].engine != "llama.cpp")
            if log:
                log(f"skipping llama.cpp: {problem}")
    seed_everything(0)
    loaded = load_model(model, device=device, dtype=dtype, dummy=dummy)
    if prompt_tokens is None and loaded.tokenizer is None:
        prompt_tokens = DEFAULT_PROMPT_TOKENS
        if log:
            log(f"{loaded.name} has no tokenizer: a synthetic prompt of {prompt_tokens} random token ids")
    if prompt_tokens is not None:
        generator = torch.Generator().manual_seed(0)
        prompt_ids = torch.randint(loaded.config.vocab_size, (prompt_tokens,), generator=generator).tolist()
        prompt = f"<{prompt_tokens} random token ids, seed 0>"
    else:
        prompt_ids = loaded.tokenizer(prompt)["input_ids"]
    if len(prompt_ids) + max_tokens > loaded.config.max_position_embeddings:
        raise ValueError(f"--max-tokens {max_tokens} does not fit the model's context")
    cells = {b: [n for n in variants if b == 1 or VARIANTS[n].engine != "llama.cpp"] for b in batch_sizes}
    total = 1 + len(variants) + sum(len(names) * (1 + repeats) for names in cells.values())
    with tqdm(total=total, desc="bench decode", unit="step", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        return _measure(loaded, prompt_ids, variants, cells, max_tokens, repeats, prompt, log, bar, baseline)


def _engine_config(batch_sizes, num_tokens: int, variant: Variant) -> EngineConfig:
    """A cache just big enough for the largest batch at full length, so that engines side by side fit a GPU.

    No prefix caching: every run (and every row of a batch) sends the same prompt, which the cache would
    answer from the warm-up's blocks, so the rows' TTFT would time the cache and not the prefill."""
    block_size = EngineConfig.block_size
    blocks = max(batch_sizes) * -(-(num_tokens + 8) // block_size) + 1
    return EngineConfig(scheduler=SchedulerConfig(max_num_seqs=max(batch_sizes)), num_kv_blocks=blocks,
                        compile=variant.compile, cuda_graphs=variant.cuda_graphs,
                        kv_cache_dtype=variant.kv_cache_dtype, enable_prefix_caching=False)


def _prepare(engine: Engine, batch_sizes, first: int, last: int) -> None:
    """Compile and capture, ahead of the timed runs, every bucket the runs will meet: each batch size and each
    block-table width between the prompt's length `first` and the longest context `last`."""
    bs = engine.config.block_size
    width = max(MIN_STATIC_CONTEXT // bs, 1 << (-(-first // bs) - 1).bit_length())
    for batch_size in batch_sizes:
        w = width
        while True:
            engine.warmup(batch_size=batch_size, seq_len=min(w * bs, last))
            if w * bs >= last:
                break
            w *= 2


def _labkit_engine(loaded, variant: Variant, shared: dict, batch_sizes, num_tokens: int) -> Engine:
    """An engine over the compact model of the variant's weight format, built once per format and shared."""
    key = variant.model_key
    if key not in shared:
        model = from_hf(loaded.model, dtype=None if variant.quantize else pick_dtype(variant.dtype))
        shared[key] = apply_rewrites(model, linear_layout=variant.linear_layout, quantize=variant.quantize,
                                     gemm=variant.gemm)
    model = with_backends(shared[key], attention=variant.attention, kernels=variant.kernels)
    return Engine(model, loaded.tokenizer, name=loaded.name, config=_engine_config(batch_sizes, num_tokens, variant))


def _measure(loaded, prompt_ids, variants, cells, max_tokens, repeats, prompt, log, bar, baseline,
             variants_by_name: dict | None = None, shared: dict | None = None) -> list[dict]:
    """The body of `run_decode_bench` once the model is loaded: set up each engine, then time the cells.

    `variants_by_name` looks the names up (default: VARIANTS); `shared`, when given, receives the compact models
    built per weight format, keyed by `Variant.model_key`, for a caller that measures more on them."""
    lookup = VARIANTS if variants_by_name is None else variants_by_name
    bar.set_postfix_str("measuring memory bandwidth")
    bandwidth = memory_bandwidth_gbps(size_mb=1024 if loaded.device.type == "cuda" else 256, device=loaded.device)
    bar.update()
    env = describe_environment(loaded.device)
    runners, compile_s = {}, {}
    shared = {} if shared is None else shared
    batch_sizes, num_tokens = tuple(cells), len(prompt_ids) + max_tokens
    for name in variants:
        variant = lookup[name]
        bar.set_postfix_str(f"setting up {name}")
        if variant.engine == "llama.cpp":
            runners[name] = _LlamaCppRunner(prompt, max_tokens, torch.get_num_threads())
        elif variant.engine == "hf":
            runners[name] = _TorchRunner(HFEngine(loaded.model, loaded.tokenizer, name=loaded.name),
                                         loaded.model, prompt_ids, max_tokens)
        else:
            engine = _labkit_engine(loaded, variant, shared, batch_sizes, num_tokens)
            if variant.compile or variant.cuda_graphs:  # compile and capture times are reported apart
                start = time.perf_counter()
                _prepare(engine, batch_sizes, len(prompt_ids), num_tokens)
                compile_s[name] = time.perf_counter() - start - (engine.capture_s or 0.0)
                if log:
                    done = [f"compiled in {compile_s[name]:.1f} s"] if variant.compile else []
                    done += [f"CUDA graphs captured in {engine.capture_s:.2f} s"] if variant.cuda_graphs else []
                    log(f"{name}: {', '.join(done)}")
            runners[name] = _TorchRunner(engine, engine.model, prompt_ids, max_tokens)
        bar.update()
    rows = []
    for batch_size, names in cells.items():
        for name in names:
            bar.set_postfix_str(f"batch {batch_size}: warming up {name}")
            runners[name].warmup(batch_size)
            bar.update()
        samples = {name: [] for name in names}
        for repeat in range(repeats):
            for name in names:
                bar.set_postfix_str(f"batch {batch_size}: {name}, run {repeat + 1}/{repeats}")
                samples[name].append(runners[name](batch_size))
                bar.update()
        for name in names:
            rows.append(_decode_row(name, lookup[name], runners[name], samples[name], batch_size, loaded, prompt_ids,
                                    max_tokens, repeats, bandwidth, compile_s.get(name), env))
            if log:
                log(f"{name:22s} batch {batch_size}: {rows[-1]['metrics']['tokens_per_s']:7.1f} tok/s")
    _add_ratios_to(rows, baseline)
    return rows


def _decode_row(name: str, variant: Variant, runner, samples: list[tuple[float, float]], batch_size: int, loaded,
                prompt_ids, max_tokens: int, repeats: int, bandwidth: float, compile_s: float | None,
                env: dict) -> dict:
    """One variant's row at one batch size from its timed runs' (tokens/s, TTFT ms) samples."""
    rates = [rate for rate, _ in samples]
    tokens_per_s = statistics.median(rates)
    roofline = bandwidth * 1e9 / runner.bytes_per_step  # decode steps/s if weights stream at bandwidth
    engine = getattr(runner, "engine", None)
    return {
        "technique": "decode",
        "params": {"variant": name, "engine": variant.engine, "dtype": variant.dtype,
                   "compile": variant.compile, "quantize": variant.quantize,
                   "cuda_graphs": variant.cuda_graphs, "kernels": variant.kernels,
                   "attention": variant.attention, "kv_cache_dtype": variant.kv_cache_dtype,
                   "linear_layout": getattr(engine, "linear_layout", None),
                   "gemm": None if variant.engine != "labkit" else
                   "packed" if "gemm:packed" in engine.model.rewrites else "plain",
                   "batch_size": batch_size, "max_tokens": max_tokens, "prompt_tokens": len(prompt_ids),
                   "repeats": repeats, "model": loaded.name, "device": str(loaded.device),
                   # None: HF has no prefix cache; llama.cpp's prompt reuse is reset before every run
                   "prefix_caching": None if engine is None else engine.describe().get("prefix_caching")},
        "metrics": {"tokens_per_s": tokens_per_s, "tokens_per_s_runs": rates,
                    "ttft_ms": statistics.median(t for _, t in samples),
                    "compile_s": compile_s if variant.compile else None,
                    "capture_s": getattr(engine, "capture_s", None),
                    "weight_bytes_per_step": runner.bytes_per_step,
                    "bandwidth_gbps": bandwidth, "roofline_tokens_per_s": roofline * batch_size,
                    "roofline_fraction": tokens_per_s / batch_size / roofline},
        "env": env,
    }


def _add_ratios_to(rows: list[dict], baseline: str) -> None:
    """Each row's `ratio_to_hf`: its tokens/s over the baseline variant's at the same batch size, in this run."""
    for row in rows:
        base = next((r for r in rows if r["params"]["variant"] == baseline
                     and r["params"]["batch_size"] == row["params"]["batch_size"]), None)
        row["metrics"]["ratio_to_hf"] = row["metrics"]["tokens_per_s"] / base["metrics"]["tokens_per_s"] \
            if base else None


def format_table(rows: list[dict]) -> str:
    head = f"{'engine':22s} {'batch':>5s} {'tok/s':>8s} {'× HF':>6s} {'roofline':>8s} {'TTFT ms':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        p, m = r["params"], r["metrics"]
        ratio = f"{m['ratio_to_hf']:.2f}" if m["ratio_to_hf"] else "n/a"
        lines.append(f"{p['variant']:22s} {p['batch_size']:5d} {m['tokens_per_s']:8.1f} {ratio:>6s} "
                     f"{m['roofline_fraction']:8.0%} {m['ttft_ms']:8.1f}")
    if rows:
        env = rows[0]["env"]
        lines.append(f"hardware: {format_environment(env).split(' · python')[0]}, {env['torch_threads']} torch "
                     f"threads; bandwidth {rows[0]['metrics']['bandwidth_gbps']:.1f} GB/s")
    return "\n".join(lines)


__all__ = ["run_decode_bench", "VARIANTS", "DEFAULT_VARIANTS", "default_variants", "variant_problem",
           "llama_cpp_problem", "format_table", "dtype_name"]
