"""Sweep each Triton kernel of labkit.kernels over sizes against torch eager and torch.compile on the same inputs,
after checking it against its float32 reference; reports latency, GB/s (memory-bound ops) or TFLOP/s (flash
attention) and the fraction of the peak measured in the same run. Without a GPU only the correctness check runs,
under TRITON_INTERPRET=1. Rows are appended to the results store and the run is saved as JSON.
"""

from __future__ import annotations

import os
import sys

from labkit.bench.kernels import OPS, format_table, run_kernel_bench
from labkit.cli.arguments import add_command, add_device_option, add_run_output_options, comma_list
from labkit.cli.reporting import log_line, measure_and_report
from labkit.device import pick_device


def add_parser(subparsers) -> None:
    """Register `labkit bench kernels` on the `labkit bench` subparsers."""
    p = add_command(subparsers, "kernels", cmd_kernels, __doc__,
                    help="the Triton kernels against torch eager and torch.compile: GB/s, TFLOP/s, share of the peak")
    p.add_argument("--ops", type=comma_list(str), default=None, help=f"comma-separated, from {', '.join(OPS)}")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="input dtype (default: bf16)")
    add_device_option(p, "auto, cpu, cuda")
    add_run_output_options(p, "bench_kernels.json")


def cmd_kernels(args) -> int:
    dev = pick_device(args.device)
    if dev.type == "cpu" and "labkit.kernels.common" not in sys.modules:
        # triton.jit reads TRITON_INTERPRET when a kernel module is imported, which has not happened yet
        os.environ.setdefault("TRITON_INTERPRET", "1")

    def measure() -> list[dict]:
        return run_kernel_bench(args.ops, args.dtype, args.device, log=log_line, progress=not args.no_progress)

    return measure_and_report(args, measure, "bench_kernels.json", format_table)
