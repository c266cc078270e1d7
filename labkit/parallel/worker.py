"""What each rank of a `labkit tp` launch runs: `python -m labkit.parallel.worker` under torchrun.

A rank joins the process group (gloo on CPU, NCCL on CUDA), builds the compact model, applies the rewrites in
order (quantization or layout, then `tp.tensor_parallel`), and drives the one engine. Ranks compute the same
logits, so they sample the same tokens; the workers check that they did. Rank 0 writes the result file the
parent (`labkit.parallel.launch.launch`) reads back.

Actions: `generate` (one prompt, its text and speed, `GenerateOptions`) and `bench` (decode tokens/s at each
world size side by side in one launch, each rank's compute against its all-reduce time per token, the LM head's
time, and all-reduce latency and bandwidth by message size, `BenchOptions`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from labkit.checks import check_choice, check_int, check_optional_int
from labkit.model.loader import EMBEDDED_MODEL
from labkit.parallel.distributed import DEFAULT_ALL_REDUCE_BYTES

DEFAULT_PROMPT = "Once upon a time, in a small village,"
DIST_TIMEOUT_S = 1800.0  # a rank may wait this long for another (e.g. while rank 0 measures world size 1 alone)
QUANTIZE_CHOICES = ("int8",)
LINEAR_LAYOUTS = ("auto", "nk", "kn")


# -- what a rank is asked to do ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActionOptions:
    """What both actions share: the model every rank builds and how, the prompt, the new tokens."""

    action: ClassVar[str] = ""
    model: str = EMBEDDED_MODEL  # with dummy, a preset such as tiny-smollm2 or llama-1b
    dummy: bool = False  # seeded random weights of a preset's shape (the same on every rank)
    device: str = "auto"  # auto, cpu or cuda: each rank takes cuda:LOCAL_RANK on a GPU node
    dtype: str = "fp32"
    quantize: str | None = None  # "int8" weight-only, applied before the split
    linear_layout: str = "auto"
    compile: bool = False  # torch.compile the decode step, all-reduces included
    even_heads: bool = False  # refuse heads that do not divide by the world size instead of dealing KV groups out
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 32

    def __post_init__(self):
        if self.quantize is not None:
            check_choice("quantization", self.quantize, QUANTIZE_CHOICES)
        check_choice("linear layout", self.linear_layout, LINEAR_LAYOUTS)
        check_int("seed", self.seed, 0)
        check_int("max_tokens", self.max_tokens)

    def to_json(self) -> dict:
        """What the parent hands every rank (`from_json` reads it back)."""
        return {"action": self.action, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class GenerateOptions(ActionOptions):
    """`generate`: one prompt; rank 0 returns the text and a `tp_generate` row."""

    action: ClassVar[str] = "generate"
    temperature: float = 0.0  # 0 is greedy
    chat: bool = False  # wrap the prompt in the model's chat template


@dataclass(frozen=True)
class BenchOptions(ActionOptions):
    """`bench`: decode tokens/s at each world size, compute against all-reduce time, the all-reduce sweep."""

    action: ClassVar[str] = "bench"
    world_sizes: tuple[int, ...] | None = None  # default: 1 and every launched rank
    batch_sizes: tuple[int, ...] = (1,)
    repeats: int = 3
    same_cores: bool = False  # on a CPU, the smaller world sizes get all the cores of the launch
    all_reduce_bytes: tuple[int, ...] = DEFAULT_ALL_REDUCE_BYTES

    def __post_init__(self):
        super().__post_init__()
        for name in ("world_sizes", "batch_sizes", "all_reduce_bytes"):
            value = getattr(self, name)
            if value is not None:  # lists arrive from JSON: keep tuples
                object.__setattr__(self, name, tuple(check_int(name, v) for v in value))
        check_int("repeats", self.repeats)


ACTIONS = {options.action: options for options in (GenerateOptions, BenchOptions)}


def from_json(payload: dict) -> ActionOptions:
    """The options `ActionOptions.to_json` wrote."""
    payload = dict(payload)
    action = check_choice("action", payload.pop("action", None), ACTIONS)
    return ACTIONS[action](**payload)


# -- the rank's work ------------------------------------------------------------------------------------------------
def _build(loaded, args, ctx):
    """The compact model with the rewrites in order: quantization or layout, then the split (when ctx is given)."""
    from labkit.model.rewrites import apply_rewrites
    from labkit.model.llama import from_hf
    from labkit.parallel.tp import tensor_parallel

    model = apply_rewrites(from_hf(loaded.model), linear_layout=args.linear_layout, quantize=args.quantize)
    if ctx is not None and ctx.world_size > 1:
        model = tensor_parallel(model, ctx, allow_uneven=not args.even_heads)
    return model


def _engine(model, loaded, ctx, compile: bool = False):
    from labkit.engine import Engine, EngineConfig
    from labkit.model.loader import eos_token_ids_of
    from labkit.parallel.tp import make_engine

    kwargs = dict(name=loaded.name, eos_token_ids=eos_token_ids_of(loaded.model, loaded.tokenizer),
                  config=EngineConfig(compile=compile))
    if ctx is None or ctx.world_size == 1:
        return Engine(model, loaded.tokenizer, **kwargs)
    return make_engine(model, loaded.tokenizer, ctx, **kwargs)


def _check_agree(tokens, ctx) -> None:
    """Raise unless every rank produced the same tokens."""
    from labkit.parallel.distributed import all_gather_objects

    every = all_gather_objects(tokens, ctx)
    differ = [r for r, t in enumerate(every) if t != every[0]]
    if differ:
        raise RuntimeError(f"ranks {differ} sampled other tokens than rank 0: the ranks' logits differ")


def _base_params(args, ctx, loaded, model) -> dict:
    from labkit.device import dtype_name

    plan = getattr(model, "tp_plan", None)
    return {"model": loaded.name, "device": str(ctx.device.type), "backend": ctx.backend, "world_size": ctx.world_size,
            "dtype": dtype_name(model.embed.weight.dtype), "quantize": args.quantize,
            "linear_layout": "kn" if "layout:kn" in model.rewrites else "nk", "seed": args.seed,
            "compile": bool(args.compile), "same_cores": bool(getattr(args, "same_cores", False)),
            "plan": plan.describe() if plan else "1 rank (whole model)",
            "heads_per_rank": [len(q) for q in plan.q_heads] if plan else [model.args.num_heads],
            "threads_per_rank": _torch_threads()}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_generate(args, ctx) -> dict:
    """Generate once on every rank; rank 0's result: {"rows": [row], "text": ...}."""
    import torch

    from labkit.device import describe_environment, seed_everything
    from labkit.model.loader import load_model
    from labkit.lab.results import make_row

    seed_everything(args.seed)
    loaded = load_model(args.model, device=ctx.device, dtype=args.dtype, dummy=args.dummy, seed=args.seed)
    model = _build(loaded, args, ctx)
    engine = _engine(model, loaded, ctx, args.compile)
    prompt = engine.encode(args.prompt, chat=args.chat) if loaded.tokenizer else [1, 2, 3]
    params = engine.sampling_params(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    with torch.inference_mode():
        gen = engine.generate([prompt], params)[0]
    _check_agree(gen.tokens, ctx)
    row = make_row("tp_generate", {**_base_params(args, ctx, loaded, model), "prompt_tokens": len(prompt),
                                   "max_tokens": args.max_tokens, "temperature": args.temperature},
                   {"num_tokens": gen.num_tokens, "ttft_ms": gen.ttft_s * 1e3,
                    "decode_tokens_per_s": gen.decode_tokens_per_s, "ranks_agree": True},
                   env=describe_environment(ctx.device))
    return {"rows": [row], "text": gen.text, "token_ids": gen.tokens}


def profile_decode(engine, prompt, batch_size: int, max_tokens: int) -> dict:
    """Drive the engine's step() through one batch of decodes and split each decode step's time into compute
    and all-reduce time (the prefill step is left out); per step, in ms. A compiled step is timed whole (its
    all-reduce time reads 0)."""
    import torch

    from labkit.device import synchronize

    stats = getattr(engine.model, "comm_stats", None)
    if engine.config.compile:  # a compiled step cannot time its all-reduces: whole steps only
        stats = None
    params = engine.sampling_params(max_new_tokens=max_tokens, ignore_eos=True, detokenize=False)
    for _ in range(batch_size):
        engine.add_request(prompt, params)
    step_s = []
    with torch.inference_mode():
        engine.step()  # the prefill
        if stats is not None:
            stats.reset()
            stats.enabled = True
        try:
            while engine.has_unfinished:
                synchronize(engine.device)
                start = time.perf_counter()
                engine.step()
                synchronize(engine.device)
                step_s.append(time.perf_counter() - start)
        finally:
            if stats is not None:
                stats.enabled = False
    steps = len(step_s)
    step_ms = 1e3 * sum(step_s) / steps
    comm_ms = 1e3 * stats.seconds / steps if stats is not None else 0.0
    return {"step_ms": step_ms, "comm_ms": comm_ms, "compute_ms": step_ms - comm_ms, "num_steps": steps,
            "all_reduces_per_step": stats.num_calls / steps if stats is not None else 0,
            "bytes_per_all_reduce": stats.num_bytes / stats.num_calls if stats is not None and stats.num_calls else 0}


def _lm_head_ms(model, device) -> float:
    """Time of the (unsplit) LM head over one row: the replicated part of a decode step."""
    import torch

    from labkit.lab.stats import measure

    hidden = torch.zeros(1, model.args.dim, dtype=model.act_dtype, device=device)
    with torch.inference_mode():
        return measure(lambda: model.logits(hidden), repeats=20, warmup=3, device=device, max_time_s=1.0).median_ms


def _shape(model) -> dict:
    """What the scaling model needs of a (whole or split) model: layers, width, bytes of one layer's weights as
    stored on this rank, bytes of the LM head."""
    def nbytes(module) -> int:
        return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))

    return {"num_layers": model.args.num_layers, "dim": model.args.dim, "layer_weight_bytes": nbytes(model.layers[0]),
            "head_weight_bytes": nbytes(model.lm_head)}


def _bench_world(args, ctx, loaded, prompt, full_tokens: dict) -> list[dict]:
    """Rows of one world size: tokens/s per batch size, with each rank's compute and communication per step."""
    import torch
    import torch.distributed as dist

    from labkit.device import describe_environment
    from labkit.parallel.distributed import all_gather_objects
    from labkit.lab.results import make_row

    from labkit.lab.stats import memory_bandwidth_gbps

    model = _build(loaded, args, ctx)
    engine = _engine(model, loaded, ctx, args.compile)
    lm_head_ms = _lm_head_ms(model, ctx.device)
    dist.barrier(group=ctx.group)  # every rank streams memory at once: the bandwidth a rank gets when all run
    bandwidth = min(all_gather_objects(memory_bandwidth_gbps(device=ctx.device), ctx))
    shape = _shape(model)
    rows = []
    for batch in args.batch_sizes:
        params = engine.sampling_params(max_new_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
        with torch.inference_mode():
            engine.generate([prompt] * batch, engine.sampling_params(max_new_tokens=4, ignore_eos=True))  # warm-up
            rates, tokens = [], None
            for _ in range(args.repeats):
                gens = engine.generate([prompt] * batch, params)
                times = gens[0].token_times_s
                rates.append(batch * (len(times) - 1) / (times[-1] - times[0]))
                tokens = [g.tokens for g in gens]
        _check_agree(tokens, ctx)
        if ctx.world_size == 1:
            full_tokens[batch] = tokens
        profile = profile_decode(engine, prompt, batch, args.max_tokens)
        per_rank = all_gather_objects({"rank": ctx.rank, **profile, "lm_head_ms": lm_head_ms}, ctx)
        if not ctx.is_main:
            continue
        slowest = max(per_rank, key=lambda p: p["compute_ms"])
        row = make_row("tp_decode", {**_base_params(args, ctx, loaded, model), **shape, "batch_size": batch,
                                     "max_tokens": args.max_tokens, "prompt_tokens": len(prompt),
                                     "repeats": args.repeats},
                       {"tokens_per_s": statistics.median(rates), "tokens_per_s_runs": rates,
                        "step_ms": statistics.fmean(p["step_ms"] for p in per_rank),
                        "compute_ms_per_step": slowest["compute_ms"],
                        "comm_ms_per_step": max(p["comm_ms"] for p in per_rank),
                        "compute_ms_per_layer": slowest["compute_ms"] / model.args.num_layers,
                        "lm_head_ms": lm_head_ms, "bandwidth_gbps": bandwidth, "per_rank": per_rank,
                        "all_reduces_per_step": per_rank[0]["all_reduces_per_step"],
                        "bytes_per_all_reduce": per_rank[0]["bytes_per_all_reduce"],
                        "ranks_agree": True,
                        "tokens_match_world_size_1": tokens == full_tokens[batch]
                        if ctx.world_size > 1 and batch in full_tokens else None},
                       env=describe_environment(ctx.device))
        rows.append(row)
    del engine, model
    return rows


def run_bench(args, ctx) -> dict:
    """Every world size of --world-sizes in turn (the ranks outside one wait at a barrier), then the all-reduce
    sweep over all ranks; rank 0's result: {"rows": [...]}."""
    import torch
    import torch.distributed as dist

    from labkit.device import describe_environment, seed_everything
    from labkit.parallel.distributed import fit_alpha_beta, measure_all_reduce
    from labkit.model.loader import load_model
    from labkit.lab.results import make_row

    sizes = sorted(set(args.world_sizes or (1, ctx.world_size)))
    if sizes[-1] > ctx.world_size:
        raise ValueError(f"--world-sizes {','.join(map(str, sizes))} needs {sizes[-1]} ranks; {ctx.world_size} were "
                         "launched (--nproc)")
    seed_everything(args.seed)
    loaded = load_model(args.model, device=ctx.device, dtype=args.dtype, dummy=args.dummy, seed=args.seed)
    prompt = loaded.tokenizer.encode(args.prompt) if loaded.tokenizer else list(range(1, 17))
    threads = torch.get_num_threads()  # this rank's share of the node's cores
    rows, full_tokens = [], {}
    for size in sizes:
        sub = ctx.subgroup(size)
        if sub is not None:
            if ctx.device.type == "cpu" and args.same_cores:  # fewer ranks, more threads each
                torch.set_num_threads(max(1, threads * ctx.world_size // size))
            rows += _bench_world(args, sub, loaded, prompt, full_tokens)
            torch.set_num_threads(threads)
        dist.barrier()
    if ctx.world_size > 1:
        dim_bytes = loaded.model.config.hidden_size * 4  # one decode row's activations, fp32
        message_sizes = sorted({*args.all_reduce_bytes, *(dim_bytes * b for b in args.batch_sizes)})
        timings = measure_all_reduce(ctx, message_sizes)
        alpha_us, bandwidth = fit_alpha_beta(timings)
        env = describe_environment(ctx.device)
        for t in timings:
            rows.append(make_row("tp_allreduce", {"world_size": ctx.world_size, "backend": ctx.backend,
                                                  "device": ctx.device.type, "num_bytes": t.num_bytes,
                                                  "dtype": "fp32"},
                                 {"latency_us": t.latency_us, "p10_us": t.p10_us, "p90_us": t.p90_us,
                                  "algbw_gbps": t.algbw_gbps, "busbw_gbps": t.busbw_gbps,
                                  "num_repeats": t.num_repeats, "fit_alpha_us": alpha_us,
                                  "fit_bandwidth_gbps": bandwidth}, env=env))
    if ctx.is_main:
        _add_speedups(rows)
    return {"rows": rows}


def _add_speedups(rows: list[dict]) -> None:
    """Each decode row's tokens/s as a ratio to world size 1 at the same batch size, from the same launch."""
    decode = [r for r in rows if r["technique"] == "tp_decode"]
    for row in decode:
        base = next((r for r in decode if r["params"]["world_size"] == 1
                     and r["params"]["batch_size"] == row["params"]["batch_size"]), None)
        row["metrics"]["speedup_vs_1"] = row["metrics"]["tokens_per_s"] / base["metrics"]["tokens_per_s"] \
            if base else None


def worker_options(argv: list[str] | None = None) -> tuple[argparse.Namespace, ActionOptions]:
    """What `launch` hands every rank: (its own options: result file, options file, threads; the action's
    options). Sets the rank's torch threads."""
    import torch

    parser = argparse.ArgumentParser(prog="labkit tp (rank)")
    parser.add_argument("--result-file", type=Path, required=True)
    parser.add_argument("--args-file", type=Path, required=True, help="the action's options as JSON")
    parser.add_argument("--threads", type=int, default=None)
    own = parser.parse_args(argv)
    check_optional_int("--threads", own.threads)
    if own.threads:
        torch.set_num_threads(own.threads)
    return own, from_json(json.loads(own.args_file.read_text()))


def worker_main(argv: list[str] | None = None) -> int:
    """The program torchrun starts on every rank: run one action, rank 0 writes the result file."""
    import torch.distributed as dist

    from labkit.parallel.distributed import init_distributed
    from labkit.lab.results import write_json_atomic

    own, args = worker_options(argv)
    ctx = init_distributed(args.device, timeout_s=DIST_TIMEOUT_S)
    try:
        result = (run_generate if args.action == "generate" else run_bench)(args, ctx)
        if ctx.is_main:
            write_json_atomic(own.result_file, result)
    except ValueError as exc:  # bad input: one line, written once
        if ctx.is_main:
            write_json_atomic(own.result_file, {"error": str(exc)})
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


__all__ = ["ActionOptions", "GenerateOptions", "BenchOptions", "ACTIONS", "DEFAULT_PROMPT", "from_json",
           "run_generate", "run_bench", "profile_decode", "worker_options", "worker_main"]

if __name__ == "__main__":
    sys.exit(worker_main())
