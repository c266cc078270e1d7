"""`labkit bench spec`: every draft on every workload against the same engine without speculation, in one run.

Workloads: free generation (text continuation), chat answers, and three input-grounded tasks whose answers
reuse the prompt (copying, summarising, code editing). Each (draft, workload) cell runs the same greedy
requests as the plain engine, interleaved repeat by repeat, and reports decode tokens/s, the speedup over the
plain engine, acceptance per draft position, mean accepted tokens, tokens per target forward, the time spent
drafting and verifying per step, and whether the tokens were identical to plain decoding (they must be).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from labkit.device import describe_environment, seed_everything, synchronize
from labkit.engine.engine import Engine
from labkit.engine.model_runner import RowSpan
from labkit.model.llama import Transformer, from_hf
from labkit.model.loader import EMBEDDED_MODEL, eos_token_ids_of, load_model
from labkit.model.rewrites import apply_rewrites
from labkit.engine.spec_decode.speculator import SpeculativeConfig, Speculator

DRAFTS = ("ngram", "self-int8", "self-int4-g32", "self-bf16", "draft", "medusa", "eagle")
DEFAULT_DRAFTS = ("ngram", "self-int8", "self-int4-g32", "draft", "medusa", "eagle")
CPU_ONLY_DRAFTS = ("self-int4-g32",)
LEARNED = {"draft": "draft", "medusa": "medusa", "eagle": "eagle"}

_TEXT = ("The committee met on Tuesday to discuss the new library building. Members agreed that the building "
         "should have a larger children's section, a quiet reading room and a cafe. The budget is two million "
         "pounds, and construction will start in the spring. The old library will stay open until the new one "
         "is finished.")
_STORY = ("Maria opened the old wooden box that her grandmother had left her. Inside she found a silver key, a "
          "faded photograph of a lighthouse and a letter that began with the words: 'If you are reading this, "
          "the time has come to find the treasure.'")
_CODE = ("def total_price(items, tax_rate):\n    result = 0\n    for item in items:\n        result += item.price * "
         "item.count\n    result = result * (1 + tax_rate)\n    return round(result, 2)\n")
_CODE2 = ("def count_words(text):\n    counts = {}\n    for word in text.lower().split():\n        word = "
          "word.strip('.,!?')\n        counts[word] = counts.get(word, 0) + 1\n    return counts\n")


@dataclass(frozen=True)
class Prompt:
    text: str
    chat: bool = True
    prefix: str = ""  # the answer's first words, written after the chat template (steers the task)


WORKLOADS: dict[str, tuple[Prompt, ...]] = {
    "free": (Prompt("Once upon a time, in a small village at the edge of a great forest,", chat=False),
             Prompt("The history of the bicycle begins in the early nineteenth century, when", chat=False)),
    "chat": (Prompt("What are three tips for staying healthy?"), Prompt("How do airplanes stay in the air?")),
    "copy": (Prompt("Repeat the following text exactly.\n\n" + _STORY),
             Prompt("Repeat the following text exactly.\n\n" + _TEXT)),
    "summarise": (Prompt("Summarize this text.\n\n" + _TEXT), Prompt("Summarize this story.\n\n" + _STORY)),
    "code-edit": (Prompt("Add a docstring to this Python function and return the whole function.\n\n```python\n"
                         + _CODE + "```", prefix="```python\n"),
                  Prompt("Add type hints to this Python function and return the whole function.\n\n```python\n"
                         + _CODE2 + "```", prefix="```python\n")),
}
GROUNDED = ("copy", "summarise", "code-edit")


def check_names(kind: str, given, allowed) -> None:
    """ValueError naming the first of `given` that is not in `allowed`: `unknown <kind> 'x': choose from ...`."""
    bad = [g for g in given if g not in allowed]
    if bad:
        raise ValueError(f"unknown {kind} {bad[0]!r}: choose from {', '.join(allowed)}")


def encode(tokenizer, prompt: Prompt) -> list[int]:
    from labkit.engine.text import encode_prompt

    ids = encode_prompt(tokenizer, prompt.text, chat=prompt.chat)
    return ids + (tokenizer(prompt.prefix, add_special_tokens=False)["input_ids"] if prompt.prefix else [])


def verify_cost_ms(engine: Engine, context_len: int, num_tokens, repeats: int = 5) -> dict[int, float]:
    """Median ms of one forward that computes n new tokens after context_len cached ones (batch 1), for each n:
    what verifying n - 1 draft tokens costs."""
    key, costs = object(), {}
    ids = [0] * (context_len + max(num_tokens))
    if not engine.blocks.allocate(key, ids, [], len(ids)):
        raise ValueError(f"{len(ids)} tokens do not fit the free KV blocks")
    try:
        with torch.inference_mode():
            for n in num_tokens:
                rows = [RowSpan(key, ids, context_len, n)]
                engine.runner.forward(rows, [0])  # warm-up
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    engine.runner.forward(rows, [0], [n])
                    synchronize(engine.device)
                    times.append((time.perf_counter() - start) * 1e3)
                costs[n] = statistics.median(times)
    finally:
        engine.blocks.free(key)
    return costs


def build_target(loaded) -> Transformer:
    """The compact model every engine of a spec run shares (plain and speculative alike), with the default
    rewrites: on a CPU these include oneDNN-packed weights for verification's few-row products
    (`use_packed_gemm`; one-row plain decoding does not read them)."""
    return apply_rewrites(from_hf(loaded.model))


def make_proposers(names, target: Transformer, tokenizer, train_size: str = "default", progress: bool = False,
                   log: Callable[[str], object] | None = None, trained: dict | None = None,
                   compile_drafts: bool = True) -> dict:
    """name -> proposer for each draft named (learned drafts loaded from the cache, or trained first).

    compile_drafts: the self-drafts' one-token steps run compiled (their fast path, as in `bench quant`)."""
    from labkit.engine.spec_decode import proposers as drafts

    check_names("draft", names, DRAFTS)
    learned = [LEARNED[n] for n in names if n in LEARNED and (trained is None or LEARNED[n] not in trained)]
    if learned:
        from labkit.speculative.training import load_or_train

        trained = {**(trained or {}), **load_or_train(learned, target, tokenizer, size=train_size,
                                                      progress=progress, log=log)}
    out = {}
    for name in names:
        if name == "ngram":
            out[name] = drafts.NgramProposer()
        elif name.startswith("self-"):
            out[name] = drafts.ModelProposer(drafts.self_draft(target, name.split("-", 1)[1]), name=name,
                                             compile=compile_drafts)
        else:
            out[name] = trained[LEARNED[name]].proposer(target)
    return out


@dataclass(frozen=True)
class Variant:
    """One speculative engine to measure: a draft and how many tokens it proposes per step."""

    name: str  # the row's label, e.g. "ngram" or "ngram, gamma 8"
    draft: str  # a name from DRAFTS
    config: SpeculativeConfig


def variants_for(draft_names, num_draft_tokens: int = 4, gamma_policy: str = "fixed") -> list[Variant]:
    """One variant per draft and gamma policy ("fixed", "adaptive" or "both": each draft twice)."""
    policies = ("fixed", "adaptive") if gamma_policy == "both" else (gamma_policy,)
    out = []
    for policy in policies:
        config = SpeculativeConfig(num_speculative_tokens=num_draft_tokens, gamma_policy=policy,
                                   max_draft_tokens=max(16, num_draft_tokens))
        out += [Variant(name if len(policies) == 1 or policy == "fixed" else f"{name}, adaptive", name, config)
                for name in draft_names]
    return out


CLOCKS = ("wall", "cpu")


def _timed_generate(engine: Engine, prompts, params, clock: str) -> tuple[float, list[list[int]]]:
    """(tokens/s, each row's tokens) of one generate call.

    clock "wall": decode tokens/s after the first token (prefill excluded). "cpu": all new tokens over the
    process's CPU seconds for the whole call, prefill included: on a machine shared with other work it counts
    the work done rather than the time spent waiting for a core (run it with one torch thread)."""
    cpu_start = time.process_time()
    gens = engine.generate(prompts, params)
    cpu_s = time.process_time() - cpu_start
    if clock == "cpu":
        rate = sum(len(g.tokens) for g in gens) / cpu_s if cpu_s > 0 else float("nan")
    else:
        span = max(g.token_times_s[-1] for g in gens) - min(g.ttft_s for g in gens)
        rate = sum(len(g.tokens) - 1 for g in gens) / span if span > 0 else float("nan")
    return rate, [g.tokens for g in gens]


def _warm_up(plain: Engine, engines: dict[str, Engine], prompts: dict[str, list[list[int]]], batch_size: int,
             params) -> None:
    """Untimed runs: every engine's first calls allocate and fill caches; a compiled draft compiles once per
    context bucket, so each runs the longest prompt of every workload before timing."""
    first = next(iter(prompts.values()))[0]
    warm = plain.sampling_params(max_new_tokens=8, detokenize=False)
    for engine in (plain, *engines.values()):
        engine.generate([first] * batch_size, warm)
    warmed = set()
    for engine in engines.values():
        proposer = engine.speculator.proposer
        if proposer.describe().get("compile") and id(proposer) not in warmed:
            warmed.add(id(proposer))
            for workload_prompts in prompts.values():
                engine.generate([max(workload_prompts, key=len)] * batch_size, params)


def _time_workload(workload: str, plain: Engine, engines: dict[str, Engine], prompts: list[list[int]], repeats: int,
                   batch_size: int, params, clock: str, bar) -> tuple[dict[str, list[float]], dict[str, bool]]:
    """Each engine's tokens/s runs on one workload's prompts, repeats interleaved (so drift falls on every cell
    alike), and whether each speculative engine's tokens were identical to the plain engine's."""
    rates = {name: [] for name in ("plain", *engines)}
    reference: dict[int, list[list[int]]] = {}
    identical = {name: True for name in engines}
    for engine in engines.values():
        engine.speculator.reset_stats()
    for repeat in range(repeats):
        for name in ("plain", *engines):
            bar.set_postfix_str(f"{workload}: {name}, run {repeat + 1}/{repeats}")
            engine = plain if name == "plain" else engines[name]
            for i, prompt in enumerate(prompts):
                rate, tokens = _timed_generate(engine, [prompt] * batch_size, params, clock)
                rates[name].append(rate)
                if name == "plain":
                    reference.setdefault(i, tokens)
                elif tokens != reference[i]:
                    identical[name] = False
            bar.update()
    return rates, identical


# compiled self-drafts share the engine's one step code object: a graph per draft and context bucket
@torch._dynamo.config.patch(recompile_limit=64)
def run_spec_bench(draft_names=DEFAULT_DRAFTS, workloads=tuple(WORKLOADS), max_tokens: int = 96,
                   num_draft_tokens: int = 4, gamma_policy: str = "fixed", repeats: int = 2, batch_size: int = 1,
                   train_size: str = "default", model: str = EMBEDDED_MODEL, dummy: bool = False,
                   device: str = "cpu", log: Callable[[str], object] | None = None, progress: bool = False,
                   loaded=None, target: Transformer | None = None, proposers: dict | None = None,
                   env: dict | None = None, variants: list[Variant] | None = None, clock: str = "wall",
                   compile_drafts: bool = True) -> list[dict]:
    """Measure every (draft, workload) cell against the plain engine; return result rows (greedy, lossless).

    `variants` replaces the drafts and gamma (e.g. one draft at several gammas); `loaded`, `target` and
    `proposers` let a notebook reuse what it already built.
    """
    from tqdm.auto import tqdm

    check_names("workload", workloads, tuple(WORKLOADS))
    check_names("clock", (clock,), CLOCKS)
    variants = variants or variants_for(draft_names, num_draft_tokens, gamma_policy)
    draft_names = tuple(dict.fromkeys(v.draft for v in variants))
    labels = [v.name for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"variant names must differ, got {labels}")
    seed_everything(0)
    if loaded is None:
        loaded = load_model(model, device=device, dtype="fp32", dummy=dummy)
    if loaded.tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer; use a preset with one (e.g. tiny-smollm2)")
    target = target if target is not None else build_target(loaded)
    proposers = proposers if proposers is not None else make_proposers(draft_names, target, loaded.tokenizer,
                                                                       train_size, progress, log,
                                                                       compile_drafts=compile_drafts)
    env = env or describe_environment(loaded.device)
    # answers end at the model's EOS (<|im_end|> for SmolLM2), as they would in a server. No prefix caching:
    # every repeat (and every row of a batch) sends a workload's same prompts, which a warm cache would answer,
    # so the cpu clock (prefill included) would time the cache, and plain and speculative engines alike.
    common = dict(name=loaded.name, max_num_seqs=max(16, batch_size), enable_prefix_caching=False,
                  eos_token_ids=eos_token_ids_of(loaded.model, loaded.tokenizer))
    plain = Engine(target, loaded.tokenizer, **common)
    engines = {v.name: Engine(target, loaded.tokenizer, **common,
                              speculator=Speculator(proposers[v.draft], v.config)) for v in variants}
    configs = {v.name: v for v in variants}
    params = plain.sampling_params(max_new_tokens=max_tokens, detokenize=False)
    prompts = {w: [encode(loaded.tokenizer, p) for p in WORKLOADS[w]] for w in workloads}
    _warm_up(plain, engines, prompts, batch_size, params)
    rows = []
    total = len(workloads) * repeats * (1 + len(labels))
    with tqdm(total=total, desc="bench spec", unit="run", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for workload in workloads:
            rates, identical = _time_workload(workload, plain, engines, prompts[workload], repeats, batch_size,
                                              params, clock, bar)
            base = statistics.median(rates["plain"])
            rows.append(_row(Variant("plain", "plain", variants[0].config), workload, base, 1.0, None, True,
                             batch_size, max_tokens, len(prompts[workload]), repeats, train_size, loaded, env,
                             clock=clock))
            for name in labels:
                rate = statistics.median(rates[name])
                rows.append(_row(configs[name], workload, rate, rate / base, engines[name].speculator,
                                 identical[name], batch_size, max_tokens, len(prompts[workload]), repeats,
                                 train_size, loaded, env, plain_step_ms=1e3 * batch_size / base, clock=clock))
                if log:
                    s = engines[name].speculator.stats
                    log(f"{workload:10s} {name:10s} {rate:7.1f} tok/s  {rate / base:5.2f}x  "
                        f"accepted {s.mean_accepted_tokens or 0:.2f}/step" + ("" if identical[name] else
                                                                            "  TOKENS DIFFER"))
    for engine in (plain, *engines.values()):
        engine.blocks.check()
        assert engine.blocks.num_used_blocks == 0, "a run left KV blocks in use"
    return rows


def _row(variant, workload, tokens_per_s, speedup, spec, identical, batch_size, max_tokens, num_prompts, repeats,
         train_size, loaded, env, plain_step_ms: float | None = None, clock: str = "wall") -> dict:
    stats = spec.stats if spec is not None else None
    config = variant.config
    metrics = {"tokens_per_s": tokens_per_s, "speedup": speedup, "token_identical": identical}
    if stats is not None:
        steps = max(1, stats.num_steps)
        metrics.update(stats.to_dict())
        metrics.update(draft_ms_per_step=stats.draft_s / steps * 1e3, verify_ms_per_step=stats.verify_s / steps * 1e3)
        if plain_step_ms and stats.num_steps and clock == "wall":  # what bounds it: the draft, or verification
            metrics.update(plain_step_ms=plain_step_ms, verify_cost_ratio=metrics["verify_ms_per_step"] / plain_step_ms,
                           speedup_if_draft_free=(stats.tokens_per_step or 1) * plain_step_ms
                           / metrics["verify_ms_per_step"])
    return {
        "technique": "speculative",
        "params": {"variant": variant.name, "draft": variant.draft, "workload": workload,
                   "grounded": workload in GROUNDED,
                   "gamma": config.num_speculative_tokens, "gamma_policy": config.gamma_policy,
                   "batch_size": batch_size, "max_tokens": max_tokens, "num_prompts": num_prompts,
                   "repeats": repeats, "train_size": train_size, "greedy": True, "clock": clock,
                   "torch_threads": torch.get_num_threads(), "model": loaded.name, "prefix_caching": False,
                   "device": str(loaded.device), "speculative": spec.describe() if spec is not None else None},
        "metrics": metrics,
        "env": env,
    }


__all__ = ["build_target", "run_spec_bench", "make_proposers", "verify_cost_ms", "Variant", "variants_for",
           "check_names", "WORKLOADS", "GROUNDED", "DRAFTS", "DEFAULT_DRAFTS", "CPU_ONLY_DRAFTS", "CLOCKS",
           "Prompt", "encode"]
