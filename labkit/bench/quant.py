"""`labkit bench quant`: speed, memory and quality of each quantization scheme, side by side in one run.

For fp32, bf16, int8, int4 (each group size), the GGUF file's own blocks, an int8 KV cache and llama.cpp on the
same GGUF: decode tokens/s at each batch size (`labkit bench decode`'s runners, repeats interleaved), weight
memory, sliding-window perplexity on an offline English text, and greedy agreement with the fp32 model. One row
per (scheme, batch size) in the lab's result-row form (`params.scheme`, `metrics.tokens_per_s`,
`metrics.perplexity`); `pareto_front` and `recommend` read them. It sits in `labkit.bench`, above the
technique packages, because its speed half is `labkit bench decode`'s runners; the quality half is
`labkit.quant.quality`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from labkit.lab.stats import weight_bytes_per_token
from labkit.bench.decode import (DEFAULT_PROMPT, VARIANTS, Variant, _measure, llama_cpp_available,
                                 llama_cpp_problem)
from labkit.device import seed_everything
from labkit.engine import Engine, EngineConfig, SchedulerConfig
from labkit.model.loader import EMBEDDED_MODEL, embedded_gguf_path, load_model
from labkit.quant.quality import LogitsFunction, greedy_agreement, load_text, perplexity, sliding_windows

SCHEMES = ("fp32", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128", "gguf", "kv-int8", "llama.cpp")
# scheme -> (decode variant, eager or compiled); kv-int8 keeps fp32 weights so that only the cache changes
_VARIANT = {"fp32": "labkit-fp32", "bf16": "labkit-bf16", "int8": "labkit-int8", "int4-g32": "labkit-int4-g32",
            "int4-g64": "labkit-int4-g64", "int4-g128": "labkit-int4-g128", "gguf": "labkit-gguf",
            "kv-int8": "labkit-fp32", "llama.cpp": "llama.cpp"}
# perplexity prefills each window in chunks of this many tokens, so that every chunk after the first reads the
# KV cache (an int8 cache changes nothing for a window read in one piece: its tokens attend to their own K, V)
PPL_CHUNK = 32
AGREEMENT_PROMPTS = ("The three primary colors are", "def fibonacci(n):", "The capital of France is",
                     "Once upon a time, in a small village,")


def scheme_variant(scheme: str, compile: bool) -> Variant:
    """The `bench decode` variant that runs a scheme (its compiled step where `compile` and a step exists)."""
    base = VARIANTS[_VARIANT[scheme]]
    if compile and base.engine == "labkit":
        base = VARIANTS[f"{base.name}-compile"] if f"{base.name}-compile" in VARIANTS else replace(base, compile=True)
    if scheme == "kv-int8":
        base = replace(base, name=f"{base.name}-kv-int8", kv_cache_dtype="int8")
    return replace(base, name=f"quant:{scheme}")


def run_quant_bench(schemes=SCHEMES, batch_sizes=(1, 8), max_tokens: int = 64, repeats: int = 3,
                    compile: bool = True, text: str = "pydoc", ppl_tokens: int = 1024, context_len: int = 512,
                    stride: int = 256, agreement_tokens: int = 32, num_agreement_prompts: int = 4,
                    log: Callable[[str], object] | None = None, progress: bool = False) -> list[dict]:
    """Measure every scheme on the embedded model on the CPU; return one row per (scheme, batch size).

    llama.cpp is skipped with a note where llama-cpp-python is missing, unless named explicitly."""
    from tqdm.auto import tqdm

    schemes = tuple(dict.fromkeys(schemes))
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"unknown quantization scheme {unknown[0]!r}: choose from {', '.join(SCHEMES)}")
    sliding_windows(ppl_tokens, context_len, stride)  # bad window values fail before minutes of loading
    if "llama.cpp" in schemes:
        problem = llama_cpp_problem(EMBEDDED_MODEL, False, "cpu")
        if problem and list(schemes) != list(SCHEMES):
            raise ValueError(problem)
        if problem:
            schemes = tuple(s for s in schemes if s != "llama.cpp")
            if log:
                log(f"skipping llama.cpp: {problem}")
    if "fp32" not in schemes:
        schemes = ("fp32", *schemes)  # the reference for ratios, perplexity change and agreement
    seed_everything(0)
    loaded = load_model(EMBEDDED_MODEL, device="cpu", dtype="fp32")
    eval_text = load_text(text)
    ppl_ids = loaded.tokenizer(eval_text.text[: ppl_tokens * 8])["input_ids"][:ppl_tokens]
    if len(ppl_ids) < ppl_tokens:
        raise ValueError(f"--ppl-tokens {ppl_tokens}: the {text} text has only {len(ppl_ids)} tokens")
    prompt_ids = loaded.tokenizer(DEFAULT_PROMPT)["input_ids"]
    agreement_ids = [loaded.tokenizer(p)["input_ids"] for p in AGREEMENT_PROMPTS[:num_agreement_prompts]]
    variants = {s: scheme_variant(s, compile) for s in schemes}
    cells = {b: [variants[s].name for s in schemes if b == 1 or s != "llama.cpp"] for b in batch_sizes}
    shared: dict = {}
    total = 1 + len(schemes) * 2 + sum(len(names) * (1 + repeats) for names in cells.values())
    with tqdm(total=total, desc="bench quant", unit="step", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        by_name = {v.name: v for v in variants.values()}
        speed = _measure(loaded, prompt_ids, list(by_name), cells, max_tokens, repeats, DEFAULT_PROMPT, log,
                         bar, baseline=variants["fp32"].name, variants_by_name=by_name, shared=shared)
        quality = {}
        for scheme in schemes:
            bar.set_postfix_str(f"quality of {scheme}")
            start = time.perf_counter()
            quality[scheme] = _quality(scheme, variants[scheme], shared, loaded, ppl_ids, context_len, stride,
                                       agreement_ids, agreement_tokens, quality.get("fp32"))
            if log:
                q = quality[scheme]
                log(f"{scheme:10s} perplexity {q['perplexity']:.3f}, teacher-forced agreement "
                    f"{q['agreement_teacher_forced']:.3f} ({time.perf_counter() - start:.0f} s)")
            bar.update(2)
    return _rows(speed, variants, quality, eval_text, ppl_tokens, context_len, stride, compile)


def _labkit_engine_for(variant: Variant, shared: dict, loaded, num_tokens: int) -> Engine:
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=8), num_kv_blocks=8 * -(-num_tokens // EngineConfig.block_size) + 8,
                          kv_cache_dtype=variant.kv_cache_dtype)
    return Engine(shared[variant.model_key], loaded.tokenizer, name=loaded.name, config=config)


def _quality(scheme, variant, shared, loaded, ppl_ids, context_len, stride, agreement_ids, agreement_tokens,
             reference) -> dict:
    """Perplexity, agreement with fp32 and memory of one scheme (engines without a compiled step: the same
    weights, and prefill runs eager anyway)."""
    if variant.engine == "llama.cpp":
        return _llama_cpp_quality(ppl_ids, context_len, stride, agreement_ids, agreement_tokens, reference)
    num_tokens = max(context_len, max(len(p) for p in agreement_ids) + agreement_tokens) + 1
    engine = _labkit_engine_for(variant, shared, loaded, num_tokens)
    result = {"perplexity": perplexity(engine, ppl_ids, context_len, stride, chunk_size=PPL_CHUNK).perplexity}
    if reference is None:  # fp32 itself: its own greedy continuation is the reference
        result.update(agreement_teacher_forced=1.0, agreement_free_running=1.0, _engine=engine)
    else:
        agreement = greedy_agreement(reference["_engine"], engine, agreement_ids, agreement_tokens)
        result.update(agreement_teacher_forced=agreement.teacher_forced,
                      agreement_free_running=agreement.free_running)
    model = engine.model
    seen, weight_bytes = set(), 0  # everything the model holds: the fp32 embedding table too
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            weight_bytes += t.numel() * t.element_size()
    result.update(weight_bytes=weight_bytes, weight_bytes_per_token=weight_bytes_per_token(model),
                  kv_bytes_per_token=engine.cache.nbytes // ((engine.cache.num_blocks + 1) * engine.cache.block_size))
    return result


def _llama_cpp_quality(ppl_ids, context_len, stride, agreement_ids, agreement_tokens, reference) -> dict:
    """The same perplexity windows and teacher-forced agreement read from llama.cpp's logits."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=max(context_len, 256), n_batch=max(context_len, 256),
                n_threads=torch.get_num_threads(), logits_all=True, verbose=False, seed=0)

    def logits(ids: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))

    scored = perplexity(LogitsFunction(logits, llm.n_ctx(), llm.n_vocab()), ppl_ids, context_len, stride)
    same = positions = diverged = 0
    ref_engine = reference["_engine"]
    for prompt in agreement_ids:
        ref = ref_engine.generate([prompt], ref_engine.sampling_params(max_new_tokens=agreement_tokens,
                                                                       ignore_eos=True))[0].tokens
        teacher = prompt + ref[:-1]
        rows = slice(len(prompt) - 1, len(teacher))
        same += int((logits(teacher)[rows].argmax(-1) == ref_engine.prompt_logits(teacher)[rows].argmax(-1)).sum())
        positions += len(ref)
        llm.reset()
        mine = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            mine.append(token)
            if len(mine) == len(ref):
                break
        diverged += next((i for i, (x, y) in enumerate(zip(ref, mine)) if x != y), len(ref))
    size = embedded_gguf_path().stat().st_size
    return {"perplexity": scored.perplexity, "agreement_teacher_forced": same / positions,
            "agreement_free_running": diverged / positions, "weight_bytes": size, "weight_bytes_per_token": size,
            "kv_bytes_per_token": None}


def _rows(speed, variants, quality, eval_text, ppl_tokens, context_len, stride, compile) -> list[dict]:
    by_variant = {v.name: s for s, v in variants.items()}
    fp32_ppl = quality["fp32"]["perplexity"]
    rows = []
    for r in speed:
        scheme = by_variant[r["params"]["variant"]]
        q = {k: v for k, v in quality[scheme].items() if not k.startswith("_")}
        base = next(x for x in speed if x["params"]["variant"] == variants["fp32"].name
                    and x["params"]["batch_size"] == r["params"]["batch_size"])
        llama = next((x for x in speed if by_variant[x["params"]["variant"]] == "llama.cpp"
                      and x["params"]["batch_size"] == r["params"]["batch_size"]), None)
        m = r["metrics"]
        rows.append({
            "technique": "quant",
            "params": {**r["params"], "scheme": scheme, "variant": variants[scheme].name.split(":", 1)[1],
                       "compile": variants[scheme].compile, "kv_cache_dtype": variants[scheme].kv_cache_dtype,
                       "text": eval_text.name, "text_sha256": eval_text.sha256, "ppl_tokens": ppl_tokens,
                       "context_len": context_len, "stride": stride},
            "metrics": {"tokens_per_s": m["tokens_per_s"], "tokens_per_s_runs": m["tokens_per_s_runs"],
                        "ratio_to_fp32": m["tokens_per_s"] / base["metrics"]["tokens_per_s"],
                        "ratio_to_llama_cpp": m["tokens_per_s"] / llama["metrics"]["tokens_per_s"] if llama else None,
                        "ttft_ms": m["ttft_ms"], "compile_s": m["compile_s"], **q,
                        "perplexity_change_pct": 100 * (q["perplexity"] / fp32_ppl - 1),
                        "roofline_fraction": m["roofline_fraction"], "bandwidth_gbps": m["bandwidth_gbps"]},
            "env": r["env"],
        })
    return rows


def pareto_front(rows: list[dict], batch_size: int = 1) -> list[str]:
    """Schemes no other scheme beats on both decode speed (at batch_size) and perplexity, fastest first."""
    cells = [r for r in rows if r["params"]["batch_size"] == batch_size]
    front = [r for r in cells if not any(
        o["metrics"]["tokens_per_s"] >= r["metrics"]["tokens_per_s"] and o["metrics"]["perplexity"]
        <= r["metrics"]["perplexity"] and (o["metrics"]["tokens_per_s"], o["metrics"]["perplexity"])
        != (r["metrics"]["tokens_per_s"], r["metrics"]["perplexity"]) for o in cells)]
    return [r["params"]["scheme"] for r in sorted(front, key=lambda r: -r["metrics"]["tokens_per_s"])]


def recommend(rows: list[dict], max_perplexity_change_pct: float = 2.0, batch_size: int = 1,
              engine: str = "labkit") -> dict:
    """The fastest scheme of `engine` at batch_size whose perplexity is within the budget of fp32's, with the
    numbers that make the case (speed against fp32 and llama.cpp, perplexity change, memory)."""
    cells = [r for r in rows if r["params"]["batch_size"] == batch_size and r["params"]["engine"] == engine
             and r["metrics"]["perplexity_change_pct"] <= max_perplexity_change_pct]
    if not cells:
        raise ValueError(f"no {engine} scheme stays within +{max_perplexity_change_pct} % perplexity at batch "
                         f"{batch_size}")
    best = max(cells, key=lambda r: r["metrics"]["tokens_per_s"])
    m = best["metrics"]
    return {"scheme": best["params"]["scheme"], "tokens_per_s": m["tokens_per_s"], "ratio_to_fp32": m["ratio_to_fp32"],
            "ratio_to_llama_cpp": m["ratio_to_llama_cpp"], "perplexity": m["perplexity"],
            "perplexity_change_pct": m["perplexity_change_pct"], "weight_bytes": m["weight_bytes"],
            "batch_size": batch_size, "budget_pct": max_perplexity_change_pct}


__all__ = ["run_quant_bench", "SCHEMES", "scheme_variant", "pareto_front", "recommend", "llama_cpp_available"]
