"""Serve one request trace with sequential HF generate and with static, dynamic and continuous
batching on the labkit engine (same batch limit, one shared model), side by side in one run.
Reports throughput, speedups, TTFT/TPOT/ITL percentiles (bench serve's arithmetic), preemptions,
peak KV blocks and prefix-cache hits; checks that every policy gives the same greedy tokens.
Rows go to the results store (runs/store/results.jsonl) and the run to bench_batching.json beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace

from labkit.bench.batching import (DEFAULT_ENGINE, DEFAULT_TRACE, DTYPE, POLICIES, SCHEMA, run_batching_bench,
                                   run_server_bench)
from labkit.cli.arguments import (add_command, add_model_options, add_run_output_options, comma_list,
                                  non_negative_float, non_negative_int, positive_int)
from labkit.lab.results import append_rows, check_store, data_dir, stamp_rows, to_jsonable, write_json_atomic
from labkit.model.loader import load_model
from labkit.serving.loadgen import parse_slo
from labkit.serving.workloads import LENGTH_KINDS, LengthDist, TraceConfig, load_trace, make_trace


def format_table(rows: list[dict]) -> str:
    """A text table of the rows: throughput, ratios, latency percentiles, engine counters."""
    def fmt(value, spec):
        return format(value, spec) if value is not None else "n/a".rjust(int(spec.split(".")[0].rstrip("df%")))

    is_server = bool(rows) and rows[0]["params"]["policy"] == "server"
    base = "x 1-by-1" if is_server else "x static"  # server rows: how many times sooner than one at a time
    head = (f"{'policy':14s} {'tok/s':>7s} {base:>8s} {'x HF':>6s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
            f"{'TPOT p50':>9s} {'ITL p99':>8s} {'done s':>7s} {'preempt':>7s} {'peak blk':>8s} {'prefix':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        p, m = r["params"], r["metrics"]
        name = f"server c={p['max_concurrency'] or 'all'}" if is_server else p["policy"]
        ratio = m.get("speedup_vs_sequential") if is_server else m.get("speedup_vs_static")
        lines.append(f"{name:14s} {m['output_tokens_per_s']:7.1f} {fmt(ratio, '8.2f')} "
                     f"{fmt(m.get('speedup_vs_hf'), '6.2f')} {fmt(m['median_ttft_ms'], '9.0f')} "
                     f"{fmt(m['p99_ttft_ms'], '9.0f')} {fmt(m['median_tpot_ms'], '9.1f')} "
                     f"{fmt(m['p99_itl_ms'], '8.1f')} {m['duration_s']:7.1f} {fmt(m.get('num_preemptions'), '7d')} "
                     f"{fmt(m.get('peak_kv_blocks'), '8d')} {fmt(m.get('prefix_hit_rate'), '6.0%')}")
    if rows:
        t, env = rows[0]["params"]["trace"], rows[0]["env"]
        lines.append(f"trace: {t['num_requests']} requests ({'offline' if t['is_offline'] else 'online'}), "
                     f"{t['total_prompt_tokens']} prompt / {t['total_output_tokens']} output tokens, longest output "
                     f"{t['max_output_len']}")
        lines.append(f"hardware: {env['cpu']} ({env['num_cpus']} cpus, {env['cpu_capability']}), "
                     f"{env['torch_threads']} torch threads")
    return "\n".join(lines)


def _length_options(parser, name: str, default: LengthDist, what: str) -> None:
    parser.add_argument(f"--{name}-dist", choices=LENGTH_KINDS, default=default.kind,
                        help=f"distribution of {what} (default: %(default)s)")
    parser.add_argument(f"--{name}-len", type=positive_int, default=default.mean,
                        help=f"mean {what} in tokens, before clipping (default: %(default)s)")
    parser.add_argument(f"--{name}-shape", type=non_negative_float, default=None,
                        help="uniform: half-width / mean; lognormal: sigma; pareto: tail index alpha > 1 "
                             f"(default: {default.shape} for {default.kind}, else the distribution's own)")
    parser.add_argument(f"--{name}-max", type=positive_int, default=default.max_len,
                        help=f"clip {what} to this many tokens (default: %(default)s)")


def _length_dist(args, name: str) -> LengthDist:
    kind, shape = getattr(args, f"{name}_dist"), getattr(args, f"{name}_shape")
    default = getattr(DEFAULT_TRACE, f"{name}_len")
    if shape is None and kind == default.kind:
        shape = default.shape
    return LengthDist(kind, getattr(args, f"{name}_len"), shape, max_len=getattr(args, f"{name}_max"))


def add_parser(subparsers) -> None:
    """Register `labkit bench batching` on the `labkit bench` subparsers."""
    d, e = DEFAULT_TRACE, DEFAULT_ENGINE
    p = add_command(subparsers, "batching", cmd_batching, __doc__,
                    help="HF generate vs static, dynamic and continuous batching on one trace",
                    epilog="examples:\n"
                           "  labkit bench batching                                  # the default heavy-tailed offline trace\n"
                           "  labkit bench batching --request-rate 4 --policies static,continuous\n"
                           "  labkit bench batching --num-prefixes 4 --prefix-len 64 --prefix-fraction 0.8\n"
                           "  labkit bench batching --trace azure_conv.csv --max-requests 64 --time-scale 0.1\n"
                           "  labkit bench batching --server --num-requests 32 --output-dist fixed --output-len 32",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the trace")
    g.add_argument("--trace", default=None, metavar="FILE",
                   help="replay a JSONL (arrival_s, prompt or prompt_len, output_len) or Azure CSV trace "
                        "instead of a synthetic one")
    g.add_argument("--time-scale", type=non_negative_float, default=1.0,
                   help="multiply a replayed trace's arrival times (0: offline) (default: %(default)s)")
    g.add_argument("--max-requests", type=positive_int, default=None, help="replay only the first N requests")
    g.add_argument("--num-requests", type=positive_int, default=d.num_requests, help="(default: %(default)s)")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, or inf for offline: all at t=0 (default: %(default)s)")
    g.add_argument("--burstiness", type=float, default=d.burstiness,
                   help="gamma shape of inter-arrival times: 1 is Poisson, < 1 burstier (default: %(default)s)")
    _length_options(g, "prompt", d.prompt_len, "prompt lengths (after any shared prefix)")
    _length_options(g, "output", d.output_len, "output lengths")
    g.add_argument("--num-prefixes", type=non_negative_int, default=0, help="shared system prompts (default: 0)")
    g.add_argument("--prefix-len", type=non_negative_int, default=0, help="tokens in each (default: 0)")
    g.add_argument("--prefix-fraction", type=non_negative_float, default=0.0,
                   help="share of requests that start with one (default: 0)")
    g.add_argument("--seed", type=int, default=0, help="seeds the trace (default: %(default)s)")
    g = p.add_argument_group("the engines")
    g.add_argument("--policies", type=comma_list(str), default=POLICIES,
                   help=f"comma-separated, from {', '.join(POLICIES)} (default: all)")
    g.add_argument("--max-num-seqs", type=positive_int, default=e.scheduler.max_num_seqs,
                   help="the batch limit of every policy (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=e.scheduler.max_num_batched_tokens,
                   help="continuous: new tokens per step, the prefill chunk (default: %(default)s)")
    g.add_argument("--max-wait-s", type=non_negative_float, default=e.scheduler.max_wait_s,
                   help="dynamic: start a smaller batch after this wait (default: %(default)s)")
    g.add_argument("--block-size", type=positive_int, default=e.block_size, help="tokens per KV block (default: 16)")
    g.add_argument("--num-kv-blocks", type=positive_int, default=None,
                   help="KV cache size in blocks; small values force preemption (default: from 512 MiB)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    add_model_options(g)
    g = p.add_argument_group("the run")
    g.add_argument("--server", action="store_true",
                   help="instead: the same requests through labkit serve, one at a time vs all at once")
    g.add_argument("--slo", default=None, metavar="KEY=MS,...", help="goodput targets, e.g. ttft_ms=2000,tpot_ms=200")
    add_run_output_options(g, None, output_help="JSON file for this run (default: bench_batching.json, with "
                                                "--server bench_batching_server.json, in the results store)",
                           progress_help="no progress bars")


def _trace_config(args) -> TraceConfig | None:
    """The synthetic trace the flags describe (None with --trace), validated before any model loads."""
    if args.trace:
        return None
    return TraceConfig(num_requests=args.num_requests, request_rate=args.request_rate, burstiness=args.burstiness,
                       prompt_len=_length_dist(args, "prompt"), output_len=_length_dist(args, "output"),
                       num_prefixes=args.num_prefixes, prefix_len=args.prefix_len,
                       prefix_fraction=args.prefix_fraction, seed=args.seed)


def cmd_batching(args) -> int:
    if not args.no_save:
        check_store()  # before minutes of measurement, not after
    scheduler = replace(DEFAULT_ENGINE.scheduler, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_wait_s=args.max_wait_s)
    config = replace(DEFAULT_ENGINE, scheduler=scheduler, block_size=args.block_size,
                     num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=not args.no_prefix_caching)
    slo, trace_config = parse_slo(args.slo), _trace_config(args)
    loaded = load_model(args.model, device=args.device, dtype=DTYPE, dummy=args.dummy)
    if loaded.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; use a preset with one (e.g. tiny-smollm2)")
    if trace_config is None:
        trace = load_trace(args.trace, loaded.tokenizer, time_scale=args.time_scale, max_requests=args.max_requests,
                           seed=args.seed)
    else:
        trace = make_trace(trace_config, loaded.tokenizer)
    mismatches = []
    if args.server:
        rows = run_server_bench(trace, loaded, config, slo)
        document = {"schema": SCHEMA, "rows": rows, "trace": trace.describe()}
    else:
        result = run_batching_bench(trace, loaded, config, args.policies, slo, progress=not args.no_progress)
        rows, mismatches, document = result.rows, result.mismatches, result.document()
    rows = stamp_rows(rows, label=args.label)
    print(format_table(rows), file=sys.stderr if args.json else sys.stdout)
    if mismatches:  # a speedup that changes the answer is no speedup: say so, and keep it out of the results
        print("labkit bench batching: greedy tokens differ between policies:\n  " + "\n  ".join(mismatches),
              file=sys.stderr)
        return 1
    if not args.no_save:
        append_rows(rows)
        document["rows"] = rows
        default = "bench_batching_server.json" if args.server else "bench_batching.json"
        path = write_json_atomic(args.output or data_dir() / default, document)
        print(f"labkit bench batching: wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_jsonable(rows), indent=2, allow_nan=False))
    return 0
