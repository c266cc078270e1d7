"""`labkit tp`: tensor-parallel generation and decode benchmarks launched with torchrun; the program each rank runs.

The parent (`labkit tp --nproc N ACTION ...`) checks that the model splits over the ranks, starts torchrun
(`--standalone` on one node, its rendezvous options across nodes), and reads back what rank 0 wrote: result
rows in the lab's form, stamped with the environment, and the generated text. Every rank runs
`python -m labkit.parallel.launch ACTION ...`: it joins the process group (gloo on CPU, NCCL on CUDA), builds the
compact model, applies the rewrites in order (quantization or layout, then `tp.tensor_parallel`), and drives
the one engine. Ranks compute the same logits, so they sample the same tokens; the workers check that they did.

Actions: `generate` (one prompt, its text and speed) and `bench` (decode tokens/s at each world size side by
side in one launch, each rank's compute against its all-reduce time per token, the LM head's time, and
all-reduce latency and bandwidth by message size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labkit.cli.arguments import comma_list, positive_float, positive_int, seed, utf8_text
from labkit.parallel.distributed import DEFAULT_ALL_REDUCE_BYTES, LaunchConfig, torchrun_command

ACTIONS = ("generate", "bench")
DEFAULT_PROMPT = "Once upon a time, in a small village,"
WORKER_MODULE = "labkit.parallel.launch"
LOG_TAIL_LINES = 12
DIST_TIMEOUT_S = 1800.0  # a rank may wait this long for another (e.g. while rank 0 measures world size 1 alone)


# -- options shared by the parent and the workers ---------------------------------------------------------------
def _add_model_options(p: argparse.ArgumentParser) -> None:
    from labkit.model.loader import EMBEDDED_MODEL

    p.add_argument("--model", default=EMBEDDED_MODEL, help="model (default: the embedded SmolLM2); with --dummy a "
                                                           "preset such as tiny-smollm2 or llama-1b")
    p.add_argument("--dummy", action="store_true", help="seeded random weights of a preset's shape (same on every rank)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda: each rank takes cuda:LOCAL_RANK on a GPU node")
    p.add_argument("--dtype", default="fp32", help="weights: fp32, bf16, fp16 (default: %(default)s)")
    p.add_argument("--quantize", choices=("int8",), default=None, help="int8 weight-only, applied before the split")
    p.add_argument("--linear-layout", choices=("auto", "nk", "kn"), default="auto",
                   help="weight layout (see labkit bench decode; default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step, all-reduces included (compiled in the warm-up)")
    p.add_argument("--even-heads", action="store_true",
                   help="refuse a model whose heads do not divide by the world size, instead of dealing whole KV "
                        "groups out unevenly")
    p.add_argument("--seed", type=seed, default=0, help="weights of a dummy model and sampling (default: %(default)s)")


def add_action_parsers(sub) -> None:
    """The `generate` and `bench` actions, parsed alike by `labkit tp` and by each rank."""
    g = sub.add_parser("generate", help="generate from one prompt with the model split over the ranks",
                       description="Generate from one prompt; rank 0 prints the text. Every rank samples the same "
                                   "tokens (same logits, same seed), which the ranks check.")
    _add_model_options(g)
    g.add_argument("--prompt", type=utf8_text, default=DEFAULT_PROMPT, help="the prompt (default: %(default)r)")
    g.add_argument("--max-tokens", type=positive_int, default=32, help="new tokens (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print the result row as JSON on stdout; text on stderr")
    b = sub.add_parser("bench", help="decode tokens/s and compute against communication per token, by world size",
                       description="Decode throughput at each world size in one launch (ranks outside a world size "
                                   "wait), each rank's compute and all-reduce time per decode step, the LM head's "
                                   "time, and all-reduce latency and bandwidth by message size at the largest size.")
    _add_model_options(b)
    b.add_argument("--world-sizes", type=comma_list(positive_int), default=None,
                   help="e.g. 1,2 (default: 1 and --nproc); each at most the launched ranks")
    b.add_argument("--batch-sizes", type=comma_list(positive_int), default=(1,), help="rows per step (default: 1)")
    b.add_argument("--max-tokens", type=positive_int, default=32, help="new tokens per run (default: %(default)s)")
    b.add_argument("--repeats", type=positive_int, default=3, help="timed runs per cell (default: %(default)s)")
    b.add_argument("--prompt", type=utf8_text, default=DEFAULT_PROMPT, help="the prompt (default: %(default)r)")
    b.add_argument("--same-cores", action="store_true",
                   help="on a CPU, give the smaller world sizes all the cores of the launch (default: every rank "
                        "keeps its cores at every world size, like one GPU per rank)")
    b.add_argument("--all-reduce-bytes", type=comma_list(positive_int), default=DEFAULT_ALL_REDUCE_BYTES,
                   metavar="BYTES,...", help="message sizes of the all-reduce sweep (default: 1 KiB to 4 MiB)")
    b.add_argument("--json", action="store_true", help="print the rows as JSON on stdout; table on stderr")


def model_args(name: str, dummy: bool):
    """The model's shape (ModelArgs) from its config alone, without weights: for checking a split up front."""
    from transformers import AutoConfig

    from labkit.model.llama import ModelArgs
    from labkit.model.loader import EMBEDDED_ALIASES, convert_embedded, dummy_config

    if dummy:
        return ModelArgs.from_hf(dummy_config(name))
    path = convert_embedded() if name in EMBEDDED_ALIASES else name
    return ModelArgs.from_hf(AutoConfig.from_pretrained(path))


# -- the workers -------------------------------------------------------------------------------------------------
def _build(loaded, args, ctx):
    """The compact model with the rewrites in order: quantization or layout, then the split (when ctx is given)."""
    from labkit.model.llama import from_hf
    from labkit.model.rewrites import apply_rewrites
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


def worker_options(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """What `launch` hands every rank: (its own options: result file, args file, threads; the action's options).
    Sets the rank's torch threads."""
    import torch

    from labkit.cli.arguments import Parser

    parser = Parser(prog="labkit tp (rank)")
    parser.add_argument("--result-file", type=Path, required=True)
    parser.add_argument("--args-file", type=Path, required=True, help="the action's options as JSON")
    parser.add_argument("--threads", type=positive_int, default=None)
    own = parser.parse_args(argv)
    if own.threads:
        torch.set_num_threads(own.threads)
    return own, argparse.Namespace(**json.loads(own.args_file.read_text()))


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


# -- the parent --------------------------------------------------------------------------------------------------
class LaunchError(RuntimeError):
    """The ranks did not finish; the message holds the last lines of their log."""


def check_split(args, world_size: int) -> str:
    """Refuse, before starting any process, a model that cannot be split over world_size ranks; the plan."""
    from labkit.parallel.tp import plan_tensor_parallel

    plan = plan_tensor_parallel(model_args(args.model, args.dummy), world_size, allow_uneven=not args.even_heads,
                                name=args.model)
    return plan.describe()


def action_options(argv: list[str]) -> argparse.Namespace:
    """An action's options from its command line (`["bench", "--max-tokens", "16"]`), defaults filled in."""
    from labkit.cli.arguments import Parser

    parser = Parser(prog="labkit tp")
    add_action_parsers(parser.add_subparsers(dest="action", required=True))
    return parser.parse_args(argv)


def launch(options: argparse.Namespace, config: LaunchConfig, log=None, timeout_s: float | None = None,
           program: str = WORKER_MODULE) -> dict:
    """Run one action (its options from `action_options` or the `labkit tp` parser) on config.nproc ranks
    through torchrun and return what rank 0 wrote: {"rows": [...], ...}. ValueError with the ranks' message for
    bad input, LaunchError when the ranks failed otherwise; on a node other than rank 0's, {} (the results are
    on rank 0's node). `program` is what each rank runs (a module or a .py script taking worker_main's
    options): this module's worker_main unless a test brings its own."""
    import labkit

    wanted = {k: v for k, v in vars(options).items() if not callable(v)}
    with tempfile.TemporaryDirectory(prefix="labkit-tp-") as tmp:
        result_file, args_file, log_file = Path(tmp) / "result.json", Path(tmp) / "args.json", Path(tmp) / "ranks.log"
        args_file.write_text(json.dumps(wanted))
        cmd = torchrun_command(config, program, ["--result-file", str(result_file), "--args-file",
                                                       str(args_file), "--threads", str(config.threads())])
        root = str(Path(labkit.__file__).resolve().parent.parent)  # the ranks import this labkit, installed or not
        env = {**os.environ, "OMP_NUM_THREADS": str(config.threads()),
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        if log:
            log(f"starting {config.world_size} ranks with torchrun for {options.action}")
        with open(log_file, "wb") as out:
            try:
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise LaunchError(f"the ranks did not finish within {timeout_s:g} s") from None
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        if "error" in result:
            raise ValueError(result["error"])
        if proc.returncode != 0:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-LOG_TAIL_LINES:]
            raise LaunchError(f"torchrun exited with status {proc.returncode}; the ranks' last lines:\n"
                              + "\n".join(tail))
        return result


def _launch_config(args) -> LaunchConfig:
    return LaunchConfig(nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                        master_port=args.master_port, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                        threads_per_rank=args.threads_per_rank)


def format_rows(rows: list[dict]) -> str:
    """A table of decode rows (tokens/s, speed-up, compute and all-reduce ms per step) and all-reduce rows."""
    lines = []
    decode = [r for r in rows if r["technique"] == "tp_decode"]
    if decode:
        head = f"{'ranks':>5s} {'batch':>5s} {'tok/s':>8s} {'× 1':>6s} {'compute ms':>10s} {'comm ms':>8s} " \
               f"{'same tokens':>11s}  heads"
        lines += [head, "-" * len(head)]
        for r in decode:
            p, m = r["params"], r["metrics"]
            speedup = f"{m['speedup_vs_1']:.2f}" if m.get("speedup_vs_1") else "n/a"
            same = {True: "yes", False: "NO", None: "n/a"}[m.get("tokens_match_world_size_1")]
            lines.append(f"{p['world_size']:5d} {p['batch_size']:5d} {m['tokens_per_s']:8.1f} {speedup:>6s} "
                         f"{m['compute_ms_per_step']:10.2f} {m['comm_ms_per_step']:8.2f} {same:>11s}  {p['plan']}")
    sweep = [r for r in rows if r["technique"] == "tp_allreduce"]
    if sweep:
        m0 = sweep[0]["metrics"]
        rate = f"bytes / {m0['fit_bandwidth_gbps']:.2f} GB/s" if m0["fit_bandwidth_gbps"] else \
            "no measurable bytes term (latency did not grow with size)"  # an infinite fit is stored as null
        lines.append(f"all-reduce over {sweep[0]['params']['world_size']} ranks ({sweep[0]['params']['backend']}): "
                     f"fit {m0['fit_alpha_us']:.0f} µs + {rate}")
        lines += [f"  {r['params']['num_bytes']:>9d} B  {r['metrics']['latency_us']:9.1f} µs  "
                  f"{r['metrics']['algbw_gbps']:7.3f} GB/s" for r in sweep]
    if rows:
        env = rows[0]["env"]
        lines.append(f"hardware: {env.get('gpu') or env['cpu']} ({env['num_cpus']} cpus, {env['cpu_capability']})")
    return "\n".join(lines)


def cmd_tp(args) -> int:
    from labkit.lab.results import append_rows, check_store, stamp_rows

    if args.action is None:
        raise ValueError(f"choose an action: {' or '.join(ACTIONS)} (labkit tp --help)")
    config = _launch_config(args)
    plan = check_split(args, config.world_size)
    if args.action == "bench" and args.world_sizes:
        bad = [w for w in args.world_sizes if w > config.world_size]
        if bad:
            raise ValueError(f"--world-sizes {','.join(map(str, args.world_sizes))}: {bad[0]} is more than the "
                             f"{config.world_size} ranks launched (--nproc)")
        for w in args.world_sizes:
            check_split(args, w)
    if args.action == "bench" and not args.no_save:
        check_store()
    print(f"labkit tp: {args.model} over {plan}", file=sys.stderr)
    try:
        result = launch(args, config, log=lambda m: print(f"labkit tp: {m}", file=sys.stderr))
    except LaunchError as exc:
        print(f"labkit tp: {exc}", file=sys.stderr)
        return 1
    if not result:
        print("labkit tp: done; the results are on the node of rank 0", file=sys.stderr)
        return 0
    rows = stamp_rows(result["rows"], label=args.label)
    if args.action == "bench" and not args.no_save:
        append_rows(rows)
    if args.action == "generate":
        print(result["text"] if result.get("text") is not None else result["token_ids"],
              file=sys.stderr if args.json else sys.stdout)
        m = rows[0]["metrics"]
        print(f"labkit tp: {m['num_tokens']} tokens at {m['decode_tokens_per_s']:.1f} tok/s over "
              f"{rows[0]['params']['world_size']} ranks; every rank sampled the same tokens", file=sys.stderr)
    else:
        print(format_rows(rows), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def add_launch_options(p: argparse.ArgumentParser) -> None:
    """torchrun's placement: processes per node, and for several nodes the rendezvous."""
    from labkit.cli.arguments import non_negative_int, server_port

    p.add_argument("--nproc", type=positive_int, default=2, help="ranks on this node (default: %(default)s)")
    p.add_argument("--nnodes", type=positive_int, default=1, help="nodes (default: %(default)s)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="several nodes: the c10d rendezvous (the same on every node)")
    p.add_argument("--rdzv-id", default=None, help="several nodes: a job id, the same on every node")
    p.add_argument("--master-addr", default=None, help="several nodes, static rendezvous: rank 0's node")
    p.add_argument("--master-port", type=server_port, default=None, help="with --master-addr (default: 29500)")
    p.add_argument("--node-rank", type=non_negative_int, default=None, help="with --master-addr: this node's index")
    p.add_argument("--threads-per-rank", type=positive_int, default=None,
                   help="torch threads in each rank (default: this node's cores / --nproc)")


def add_parser(subparsers) -> None:
    """Register `labkit tp` on the CLI's subparsers."""
    from labkit.cli.arguments import add_label_option

    p = subparsers.add_parser(
        "tp", help="tensor-parallel generation and decode benchmark over torchrun (gloo on CPU, NCCL on CUDA)",
        description="Split the model over ranks started by torchrun (Megatron-style tensor parallelism: heads and "
                    "MLP\nfeatures split, one all-reduce per block half) and generate or benchmark. Rows come back "
                    "from rank 0\nstamped with the environment; bench rows go to data/results.jsonl.",
        epilog="examples:\n"
               "  labkit tp --nproc 2 generate --prompt 'The capital of France is' --max-tokens 16\n"
               "  labkit tp --nproc 2 bench --max-tokens 32 --json\n"
               "  labkit tp --nproc 2 bench --model tiny-smollm2 --dummy --world-sizes 1,2\n"
               "  # two nodes of 8 GPUs: the same line on each node\n"
               "  labkit tp --nproc 8 --nnodes 2 --rdzv-endpoint node0:29400 --rdzv-id job1 bench --device cuda "
               "--dtype bf16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_options(p)
    # not required by argparse, so that a bad option value before the action is the error named
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    add_action_parsers(sub)
    for action in sub.choices.values():
        add_label_option(action)
        action.add_argument("--no-save", action="store_true", help="write nothing under data/")
    p.set_defaults(func=cmd_tp)


__all__ = ["ACTIONS", "add_action_parsers", "model_args", "run_generate", "run_bench", "profile_decode",
           "worker_options", "worker_main", "LaunchError", "check_split", "action_options", "launch", "format_rows", "cmd_tp", "add_parser"]

if __name__ == "__main__":
    sys.exit(worker_main())
