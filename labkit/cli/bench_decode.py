"""Decode throughput of several engines on one model, measured one after another in one process after warm-up,
reported as tokens/s, ratios to HF generate at --dtype and to llama.cpp, and roofline fraction, on each --workload.
Prompt-lookup variants (labkit's `-ngram`, `llama.cpp-lookup`) are checked token for token against the same
weights without speculation and get no speedup where they differ. Rows are appended to
the results store (runs/store/results.jsonl) and the run is saved as JSON beside them.
"""

from __future__ import annotations

import argparse

from labkit.bench.decode import (BENCH_DTYPES, DEFAULT_PROMPT, DEFAULT_PROMPT_TOKENS, DEFAULT_VARIANTS, VARIANTS,
                                 WORKLOADS, LookupSettings, run_decode_bench, format_table)
from labkit.cli.arguments import (add_command, add_model_options, add_run_output_options, comma_list, positive_int,
                                  utf8_text)
from labkit.cli.reporting import log_line, measure_and_report
from labkit.device import pick_device


def add_parser(subparsers) -> None:
    """Register `labkit bench decode` on the `labkit bench` subparsers."""
    p = add_command(subparsers, "decode", cmd_decode, __doc__,
                    help="decode tokens/s of HF, labkit (fp32, bf16, int8, compiled, CUDA graphs, Triton, prompt "
                         "lookup) and llama.cpp")
    p.add_argument("--engines", type=comma_list(str), default=None,
                   help=f"comma-separated variants from {', '.join(VARIANTS)} (default on a CPU at fp32: "
                        f"{','.join(DEFAULT_VARIANTS)}, llama.cpp only where llama-cpp-python is installed; on a GPU "
                        f"or at another --dtype: HF, eager, compiled, CUDA graphs and Triton at that dtype)")
    p.add_argument("--batch-sizes", type=comma_list(positive_int), default=(1, 4), help="e.g. 1,8 (default: 1,4)")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="new tokens per run (default: 64)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per cell (default: 3)")
    p.add_argument("--prompt", type=utf8_text, default=DEFAULT_PROMPT, help="prompt text")
    p.add_argument("--prompt-tokens", type=positive_int, default=None, metavar="N",
                   help=f"a synthetic prompt of N seeded random token ids instead of --prompt (the default, "
                        f"{DEFAULT_PROMPT_TOKENS}, for a model without a tokenizer, e.g. --dummy --model llama-1b)")
    p.add_argument("--dtype", choices=("auto", *BENCH_DTYPES), default="auto",
                   help="weights as loaded and the HF baseline's dtype (default auto: bf16 on a GPU, else fp32)")
    add_model_options(p, dummy_help="random weights from a preset (e.g. llama-1b on a GPU)")
    _add_workload_options(p)
    add_run_output_options(p, "bench_decode.json")


def _workload(text: str) -> str:
    if text not in WORKLOADS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(WORKLOADS)}, got {text!r}")
    return text


def _add_workload_options(p) -> None:
    """--workload, --threads and the prompt-lookup settings of the speculative variants (vLLM's names)."""
    p.add_argument("--workload", type=comma_list(_workload), default=("free",),
                   help=f"comma-separated workloads from {', '.join(WORKLOADS)} (default: free, the --prompt text; "
                        f"the others: `labkit bench spec`'s prompts, through the chat template)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch's threads and llama.cpp's n_threads for the run (default: torch's, as they are)")
    for flag, what in (("--num-speculative-tokens", "draft tokens per step of the -ngram and llama.cpp-lookup "
                                                 "variants"),
                       ("--prompt-lookup-max", "the longest n-gram the prompt lookup matches"),
                       ("--prompt-lookup-min", "the shortest n-gram the prompt lookup matches (llama.cpp-lookup: 1)")):
        p.add_argument(flag, type=positive_int, default=getattr(LookupSettings, flag[2:].replace("-", "_")),
                       help=f"{what} (default: %(default)s)")


def cmd_decode(args) -> int:
    if not args.prompt.strip():
        raise ValueError("--prompt must not be empty")
    lookup = LookupSettings(num_speculative_tokens=args.num_speculative_tokens,
                            prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min)
    pick_device(args.device)  # a bad or missing device fails before anything loads

    def measure() -> list[dict]:
        return run_decode_bench(variants=args.engines, batch_sizes=args.batch_sizes, max_tokens=args.max_tokens,
                                repeats=args.repeats, prompt=args.prompt, model=args.model, dummy=args.dummy,
                                device=args.device, log=log_line, progress=not args.no_progress, dtype=args.dtype,
                                prompt_tokens=args.prompt_tokens, workloads=args.workload, threads=args.threads,
                                lookup=lookup)

    return measure_and_report(args, measure, "bench_decode.json", format_table)
