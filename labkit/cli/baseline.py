"""Generate once from a prompt and report model load time (separately), time to first token, decode tokens/s, total
latency, tokens generated and peak memory. The first generation is reported apart as cold; the numbers are the
medians of the warm runs after it. Greedy by default.
"""

from __future__ import annotations

import argparse

from labkit.bench.baseline import ENGINES, run_baseline
from labkit.cli.arguments import (add_command, add_device_option, add_engine_options, add_model_options,
                                  add_run_output_options, engine_config_from_args, non_negative_float, positive_int, seed,
                                  utf8_text)
from labkit.cli.reporting import measure_and_report


def format_row(row: dict) -> str:
    m, p = row["metrics"], row["params"]
    tps = m["decode_tokens_per_s"]
    warm = f"median of {m['num_repeats']} warm runs" if m.get("num_repeats") else "one run"
    cold_tps = m.get("cold_decode_tokens_per_s")
    lines = [
        f"model        {p['model']} ({p['model_source']}), engine {p['engine']}, {p['device']} {p['dtype']}",
        f"load         {m['load_s']:.2f} s",
        f"TTFT         {m['ttft_ms']:.1f} ms ({m['num_prompt_tokens']} prompt tokens; {warm}; "
        f"cold first run {m.get('cold_ttft_ms', m['ttft_ms']):.1f} ms)",
        (f"decode       {tps:.1f} tokens/s" + (f" (cold first run {cold_tps:.1f})" if cold_tps else ""))
        if tps else "decode       n/a (one token)",
        f"latency      {m['total_latency_ms']:.1f} ms for {m['num_new_tokens']} new tokens ({m['finish_reason']})",
        f"peak memory  {m['peak_memory_mb']:.0f} MiB",
        f"text         {row['text']!r}",
    ]
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    """Register `labkit baseline` on the CLI's subparsers."""
    p = add_command(subparsers, "baseline", cmd_baseline, __doc__,
                    help="generate once; report load time, TTFT, decode tokens/s, memory")
    p.add_argument("--prompt", type=utf8_text, default="Hello, world!", help="the prompt text (default: %(default)r)")
    p.add_argument("--max-tokens", type=positive_int, default=20, help="new tokens to generate (default: 20)")
    add_model_options(p, model_help="embedded default, an HF hub id, a local directory, or with --dummy a preset",
                      dummy_help="random weights from a preset config (e.g. tiny-smollm2)", device_help=None)
    p.add_argument("--engine", choices=ENGINES, default="hf", help="hf generate or the labkit engine (default: hf)")
    add_device_option(p, "auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16 or auto (default: fp32)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default)")
    p.add_argument("--seed", type=seed, default=0, help="seed for sampling (default: 0)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                   help="wrap the prompt in the model's chat template (default: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the labkit decode step (timed apart)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed warm runs after one cold run, reported apart; the medians are reported (default: 3)")
    add_engine_options(p, serving=False)
    add_run_output_options(p, None, json_help="print the result row as JSON on stdout; table on stderr",
                           no_save_help="do not append the row to the results store")


def cmd_baseline(args) -> int:
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    labkit_only = {"--compile": args.compile, "--quantization": args.quantization,
                   "--kv-cache-dtype": args.kv_cache_dtype != "auto", "--speculative-config": args.speculative_config,
                   "--max-model-len": args.max_model_len}
    given = [name for name, value in labkit_only.items() if value]
    if given and args.engine != "labkit":
        raise ValueError(f"{given[0]} needs --engine labkit")
    engine_config = engine_config_from_args(args) if args.engine == "labkit" else None

    def measure() -> list[dict]:
        return [run_baseline(prompt=args.prompt, max_tokens=args.max_tokens, model=args.model, engine=args.engine,
                             device=args.device, dtype=args.dtype, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed, chat=args.chat, dummy=args.dummy,
                             compile=args.compile, repeats=args.repeats, progress=not args.no_progress,
                             engine_config=engine_config)]

    # the store is checked before the model loads, not after the measurement
    return measure_and_report(args, measure, None, lambda rows: format_row(rows[0]))
