"""The full stack one technique at a time: HF generate, then the compact engine, continuous batching, bf16
weights, a compiled step, speculation and prefix caching, each stage measured through `labkit serve` under one
load (--num-requests sent at once) and at batch 1 (TPOT with one request in flight), with fresh prompts per
stage; HF runs offline (no server exists for it here) and its rows say so. vLLM and llama.cpp servers get the
same load when their pythons are given (--vllm-python / $LABKIT_VLLM_PYTHON, --llamacpp-python /
$LABKIT_LLAMACPP_PYTHON); --prefill adds the quantization-in-prefill collision. Notebook 08 runs the same
functions (labkit.bench.stack).
"""

from __future__ import annotations

import os
import shlex

from labkit.bench.peers import PYTHON_ENVS, SERVERS, START_TIMEOUT_S
from labkit.bench.stack import STAGE_NAMES, StackLoad, format_table, run_stack_bench
from labkit.cli.arguments import (add_command, add_model_options, add_run_output_options, comma_list,
                                  non_negative_int, positive_float, positive_int, seed)
from labkit.cli.reporting import log_line, measure_and_report

PEER_OPTIONS = {"vllm": "vllm", "llama.cpp": "llamacpp", "labkit": "labkit"}  # server -> option stem


def add_parser(subparsers) -> None:
    """Register `labkit bench stack` on the `labkit bench` subparsers."""
    p = add_command(subparsers, "stack", cmd_stack, __doc__,
                    help="the full stack one technique at a time, through the server, against vLLM and llama.cpp")
    p.add_argument("--stages", type=comma_list(str), default=STAGE_NAMES,
                   help=f"comma-separated, in this order: {','.join(STAGE_NAMES)} (default: all)")
    g = p.add_argument_group("the load")
    g.add_argument("--num-requests", type=positive_int, default=64, help="sent at once (default: %(default)s)")
    g.add_argument("--input-len", type=positive_int, default=64, help="words per prompt (default: %(default)s)")
    g.add_argument("--output-len", type=positive_int, default=64, help="tokens per reply (default: %(default)s)")
    g.add_argument("--prefix-len", type=non_negative_int, default=0,
                   help="words of a system prompt every prompt of a stage starts with (default: %(default)s)")
    g.add_argument("--batch1-requests", type=positive_int, default=3,
                   help="requests sent one at a time for the batch-1 TPOT (default: %(default)s)")
    g.add_argument("--num-warmups", type=non_negative_int, default=2,
                   help="untimed requests per measurement (default: %(default)s)")
    g.add_argument("--seed", type=seed, default=0, help="seeds the prompts (default: %(default)s)")
    g.add_argument("--prefill", action="store_true",
                   help="also the prefill-heavy load (4x longer prompts, one output token) with fp32, bf16 and int8 "
                        "weights: where quantization collides with prefill")
    add_peer_options(p)
    add_model_options(p, dummy_help="random weights from a preset (tests; no peers then)")
    add_run_output_options(p, "full_stack.json", progress=False)


def add_peer_options(p, peers_help: str = "labkit: `labkit serve` at its defaults, in a process of its own") -> None:
    """--peers, each peer's --<name>-python and --<name>-args, --peer-start-timeout (read by `peer_specs`)."""
    g = p.add_argument_group("peers (each from its own python: a venv you made, see README)")
    g.add_argument("--peers", type=comma_list(str), default=("auto",),
                   help=f"comma-separated from {', '.join(SERVERS)}, or auto (every peer whose python is given) or "
                        f"none (default: auto; {peers_help})")
    for server, stem in PEER_OPTIONS.items():
        if server in PYTHON_ENVS:
            g.add_argument(f"--{stem}-python", default=None,
                           help=f"the python of the {server} venv (default: ${PYTHON_ENVS[server]})")
        g.add_argument(f"--{stem}-args", default="", metavar="FLAGS",
                       help=f"extra flags for the {server} server, one string: --{stem}-args='--flag value'")
    g.add_argument("--peer-start-timeout", type=positive_float, default=START_TIMEOUT_S, metavar="SECONDS",
                   help="how long a peer may take to answer /v1/models (default: %(default)s)")


def peer_specs(args) -> list[dict]:
    """`labkit.bench.peers.Peer` keywords for the peers asked for; a one-line ValueError for a bad choice."""
    asked = list(args.peers)
    if asked in (["none"], []):
        return []
    if asked == ["auto"]:
        asked = [s for s in PYTHON_ENVS if getattr(args, f"{PEER_OPTIONS[s]}_python") or os.environ.get(PYTHON_ENVS[s])]
    for server in asked:
        if server not in SERVERS:
            raise ValueError(f"unknown peer {server!r}: choose among {', '.join(SERVERS)}, auto or none")
    if asked and args.dummy and asked != ["labkit"]:
        raise ValueError(f"the {asked[0]} peer serves the embedded model, not a --dummy one: drop --dummy or "
                         "pass --peers none")
    specs = []
    for server in asked:
        stem = PEER_OPTIONS[server]
        flags = shlex.split(getattr(args, f"{stem}_args"))
        if server == "labkit":
            flags = ["--model", args.model, *(["--dummy"] if args.dummy else []), *flags]
        specs.append({"server": server, "python": getattr(args, f"{stem}_python", None), "flags": flags,
                      "start_timeout_s": args.peer_start_timeout})
    return specs


def cmd_stack(args) -> int:
    from labkit.bench.stack import stage_settings
    from labkit.device import pick_device

    stage_settings(args.stages)  # a bad stage name fails before anything loads
    load = StackLoad(num_requests=args.num_requests, input_len=args.input_len, output_len=args.output_len,
                     prefix_len=args.prefix_len, batch1_requests=args.batch1_requests,
                     num_warmups=args.num_warmups, seed=args.seed)
    peers = peer_specs(args)
    if peers:
        from labkit.bench.peers import peer_python

        for spec in peers:
            peer_python(spec["server"], spec["python"])  # a missing python fails before minutes of measuring
    pick_device(args.device)

    def measure() -> list[dict]:
        from labkit.model.loader import load_model

        loaded = load_model(args.model, device=args.device, dtype="fp32", dummy=args.dummy, seed=args.seed)
        if loaded.tokenizer is None:
            raise ValueError(f"model {args.model!r} has no tokenizer; use a preset with one (e.g. tiny-smollm2)")
        return run_stack_bench(loaded, args.stages, load, peers, prefill=args.prefill, log=log_line).rows

    return measure_and_report(args, measure, "full_stack.json", format_table)


__all__ = ["add_parser", "add_peer_options", "cmd_stack", "peer_specs"]
