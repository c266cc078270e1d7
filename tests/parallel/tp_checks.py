"""Tensor-parallel checks run by tests/parallel/test_tp.py on 2 ranks (gloo, CPU) through `labkit.parallel.launch.launch`, the
parent `labkit tp` uses: one process group, one start-up, every case. Each rank compares its split model with
the whole model it also builds, then runs the `bench` action it was handed (`worker.run_bench`, the worker's
own code); rank 0 writes what was measured (logit differences, tokens, head counts, the bench rows) to the
result file, and the tests assert on it. The command line is `worker.worker_options`'.
"""

import sys
import time

import torch

from labkit.parallel.distributed import all_gather_objects, init_distributed
from labkit.engine import Engine, EngineConfig
from labkit.model.rewrites import apply_rewrites
from labkit.parallel.worker import run_bench, worker_options
from labkit.model.llama import from_hf
from labkit.model.loader import DUMMY_CONFIGS, load_model
from labkit.lab.results import write_json_atomic
from labkit.model.sampling import SamplingParams
from labkit.parallel.tp import TensorParallelError, tensor_parallel, make_engine

PROMPTS = ([5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31], [400, 2, 2, 9])


def compare(loaded, ctx, layout="auto", quantize=None, allow_uneven=True, new_tokens=16, prompts=PROMPTS,
            sample: bool = True, kv_cache_dtype: str = "auto") -> dict:
    """The split model against the whole one: prompt logits (prefilled in chunks), greedy tokens of a batch of
    ragged prompts, sampled tokens, and what the split did to the heads and the cache (both engines with a cache
    of kv_cache_dtype)."""
    whole = apply_rewrites(from_hf(loaded.model), linear_layout=layout, quantize=quantize)
    # a second build, not a copy: it shares the HF model's tensors until the split replaces them with its shards
    split = tensor_parallel(apply_rewrites(from_hf(loaded.model), linear_layout=layout, quantize=quantize), ctx,
                            allow_uneven=allow_uneven)
    ref = Engine(whole, loaded.tokenizer, num_kv_blocks=64, kv_cache_dtype=kv_cache_dtype)
    eng = make_engine(split, loaded.tokenizer, ctx, config=EngineConfig(kv_cache_dtype=kv_cache_dtype))
    greedy = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, detokenize=False)
    sampled = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, detokenize=False, temperature=0.8, seed=3)
    a, b = ref.prompt_logits(prompts[0], chunk_size=4), eng.prompt_logits(prompts[0], chunk_size=4)
    stats = split.comm_stats
    stats.reset()
    stats.enabled = True
    tokens = [g.tokens for g in eng.generate(list(prompts), greedy)]
    stats.enabled = False
    forwards = eng.stats().num_steps
    out = {
        "max_abs_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
        "argmax_equal": bool((a.argmax(-1) == b.argmax(-1)).all()),
        "greedy_whole": [g.tokens for g in ref.generate(list(prompts), greedy)], "greedy_split": tokens,
        "sampled_split": eng.generate([prompts[0]], sampled)[0].tokens if sample else None,
        "heads": [len(q) for q in split.tp_plan.q_heads], "kv_heads": [len(k) for k in split.tp_plan.kv_heads],
        "local_heads": split.layers[0].attn.num_heads, "local_kv_heads": split.num_kv_heads,
        "cache_kv_heads": eng.cache.k[0].shape[1], "num_kv_blocks": eng.blocks.num_blocks,
        "all_reduces": stats.num_calls, "num_layers": whole.args.num_layers,
        "forwards": forwards, "free_blocks_after": eng.blocks.num_free_blocks,
    }
    out["sampled_whole"] = ref.generate([prompts[0]], sampled)[0].tokens if sample else None
    return out


def main(argv: list[str]) -> None:
    own, options = worker_options(argv)
    ctx = init_distributed("cpu")
    report = {"world_size": ctx.world_size, "cases": {}}
    tiny = load_model("tiny-llama", dummy=True, device="cpu", with_tokenizer=False)
    cases = {
        "tiny-nk": lambda: compare(tiny, ctx, layout="nk"),
        "tiny-kn": lambda: compare(tiny, ctx, layout="kn"),
        "tiny-int8": lambda: compare(tiny, ctx, quantize="int8"),
        # an int8 KV cache: each rank quantizes its own KV heads, with the scales the whole model gives them
        "tiny-kv-int8": lambda: compare(tiny, ctx, layout="nk", kv_cache_dtype="int8"),
        "tiny-qwen2-bias": lambda: compare(load_model("tiny-qwen2", dummy=True, device="cpu", with_tokenizer=False),
                                           ctx, layout="nk"),
        # one KV head (multi-query attention): both ranks hold it, each computes two of the four query heads
        "tiny-mqa": lambda: compare(load_model({**DUMMY_CONFIGS["tiny-llama"], "num_key_value_heads": 1},
                                               dummy=True, device="cpu", with_tokenizer=False), ctx, layout="nk"),
    }
    for name, case in cases.items():
        start = time.perf_counter()
        report["cases"][name] = case()
        print(f"rank {ctx.rank}: {name} {time.perf_counter() - start:.1f} s", file=sys.stderr)
    embedded = load_model(device="cpu", with_tokenizer=False)
    try:
        tensor_parallel(from_hf(embedded.model), ctx, allow_uneven=False)
        report["embedded_even_refusal"] = None
    except TensorParallelError as exc:
        report["embedded_even_refusal"] = str(exc)
    # "Once upon a time, in a small village," and "The capital of France is" in SmolLM2's vocabulary
    prompts = ([6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 28], [504, 3575, 282, 4649, 314])
    start = time.perf_counter()
    report["cases"]["embedded-uneven"] = compare(embedded, ctx, layout="nk", new_tokens=12, prompts=prompts,
                                                  sample=False)
    print(f"rank {ctx.rank}: embedded {time.perf_counter() - start:.1f} s", file=sys.stderr)
    report["bench_rows"] = run_bench(options, ctx).get("rows")
    every = all_gather_objects(report, ctx)
    if ctx.is_main:
        report["ranks"] = [{name: {k: case[k] for k in ("greedy_split", "sampled_split", "local_heads",
                                                        "local_kv_heads", "cache_kv_heads", "num_kv_blocks")}
                            for name, case in r["cases"].items()} for r in every]
        write_json_atomic(own.result_file, report)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
