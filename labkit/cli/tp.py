"""`labkit tp`: tensor-parallel generation and decode benchmarks launched with torchrun.

The parent (`labkit tp --nproc N ACTION ...`) checks that the model splits over the ranks, starts torchrun through
`labkit.parallel.launch.launch` and prints what rank 0 wrote. Every rank runs `python -m labkit.parallel.worker`
with the action's options (`GenerateOptions` or `BenchOptions`), built here from the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from labkit.cli.arguments import (Parser, add_label_option, add_store_options, comma_list, non_negative_int,
                                  positive_int, seed, server_port, utf8_text)
from labkit.parallel.distributed import LaunchConfig
from labkit.parallel.worker import (ACTIONS, LINEAR_LAYOUTS, QUANTIZE_CHOICES, ActionOptions, BenchOptions,
                                    GenerateOptions)


# -- the actions' options, parsed alike by `labkit tp` and by `action_options` ---------------------------------------
def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=ActionOptions.model, help="model (default: the embedded SmolLM2); with --dummy a "
                                                                "preset such as tiny-smollm2 or llama-1b")
    p.add_argument("--dummy", action="store_true", help="seeded random weights of a preset's shape (same on every rank)")
    p.add_argument("--device", default=ActionOptions.device,
                   help="auto, cpu or cuda: each rank takes cuda:LOCAL_RANK on a GPU node")
    p.add_argument("--dtype", default=ActionOptions.dtype, help="weights: fp32, bf16, fp16 (default: %(default)s)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help="int8 weight-only, applied before the split")
    p.add_argument("--linear-layout", choices=LINEAR_LAYOUTS, default=ActionOptions.linear_layout,
                   help="weight layout (see labkit bench decode; default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step, all-reduces included (compiled in the warm-up)")
    p.add_argument("--even-heads", action="store_true",
                   help="refuse a model whose heads do not divide by the world size, instead of dealing whole KV "
                        "groups out unevenly")
    p.add_argument("--seed", type=seed, default=ActionOptions.seed,
                   help="weights of a dummy model and sampling (default: %(default)s)")


def add_decode_run_options(p: argparse.ArgumentParser) -> None:
    """--batch-sizes, --max-tokens and --repeats of a TP decode benchmark (`labkit tp bench`, `labkit bench tp`),
    defaults from BenchOptions."""
    p.add_argument("--batch-sizes", type=comma_list(positive_int), default=BenchOptions.batch_sizes,
                   help="rows per step (default: 1)")
    p.add_argument("--max-tokens", type=positive_int, default=BenchOptions.max_tokens,
                   help="new tokens per run (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=BenchOptions.repeats,
                   help="timed runs per cell (default: %(default)s)")


def add_action_parsers(sub) -> None:
    """The `generate` and `bench` actions."""
    g = sub.add_parser("generate", help="generate from one prompt with the model split over the ranks",
                       description="Generate from one prompt; rank 0 prints the text. Every rank samples the same "
                                   "tokens (same logits, same seed), which the ranks check.")
    _add_model_options(g)
    g.add_argument("--prompt", type=utf8_text, default=GenerateOptions.prompt, help="the prompt (default: %(default)r)")
    g.add_argument("--max-tokens", type=positive_int, default=GenerateOptions.max_tokens,
                   help="new tokens (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=GenerateOptions.temperature,
                   help="0 is greedy (default: %(default)s)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print the result row as JSON on stdout; text on stderr")
    b = sub.add_parser("bench", help="decode tokens/s and compute against communication per token, by world size",
                       description="Decode throughput at each world size in one launch (ranks outside a world size "
                                   "wait), each rank's compute and all-reduce time per decode step, the LM head's "
                                   "time, and all-reduce latency and bandwidth by message size at the largest size.")
    _add_model_options(b)
    b.add_argument("--world-sizes", type=comma_list(positive_int), default=None,
                   help="e.g. 1,2 (default: 1 and --nproc); each at most the launched ranks")
    add_decode_run_options(b)
    b.add_argument("--prompt", type=utf8_text, default=BenchOptions.prompt, help="the prompt (default: %(default)r)")
    b.add_argument("--same-cores", action="store_true",
                   help="on a CPU, give the smaller world sizes all the cores of the launch (default: every rank "
                        "keeps its cores at every world size, like one GPU per rank)")
    b.add_argument("--all-reduce-bytes", type=comma_list(positive_int), default=BenchOptions.all_reduce_bytes,
                   metavar="BYTES,...", help="message sizes of the all-reduce sweep (default: 1 KiB to 4 MiB)")
    b.add_argument("--json", action="store_true", help="print the rows as JSON on stdout; table on stderr")


def options_from_args(args: argparse.Namespace) -> ActionOptions:
    """The worker's options from parsed command-line options (the fields of the action's options class)."""
    cls = ACTIONS[args.action]
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def action_options(argv: list[str]) -> ActionOptions:
    """An action's options from its command line (`["bench", "--max-tokens", "16"]`), defaults filled in."""
    parser = Parser(prog="labkit tp")
    add_action_parsers(parser.add_subparsers(dest="action", required=True))
    return options_from_args(parser.parse_args(argv))


# -- the parent --------------------------------------------------------------------------------------------------
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


def _launch_config(args) -> LaunchConfig:
    return LaunchConfig(nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                        master_port=args.master_port, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                        threads_per_rank=args.threads_per_rank)


def _check_world_sizes(args, config: LaunchConfig) -> str:
    """The split plan over every launched rank; ValueError for a model or --world-sizes that cannot run."""
    from labkit.parallel.launch import check_split

    plan = check_split(args, config.world_size)
    if args.action == "bench" and args.world_sizes:
        bad = [w for w in args.world_sizes if w > config.world_size]
        if bad:
            raise ValueError(f"--world-sizes {','.join(map(str, args.world_sizes))}: {bad[0]} is more than the "
                             f"{config.world_size} ranks launched (--nproc)")
        for w in args.world_sizes:
            check_split(args, w)
    return plan


def _print_result(args, rows: list[dict], result: dict) -> None:
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


def cmd_tp(args) -> int:
    from labkit.lab.results import append_rows, check_store, stamp_rows
    from labkit.parallel.launch import LaunchError, launch

    if args.action is None:
        raise ValueError(f"choose an action: {' or '.join(ACTIONS)} (labkit tp --help)")
    config = _launch_config(args)
    plan = _check_world_sizes(args, config)
    if args.action == "bench" and not args.no_save:
        check_store()
    print(f"labkit tp: {args.model} over {plan}", file=sys.stderr)
    try:
        result = launch(options_from_args(args), config, log=lambda m: print(f"labkit tp: {m}", file=sys.stderr))
    except LaunchError as exc:
        print(f"labkit tp: {exc}", file=sys.stderr)
        return 1
    if not result:
        print("labkit tp: done; the results are on the node of rank 0", file=sys.stderr)
        return 0
    rows = stamp_rows(result["rows"], label=args.label)
    if args.action == "bench" and not args.no_save:
        append_rows(rows)
    _print_result(args, rows, result)
    return 0


def add_launch_options(p: argparse.ArgumentParser) -> None:
    """torchrun's placement: processes per node, and for several nodes the rendezvous."""
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
    p = subparsers.add_parser(
        "tp", help="tensor-parallel generation and decode benchmark over torchrun (gloo on CPU, NCCL on CUDA)",
        description="Split the model over ranks started by torchrun (Megatron-style tensor parallelism: heads and "
                    "MLP\nfeatures split, one all-reduce per block half) and generate or benchmark. Rows come back "
                    "from rank 0\nstamped with the environment; bench rows go to the results store (runs/store/, or "
                    "$LABKIT_DATA_DIR).",
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
        add_store_options(action)
    p.set_defaults(func=cmd_tp)


__all__ = ["add_parser", "cmd_tp", "add_action_parsers", "add_decode_run_options", "action_options", "options_from_args", "format_rows"]
