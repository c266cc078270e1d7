"""`labkit bench tp`: tensor-parallel decode at world sizes 1 and 2 (or more) side by side in one torchrun launch.

Each world size's tokens/s, its ratio to world size 1 from the same launch, each rank's compute against its
all-reduce time per decode step, all-reduce latency and bandwidth by message size, and what the alpha-beta model
(`labkit.parallel.scaling`), fed by world size 1's compute and the measured all-reduce fit, predicts for the larger sizes.
Rows go to data/results.jsonl and data/bench_tp.json.
"""

from __future__ import annotations

import sys

from labkit.cli.arguments import add_run_output_options, comma_list, positive_int


def add_predictions(rows: list[dict]) -> None:
    """Each decode row of a world size > 1 gains the model's prediction from the other rows of its launch."""
    from labkit.parallel.scaling import predict_from_rows

    decode = [r for r in rows if r["technique"] == "tp_decode"]
    sweep = [r for r in rows if r["technique"] == "tp_allreduce"]
    for row in decode:
        w, batch = row["params"]["world_size"], row["params"]["batch_size"]
        same_batch = [r for r in decode if r["params"]["batch_size"] == batch]
        if w == 1 or not sweep or not any(r["params"]["world_size"] == 1 for r in same_batch):
            continue
        p = predict_from_rows(same_batch, sweep, w)
        row["metrics"].update(model_tokens_per_s=p["tokens_per_s"], model_comm_ms_per_step=p["comm_ms"],
                              model_compute_ms_per_step=p["compute_ms"])


def cmd_bench_tp(args) -> int:
    from labkit.parallel.distributed import LaunchConfig
    from labkit.parallel.launch import LaunchError, action_options, check_split, format_rows, launch
    from labkit.cli.reporting import report_rows  # moved from labkit.lab.results
    from labkit.lab.results import check_store

    sizes = sorted(set(args.world_sizes))
    for w in sizes:
        check_split(args, w)
    if not args.no_save:
        check_store()
    options = action_options(["bench", "--model", args.model, *(["--dummy"] if args.dummy else []),
                              "--device", args.device, "--dtype", args.dtype, "--world-sizes", ",".join(map(str, sizes)),
                              "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--max-tokens",
                              str(args.max_tokens), "--repeats", str(args.repeats),
                              *(["--quantize", args.quantize] if args.quantize else []),
                              *(["--even-heads"] if args.even_heads else []),
                              *(["--compile"] if args.compile else []),
                              *(["--same-cores"] if args.same_cores else [])])
    try:
        result = launch(options, LaunchConfig(nproc=sizes[-1]),
                        log=lambda m: print(f"labkit bench tp: {m}", file=sys.stderr))
    except LaunchError as exc:
        print(f"labkit bench tp: {exc}", file=sys.stderr)
        return 1
    rows = result["rows"]
    add_predictions(rows)
    table = format_rows(rows)
    model = [r for r in rows if r["metrics"].get("model_tokens_per_s")]
    table += "".join(f"\nalpha-beta model at {r['params']['world_size']} ranks, batch {r['params']['batch_size']}: "
                     f"{r['metrics']['model_tokens_per_s']:.1f} tok/s predicted, {r['metrics']['tokens_per_s']:.1f} "
                     f"measured" for r in model)
    return report_rows(rows, args, "bench_tp.json", table)


def add_parser(subparsers) -> None:
    from labkit.model.loader import EMBEDDED_MODEL

    p = subparsers.add_parser(
        "tp", help="tensor-parallel decode at world sizes 1 and 2 side by side, compute vs communication",
        description="Launch torchrun once with as many ranks as the largest world size; measure decode tokens/s at "
                    "each world size (gloo on CPU, NCCL on CUDA), each rank's compute and all-reduce time per step, "
                    "and all-reduce latency by message size; compare with the alpha-beta model. Rows are appended "
                    "to data/results.jsonl and the run is saved as data/bench_tp.json.")
    p.add_argument("--world-sizes", type=comma_list(positive_int), default=(1, 2), help="(default: 1,2)")
    p.add_argument("--batch-sizes", type=comma_list(positive_int), default=(1,), help="rows per step (default: 1)")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="new tokens per run (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per cell (default: %(default)s)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="model (default: the embedded SmolLM2)")
    p.add_argument("--dummy", action="store_true", help="random weights of a preset")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="fp32", help="weights dtype (default: %(default)s)")
    p.add_argument("--quantize", choices=("int8",), default=None, help="int8 weight-only before the split")
    p.add_argument("--even-heads", action="store_true", help="refuse heads that do not divide by a world size")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (all-reduces included)")
    p.add_argument("--same-cores", action="store_true",
                   help="on a CPU, world size 1 gets all the cores (default: each rank one core's share, at every "
                        "world size, like one GPU per rank)")
    add_run_output_options(p, "bench_tp.json", progress=False)
    p.set_defaults(func=cmd_bench_tp)


__all__ = ["add_predictions", "cmd_bench_tp", "add_parser"]
