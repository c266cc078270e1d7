"""`labkit bench quant`: speed, memory and quality of each quantization scheme (`labkit.bench.quant`)."""

from __future__ import annotations

import sys

from labkit.cli.arguments import add_run_output_options, comma_list, positive_int
from labkit.device import format_environment
from labkit.bench.quant import SCHEMES


HELP = "speed, memory, perplexity and agreement of fp32, bf16, int8, int4, GGUF blocks, int8 KV, llama.cpp"
DESCRIPTION = """\
Each quantization scheme of the embedded model side by side in one run on the CPU: decode tokens/s at each batch
size, weight memory, sliding-window perplexity on an offline text and greedy agreement with fp32. Rows go to
the results store; the run to bench_quant.json beside them.
"""  # argparse re-wraps it


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quant", help=HELP, description=DESCRIPTION)
    p.add_argument("--schemes", type=comma_list(str), default=SCHEMES,
                   help=f"comma-separated from {', '.join(SCHEMES)} (default: all; llama.cpp where installed)")
    p.add_argument("--batch-sizes", type=comma_list(positive_int), default=(1, 8), help="default: 1,8")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="new tokens per decode run (default: 64)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per cell (default: 3)")
    p.add_argument("--no-compile", action="store_true", help="eager decode steps only (default: compiled steps)")
    p.add_argument("--text", choices=("pydoc", "wikitext-2"), default="pydoc",
                   help="perplexity text: pydoc (Python's own docs, offline) or wikitext-2 (needs `datasets`)")
    p.add_argument("--ppl-tokens", type=positive_int, default=1024, help="tokens scored (default: 1024)")
    p.add_argument("--context-len", type=positive_int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--stride", type=positive_int, default=256, help="perplexity window stride (default: 256)")
    p.add_argument("--agreement-tokens", type=positive_int, default=32, help="greedy tokens per prompt (default: 32)")
    add_run_output_options(p, "bench_quant.json")
    p.set_defaults(func=cmd_quant)


def cmd_quant(args) -> int:
    from tqdm.auto import tqdm

    from labkit.cli.reporting import report_rows
    from labkit.lab.results import check_store
    from labkit.bench.quant import run_quant_bench

    if args.stride > args.context_len:
        raise ValueError(f"--stride {args.stride} must be <= --context-len {args.context_len}")
    if not args.no_save:
        check_store()
    rows = run_quant_bench(schemes=args.schemes, batch_sizes=args.batch_sizes, max_tokens=args.max_tokens,
                           repeats=args.repeats, compile=not args.no_compile, text=args.text,
                           ppl_tokens=args.ppl_tokens, context_len=args.context_len, stride=args.stride,
                           agreement_tokens=args.agreement_tokens, log=lambda msg: tqdm.write(msg, file=sys.stderr),
                           progress=not args.no_progress)
    return report_rows(rows, args, "bench_quant.json", format_table)


def format_table(rows: list[dict]) -> str:
    head = (f"{'scheme':10s} {'batch':>5s} {'tok/s':>7s} {'x fp32':>6s} {'x llama':>7s} {'ppl':>7s} {'Δppl':>6s} "
            f"{'agree':>6s} {'weights MB':>10s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        p, m = r["params"], r["metrics"]
        llama = f"{m['ratio_to_llama_cpp']:.2f}" if m["ratio_to_llama_cpp"] else "n/a"
        lines.append(f"{p['scheme']:10s} {p['batch_size']:5d} {m['tokens_per_s']:7.1f} {m['ratio_to_fp32']:6.2f} "
                     f"{llama:>7s} {m['perplexity']:7.3f} {m['perplexity_change_pct']:+5.1f}% "
                     f"{m['agreement_teacher_forced']:6.3f} {m['weight_bytes'] / 1e6:10.1f}")
    if rows:
        p = rows[0]["params"]
        lines.append(f"perplexity: {p['ppl_tokens']} tokens of {p['text']}, windows of {p['context_len']} by "
                     f"{p['stride']}; agreement: teacher-forced top-1 against fp32")
        lines.append(f"hardware: {format_environment(rows[0]['env']).split(' · python')[0]}")
    return "\n".join(lines)


__all__ = ["add_parser", "cmd_quant", "format_table"]
