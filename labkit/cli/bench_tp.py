"""`labkit bench tp`: tensor-parallel decode at world sizes 1 and 2 side by side (`labkit.parallel.bench`)."""

from __future__ import annotations

import sys

from labkit.cli.arguments import add_run_output_options, comma_list, positive_int
from labkit.cli.tp import add_decode_run_options, format_rows
from labkit.parallel.bench import DEFAULT_WORLD_SIZES
from labkit.parallel.worker import QUANTIZE_CHOICES, BenchOptions

HELP = "tensor-parallel decode at world sizes 1 and 2 side by side, compute vs communication"
DESCRIPTION = """\
Launch torchrun once with as many ranks as the largest world size; measure decode tokens/s at each world size
(gloo on CPU, NCCL on CUDA), each rank's compute and all-reduce time per step, and all-reduce latency by message
size; compare with the alpha-beta model. Rows are appended to the results store and the run is saved as
bench_tp.json beside them.
"""  # argparse re-wraps it


def cmd_bench_tp(args) -> int:
    from labkit.cli.reporting import report_rows
    from labkit.lab.results import check_store
    from labkit.parallel.bench import run_tp_bench
    from labkit.parallel.launch import LaunchError, check_split

    sizes = tuple(sorted(set(args.world_sizes)))
    for w in sizes:
        check_split(args, w)
    if not args.no_save:
        check_store()
    options = BenchOptions(model=args.model, dummy=args.dummy, device=args.device, dtype=args.dtype,
                           world_sizes=sizes, batch_sizes=args.batch_sizes, max_tokens=args.max_tokens,
                           repeats=args.repeats, quantize=args.quantize, even_heads=args.even_heads,
                           compile=args.compile, same_cores=args.same_cores)
    try:
        rows = run_tp_bench(options, log=lambda m: print(f"labkit bench tp: {m}", file=sys.stderr))
    except LaunchError as exc:
        print(f"labkit bench tp: {exc}", file=sys.stderr)
        return 1
    table = format_rows(rows)
    model = [r for r in rows if r["metrics"].get("model_tokens_per_s")]
    table += "".join(f"\nalpha-beta model at {r['params']['world_size']} ranks, batch {r['params']['batch_size']}: "
                     f"{r['metrics']['model_tokens_per_s']:.1f} tok/s predicted, {r['metrics']['tokens_per_s']:.1f} "
                     f"measured" for r in model)
    return report_rows(rows, args, "bench_tp.json", table)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tp", help=HELP, description=DESCRIPTION)
    p.add_argument("--world-sizes", type=comma_list(positive_int), default=DEFAULT_WORLD_SIZES, help="(default: 1,2)")
    add_decode_run_options(p)
    p.add_argument("--model", default=BenchOptions.model, help="model (default: the embedded SmolLM2)")
    p.add_argument("--dummy", action="store_true", help="random weights of a preset")
    p.add_argument("--device", default=BenchOptions.device, help="auto, cpu, cuda")
    p.add_argument("--dtype", default=BenchOptions.dtype, help="weights dtype (default: %(default)s)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help="int8 weight-only before the split")
    p.add_argument("--even-heads", action="store_true", help="refuse heads that do not divide by a world size")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (all-reduces included)")
    p.add_argument("--same-cores", action="store_true",
                   help="on a CPU, world size 1 gets all the cores (default: each rank one core's share, at every "
                        "world size, like one GPU per rank)")
    add_run_output_options(p, "bench_tp.json", progress=False)
    p.set_defaults(func=cmd_bench_tp)


__all__ = ["add_parser", "cmd_bench_tp"]
