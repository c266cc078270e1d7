"""`labkit bench spec`: every draft on every workload against the plain engine (`labkit.speculative.bench`)."""

from __future__ import annotations

import sys

from labkit.cli.arguments import add_run_output_options, comma_list, positive_int
from labkit.model.loader import EMBEDDED_MODEL
from labkit.speculative.bench import CLOCKS, CPU_ONLY_DRAFTS, DEFAULT_DRAFTS, DRAFTS, WORKLOADS, check_names


HELP = "speculative decoding: every draft on every workload vs the plain engine"
DESCRIPTION = """\
Greedy speculative decoding with each draft (n-gram prompt lookup, quantized self-draft, distilled draft model,
Medusa, EAGLE) on free generation, chat answers and input-grounded tasks, against the same engine without
speculation, in one run: tokens/s, speedup, acceptance per draft position, mean accepted tokens, draft and verify
time. Learned drafts are loaded from the cache, or trained first (see `labkit spec train`).
"""  # argparse re-wraps it


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("spec", help=HELP, description=DESCRIPTION)
    p.add_argument("--drafts", type=comma_list(str), default=DEFAULT_DRAFTS,
                   help=f"comma-separated from {', '.join(DRAFTS)} (default: {','.join(DEFAULT_DRAFTS)})")
    p.add_argument("--workloads", type=comma_list(str), default=tuple(WORKLOADS),
                   help=f"comma-separated from {', '.join(WORKLOADS)} (default: all)")
    p.add_argument("--gamma", type=positive_int, default=4, help="draft tokens per step (default: 4)")
    p.add_argument("--gamma-policy", choices=("fixed", "adaptive", "both"), default="fixed",
                   help="fixed gamma, adaptive per request (starting at --gamma, at most 16), or both side by side")
    p.add_argument("--max-tokens", type=positive_int, default=96, help="new tokens per request (default: 96)")
    p.add_argument("--repeats", type=positive_int, default=2, help="timed runs per cell (default: 2)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="copies of each prompt decoded together")
    p.add_argument("--eager-drafts", action="store_true",
                   help="run the self-drafts eagerly (default: their one-token steps compiled)")
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="wall: decode tokens/s (default); cpu: tokens per CPU second of the process, prefill "
                        "included, for a machine shared with other work (set OMP_NUM_THREADS=1)")
    p.add_argument("--train-size", default="default",
                   help="learned drafts: smoke, small, default (the default), large, or auto (the largest cached, "
                        "else smoke); loaded from the cache, or trained first")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="model (default: the embedded SmolLM2)")
    p.add_argument("--dummy", action="store_true", help="random weights from a preset (e.g. tiny-smollm2)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps, auto")
    add_run_output_options(p, "bench_spec.json")
    p.set_defaults(func=cmd_spec)


def cmd_spec(args) -> int:
    from tqdm.auto import tqdm

    from labkit.device import pick_device
    from labkit.cli.reporting import report_rows
    from labkit.lab.results import check_store
    from labkit.speculative.bench import run_spec_bench
    from labkit.speculative.distillation import SIZES

    for name, given, allowed in (("draft", args.drafts, DRAFTS), ("workload", args.workloads, tuple(WORKLOADS)),
                                 ("training size", (args.train_size,), ("auto", *SIZES))):
        check_names(name, given, allowed)
    device = pick_device(args.device)
    names = tuple(dict.fromkeys(args.drafts))
    if args.drafts is DEFAULT_DRAFTS and device.type != "cpu":  # torch's int4 kernel here is the CPU one
        names = tuple(n for n in names if n not in CPU_ONLY_DRAFTS)
    if not args.no_save:
        check_store()
    rows = run_spec_bench(draft_names=names, workloads=tuple(dict.fromkeys(args.workloads)),
                          max_tokens=args.max_tokens, num_draft_tokens=args.gamma,
                          gamma_policy=args.gamma_policy, repeats=args.repeats,
                          batch_size=args.batch_size, train_size=args.train_size, model=args.model, clock=args.clock,
                          compile_drafts=not args.eager_drafts,
                          dummy=args.dummy, device=args.device, log=lambda m: tqdm.write(m, file=sys.stderr),
                          progress=not args.no_progress)
    return report_rows(rows, args, "bench_spec.json", format_table)


def format_table(rows: list[dict]) -> str:
    unit = "tok/cpu-s" if rows and rows[0]["params"].get("clock") == "cpu" else "tok/s"
    head = (f"{'workload':10s} {'draft':16s} {unit:>9s} {'speedup':>7s} {'accepted':>8s} {'tok/step':>8s} "
            f"{'draft ms':>8s} {'verify ms':>9s} {'by position':24s} same")
    lines = [head, "-" * len(head)]
    for r in rows:
        p, m = r["params"], r["metrics"]
        accepted = m.get("mean_accepted_tokens")
        by_pos = " ".join(f"{a:.2f}" if a is not None else "-" for a in (m.get("acceptance_by_position") or [])[:6])
        lines.append(f"{p['workload']:10s} {p['variant']:16s} {m['tokens_per_s']:9.1f} {m['speedup']:6.2f}x "
                     f"{accepted if accepted is not None else 0:8.2f} {m.get('tokens_per_step') or 1:8.2f} "
                     f"{m.get('draft_ms_per_step', 0):8.1f} {m.get('verify_ms_per_step', 0):9.1f} {by_pos:24s} "
                     f"{'yes' if m['token_identical'] else 'NO'}")
    if rows:
        env = rows[0]["env"]
        lines.append(f"hardware: {env['cpu']} ({env['num_cpus']} cpus, {env['cpu_capability']}), "
                     f"{env['torch_threads']} torch threads; greedy, gamma {rows[0]['params']['gamma']} "
                     f"({rows[0]['params']['gamma_policy']}), batch {rows[0]['params']['batch_size']}")
    return "\n".join(lines)


__all__ = ["add_parser", "cmd_spec", "format_table"]
