"""Decode throughput of the engines side by side in one run, as ratios to HF (and to llama.cpp).

Engines: HF `generate` at the run's dtype (the baseline; fp32 by default), labkit eager, bf16, int8, compiled,
with CUDA graphs or the Triton kernels, and llama.cpp (llama-cpp-python, when installed) on the same GGUF; and
prompt-lookup speculation over them: labkit's n-gram proposer (`labkit-<weights>-ngram`) and llama-cpp-python's
own `LlamaPromptLookupDecoding` (`llama.cpp-lookup`), each checked token for token against its plain twin (the
same weights without speculation, greedy) and given no speedup where it differs. Workloads: free text (the
prompt), or the speculative bench's chat and input-grounded prompts (copy, summarise, code-edit) through the
chat template. Each row: decode tokens/s after warm-up, ratios to HF and to llama.cpp at the same workload and
batch size, the roofline fraction (steps/s over measured bandwidth / weight bytes per step), and compile and
graph-capture times apart. The labkit variants of one weight format share one compact model (only their KV
caches are their own), so a GPU holds the HF weights and one copy; dummy presets without a tokenizer get a seeded
synthetic prompt.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from labkit.lab.stats import memory_bandwidth_gbps
from labkit.checks import check_int
from labkit.device import describe_environment, dtype_name, pick_device, pick_dtype, seed_everything
from labkit.bench.decode_rows import add_ratios, check_lossless, decode_row, format_table
from labkit.bench.decode_runners import LlamaCppRunner, LookupSettings, TorchRunner
from labkit.bench.hf import HFEngine
from labkit.engine import Engine, EngineConfig, SchedulerConfig
from labkit.engine.model_runner import MIN_STATIC_CONTEXT
from labkit.model.llama import from_hf
from labkit.model.rewrites import apply_rewrites, with_backends
from labkit.model.loader import EMBEDDED_MODEL, load_model
from labkit.speculative.bench import WORKLOADS as SPEC_WORKLOADS, encode
from labkit.engine.config import SpeculativeConfig
from labkit.engine.spec_decode.proposers import NgramProposer
from labkit.engine.spec_decode.speculator import Speculator


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
    plain: str | None = None  # a speculative variant's twin: the variant it speeds up (same weights, no draft)

    @property
    def speculative(self) -> bool:
        """Prompt-lookup speculation: labkit's n-gram proposer, or llama.cpp's own lookup."""
        return self.plain is not None

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


_PLAIN_VARIANTS = {v.name: v for v in [
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
# prompt-lookup speculation over the weights worth speeding up (labkit's n-gram proposer; llama.cpp's own lookup)
_LOOKUP = {f"{base}-ngram": base for base in ("labkit-fp32", "labkit-fp32-compile", "labkit-bf16", "labkit-bf16-compile",
                                             "labkit-int8", "labkit-int8-compile", "labkit-gguf", "labkit-gguf-compile")}
_LOOKUP["llama.cpp-lookup"] = "llama.cpp"
VARIANTS = {**_PLAIN_VARIANTS,
            **{name: replace(_PLAIN_VARIANTS[base], name=name, plain=base) for name, base in _LOOKUP.items()}}
DEFAULT_VARIANTS = ("hf-fp32", "labkit-fp32-nk", "labkit-fp32-mkl", "labkit-fp32", "labkit-bf16", "labkit-fp32-compile",
                    "labkit-int8", "labkit-int8-compile", "llama.cpp")
DEFAULT_PROMPT = "Once upon a time, in a small village,"
DEFAULT_PROMPT_TOKENS = 32  # the synthetic prompt of a model without a tokenizer (dummy presets)
# "free": the prompt (text continuation); the others: the speculative bench's prompts, chat template and all
WORKLOADS = ("free", "chat", "copy", "summarise", "code-edit")


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


def _check_variants(variants, dtype: str, dev: torch.device, model: str, dummy: bool, device: str,
                    lookup: LookupSettings, log) -> tuple[tuple[str, ...], str]:
    """The variants to run, in order, with the baseline and every speculative variant's plain twin added; a
    ValueError for one that cannot run (llama.cpp left out with a note where it was not asked for)."""
    explicit = variants is not None
    variants = tuple(dict.fromkeys(variants)) if explicit else default_variants(dtype, device)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown engine variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    baseline = f"hf-{dtype}"
    # ratios need the baseline, and the lossless check each twin, measured in the same run
    variants = tuple(dict.fromkeys(n for name in (baseline, *variants) for n in (VARIANTS[name].plain, name) if n))
    for name in variants:
        problem = variant_problem(VARIANTS[name], dev)
        if problem:
            raise ValueError(problem)
    if "llama.cpp-lookup" in variants and lookup.prompt_lookup_min != 1:
        raise ValueError(f"llama.cpp-lookup has no prompt_lookup_min (its lookup goes down to 1-grams): "
                         f"got {lookup.prompt_lookup_min}; leave it at 1 to compare like with like")
    if any(VARIANTS[name].engine == "llama.cpp" for name in variants):
        problem = llama_cpp_problem(model, dummy, device)  # before the model loads: fail in seconds, not minutes
        if problem and explicit:
            raise ValueError(problem)
        if problem:
            variants = tuple(name for name in variants if VARIANTS[name].engine != "llama.cpp")
            if log:
                log(f"skipping llama.cpp: {problem}")
    return variants, baseline


def workload_prompts(workload: str, loaded, prompt: str, prompt_tokens: int | None) -> list[list[int]]:
    """A workload's prompt token ids: "free" is `prompt` (or `prompt_tokens` seeded random ids); the others are
    the speculative bench's prompts (`labkit.speculative.bench.WORKLOADS`), through the chat template where it
    uses it."""
    if workload == "free":
        if prompt_tokens is not None:
            generator = torch.Generator().manual_seed(0)
            return [torch.randint(loaded.config.vocab_size, (prompt_tokens,), generator=generator).tolist()]
        return [loaded.tokenizer(prompt)["input_ids"]]
    if loaded.tokenizer is None:
        raise ValueError(f"workload {workload!r} needs a model with a tokenizer; {loaded.name} has none "
                         f"(use --workload free)")
    return [encode(loaded.tokenizer, p) for p in SPEC_WORKLOADS[workload]]


@contextmanager
def _torch_threads(threads: int | None):
    """torch's intra-op threads set to `threads` for the run (None: as they are), then put back."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_decode_bench(variants=None, batch_sizes=(1, 4), max_tokens: int = 64, repeats: int = 3,
                     prompt: str = DEFAULT_PROMPT, model: str = EMBEDDED_MODEL, dummy: bool = False,
                     device: str = "auto", log: Callable[[str], object] | None = None,
                     progress: bool = False, dtype: str = "auto", prompt_tokens: int | None = None,
                     workloads=("free",), threads: int | None = None,
                     lookup: LookupSettings | None = None) -> list[dict]:
    """Measure every (variant, workload, batch size) in one process; return result rows.

    The repeats are interleaved (variant A, B, C, A, B, C, ...) so that drift in a noisy machine's speed
    falls on every engine alike; each cell reports the median of its repeats, a repeat being one pass over
    the workload's prompts, greedy, exactly `max_tokens` new tokens each (EOS ignored). `variants=None` runs
    `default_variants(dtype, device)`, leaving llama.cpp out (with a note to `log`) where it cannot run; naming
    llama.cpp where it cannot run is a ValueError that says how to install it. `dtype` is the weights' dtype
    as loaded and the HF baseline's (`hf-<dtype>`, always measured; "auto": bf16 on CUDA, else fp32).
    `prompt_tokens` replaces the free workload's prompt text by that many seeded random token ids (the default,
    DEFAULT_PROMPT_TOKENS, for a model without a tokenizer). `threads`: torch's threads and llama.cpp's for the
    run (None: torch's as they are). `lookup`: the speculative variants' settings (default LookupSettings()).
    `progress` shows a tqdm bar on stderr.
    """
    from tqdm.auto import tqdm

    dev = pick_device(device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in BENCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of auto, {', '.join(BENCH_DTYPES)}")
    workloads = tuple(dict.fromkeys(workloads))
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad or not workloads:
        raise ValueError(f"unknown workload {bad[0] if bad else ''!r}: choose from {', '.join(WORKLOADS)}")
    if threads is not None:
        check_int("threads", threads)
    lookup = LookupSettings() if lookup is None else lookup
    variants, baseline = _check_variants(variants, dtype, dev, model, dummy, device, lookup, log)
    seed_everything(0)
    loaded = load_model(model, device=device, dtype=dtype, dummy=dummy)
    if prompt_tokens is None and loaded.tokenizer is None:
        prompt_tokens = DEFAULT_PROMPT_TOKENS
        if log:
            log(f"{loaded.name} has no tokenizer: a synthetic prompt of {prompt_tokens} random token ids")
    if prompt_tokens is not None:
        prompt = f"<{prompt_tokens} random token ids, seed 0>"
    prompts = {w: workload_prompts(w, loaded, prompt, prompt_tokens) for w in workloads}
    longest = max(len(p) for ps in prompts.values() for p in ps)
    if longest + max_tokens + lookup.num_speculative_tokens > loaded.config.max_position_embeddings:
        raise ValueError(f"--max-tokens {max_tokens} does not fit the model's context after {longest} prompt tokens")
    cells = {b: [n for n in variants if b == 1 or VARIANTS[n].engine != "llama.cpp"] for b in batch_sizes}
    total = 1 + len(variants) + len(workloads) * sum(len(names) * (1 + repeats) for names in cells.values())
    with tqdm(total=total, desc="bench decode", unit="step", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar, _torch_threads(threads):
        return _measure(loaded, prompts[workloads[0]][0], variants, cells, max_tokens, repeats, prompt, log, bar,
                        baseline, workloads=prompts, lookup=lookup)


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
    block-table width between the shortest prompt's length `first` and the longest context `last`."""
    bs = engine.config.block_size
    width = max(MIN_STATIC_CONTEXT // bs, 1 << (-(-first // bs) - 1).bit_length())
    for batch_size in batch_sizes:
        w = width
        while True:
            engine.warmup(batch_size=batch_size, seq_len=min(w * bs, last))
            if w * bs >= last:
                break
            w *= 2


def _speculator(lookup: LookupSettings) -> Speculator:
    """labkit's prompt lookup (what `--speculative-config '{"method": "ngram", ...}'` builds): an n-gram proposer,
    fixed gamma."""
    gamma = lookup.num_speculative_tokens
    return Speculator(NgramProposer(max_ngram=lookup.prompt_lookup_max, min_ngram=lookup.prompt_lookup_min),
                      SpeculativeConfig(num_speculative_tokens=gamma, max_draft_tokens=max(16, gamma)))


def _labkit_engine(loaded, variant: Variant, shared: dict, batch_sizes, num_tokens: int,
                   lookup: LookupSettings | None = None) -> Engine:
    """An engine over the compact model of the variant's weight format, built once per format and shared; a
    speculative variant's engine carries its own speculator."""
    key = variant.model_key
    if key not in shared:
        if variant.quantize:  # fp32 weights to quantize; activations as `labkit serve` runs them (bf16 where fast)
            model = from_hf(loaded.model, act_dtype=pick_dtype("auto", loaded.model.device))
        else:
            model = from_hf(loaded.model, dtype=pick_dtype(variant.dtype))
        shared[key] = apply_rewrites(model, linear_layout=variant.linear_layout, quantize=variant.quantize,
                                     gemm=variant.gemm)
    model = with_backends(shared[key], attention=variant.attention, kernels=variant.kernels)
    speculator = _speculator(lookup or LookupSettings()) if variant.speculative else None
    return Engine(model, loaded.tokenizer, name=loaded.name, speculator=speculator,
                  config=_engine_config(batch_sizes, num_tokens, variant))


def _runner(name: str, variant: Variant, loaded, shared: dict, batch_sizes, lengths: tuple[int, int],
            max_tokens: int, lookup: LookupSettings, log) -> tuple[object, float | None]:
    """The runner of one variant and its compile time (None where nothing compiles). `lengths`: the shortest
    prompt and the longest context (prompt, new tokens and drafts) the runs will meet."""
    if variant.engine == "llama.cpp":
        return LlamaCppRunner(max_tokens, torch.get_num_threads(), n_ctx=lengths[1] + 8,
                              lookup=lookup if variant.speculative else None), None
    if variant.engine == "hf":
        return TorchRunner(HFEngine(loaded.model, loaded.tokenizer, name=loaded.name), loaded.model, max_tokens), None
    engine = _labkit_engine(loaded, variant, shared, batch_sizes, lengths[1], lookup)
    compile_s = None
    if variant.compile or variant.cuda_graphs:  # compile and capture times are reported apart
        start = time.perf_counter()
        _prepare(engine, batch_sizes, *lengths)
        compile_s = time.perf_counter() - start - (engine.capture_s or 0.0)
        if log:
            done = [f"compiled in {compile_s:.1f} s"] if variant.compile else []
            done += [f"CUDA graphs captured in {engine.capture_s:.2f} s"] if variant.cuda_graphs else []
            log(f"{name}: {', '.join(done)}")
    return TorchRunner(engine, engine.model, max_tokens), compile_s


def _time_cell(runners: dict, names, batch_size: int, prompts, repeats: int, label: str, bar) -> dict[str, list]:
    """Warm each runner up, then its timed passes over the prompts, repeats interleaved across the runners."""
    for name in names:
        bar.set_postfix_str(f"{label}: warming up {name}")
        runners[name].warmup(batch_size, prompts)
        runners[name].reset_stats()
        bar.update()
    samples = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            bar.set_postfix_str(f"{label}: {name}, run {repeat + 1}/{repeats}")
            samples[name].append(runners[name](batch_size, prompts))
            bar.update()
    return samples


def _measure(loaded, prompt_ids, variants, cells, max_tokens, repeats, prompt, log, bar, baseline,
             variants_by_name: dict | None = None, shared: dict | None = None, *,
             workloads: dict[str, list[list[int]]] | None = None, lookup: LookupSettings | None = None) -> list[dict]:
    """The body of `run_decode_bench` once the model is loaded: set up each engine, then time the cells.

    `workloads`: name -> prompt token ids (default: `prompt_ids` alone, as "free"); `prompt` labels the free
    workload's prompt in its rows. `variants_by_name` looks the
    names up (default: VARIANTS); `shared`, when given, receives the compact models built per weight format, keyed
    by `Variant.model_key`, for a caller that measures more on them."""
    by_name = VARIANTS if variants_by_name is None else variants_by_name
    workloads = {"free": [prompt_ids]} if workloads is None else workloads
    lookup = LookupSettings() if lookup is None else lookup
    bar.set_postfix_str("measuring memory bandwidth")
    bandwidth = memory_bandwidth_gbps(size_mb=1024 if loaded.device.type == "cuda" else 256, device=loaded.device)
    bar.update()
    run = dict(loaded=loaded, prompt=prompt, max_tokens=max_tokens, repeats=repeats, bandwidth=bandwidth, lookup=lookup,
               env=describe_environment(loaded.device), threads=torch.get_num_threads())
    lengths = [len(p) for ps in workloads.values() for p in ps]
    drafts = lookup.num_speculative_tokens if any(by_name[n].speculative for n in variants) else 0
    lengths = (min(lengths), max(lengths) + max_tokens + drafts)
    runners, compile_s, shared = {}, {}, {} if shared is None else shared
    for name in variants:
        bar.set_postfix_str(f"setting up {name}")
        runners[name], compile_s[name] = _runner(name, by_name[name], loaded, shared, tuple(cells), lengths,
                                                 max_tokens, lookup, log)
        bar.update()
    rows = []
    for workload, prompts in workloads.items():
        for batch_size, names in cells.items():
            samples = _time_cell(runners, names, batch_size, prompts, repeats, f"{workload}, batch {batch_size}", bar)
            differences = check_lossless(names, by_name, samples)
            for name in names:
                rows.append(decode_row(name, by_name[name], runners[name], samples[name], workload=workload,
                                       prompts=prompts, batch_size=batch_size, run=run, compile_s=compile_s[name],
                                       difference=differences.get(name)))
                if log:
                    differ = f"  TOKENS DIFFER from {by_name[name].plain} at token {differences[name]}" \
                        if differences.get(name) is not None else ""
                    log(f"{name:26s} {workload:9s} batch {batch_size}: "
                        f"{rows[-1]['metrics']['tokens_per_s']:7.1f} tok/s{differ}")
    add_ratios(rows, baseline, by_name)
    return rows


__all__ = ["run_decode_bench", "workload_prompts", "VARIANTS", "DEFAULT_VARIANTS", "WORKLOADS", "LookupSettings",
           "default_variants", "variant_problem", "llama_cpp_problem", "format_table", "dtype_name"]
