"""`labkit serve` at its defaults against peer servers (vLLM's CPU build, llama.cpp's server), each started once
in a process of its own, every load run on each back to back in an order that turns over between repeats, with
fresh prompts per repeat and load: each ratio comes from a matched pair, and the table gives the median ratio
with its range over the pairs. --peers labkit measures a second `labkit serve` against the first: the noise
floor of this machine (an A/A run), or with --labkit-args what a flag changes (an A/B run). Loads: issue 19's
Poisson sweep (poisson-2, poisson-4, poisson-8: 256 prompt tokens, 128 output tokens, 48 requests), burst (64
requests at once, 64 / 64) and one (8 requests, one in flight).
"""

from __future__ import annotations

import contextlib
import shlex

from labkit.bench.peers import PYTHON_ENVS
from labkit.bench.servers import LOADS, format_table, pick_loads, run_servers_bench
from labkit.cli.arguments import (add_command, add_model_options, add_run_output_options, comma_list,
                                  non_negative_int, positive_int, seed)
from labkit.cli.bench_stack import add_peer_options, peer_specs
from labkit.cli.reporting import log_line, measure_and_report

REFERENCE = "labkit"


def add_parser(subparsers) -> None:
    """Register `labkit bench servers` on the `labkit bench` subparsers."""
    p = add_command(subparsers, "servers", cmd_servers, __doc__,
                    help="labkit serve against vLLM and llama.cpp, interleaved and repeated: ratios of matched pairs")
    g = p.add_argument_group("the loads")
    g.add_argument("--loads", type=comma_list(str), default=tuple(LOADS),
                   help=f"comma-separated, run in this order: {','.join(LOADS)} (default: all)")
    g.add_argument("--repeats", type=positive_int, default=3,
                   help="times every load runs on every server; the order of the servers turns over each time "
                        "(default: %(default)s)")
    g.add_argument("--num-prompts", type=positive_int, default=None,
                   help="requests per measurement, for every load (default: each load's own)")
    g.add_argument("--num-warmups", type=non_negative_int, default=2,
                   help="untimed requests before each measurement (default: %(default)s)")
    g.add_argument("--seed", type=seed, default=0, help="seeds the prompts and arrivals (default: %(default)s)")
    add_peer_options(p, "labkit: a second `labkit serve`, an A/A run, or an A/B one with --labkit-args")
    p.add_argument("--reference-args", default="", metavar="FLAGS",
                   help="extra flags for the reference `labkit serve` (default: none, its defaults), one string")
    add_model_options(p, dummy_help="random weights from a preset (tests; the peers then can only be labkit)")
    add_run_output_options(p, "bench_servers.json", progress=False)


def _names(specs: list[dict]) -> list[str]:
    """Each server's name in the rows: its kind, with " (peer)" on a second labkit."""
    return [s["server"] + (" (peer)" if i and s["server"] == REFERENCE else "") for i, s in enumerate(specs)]


def cmd_servers(args) -> int:
    from labkit.bench.peers import Peer, peer_python

    loads = pick_loads(args.loads, args.num_prompts)
    peers = peer_specs(args)
    if not peers:
        raise ValueError("no peer to compare with: give --vllm-python or --llamacpp-python (or set "
                         f"${PYTHON_ENVS['vllm']}), or --peers labkit for an A/A run")
    for spec in peers:
        peer_python(spec["server"], spec["python"])  # a missing python fails before any server starts
    flags = ["--model", args.model, *(["--dummy"] if args.dummy else []), *shlex.split(args.reference_args)]
    specs = [{"server": REFERENCE, "python": None, "flags": flags, "start_timeout_s": args.peer_start_timeout},
             *peers]

    def measure() -> list[dict]:
        with contextlib.ExitStack() as stack:
            servers, info = {}, {}
            for name, spec in zip(_names(specs), specs):
                log_line(f"bench servers: starting {name}")
                peer = stack.enter_context(Peer(**spec))
                servers[name], info[name] = peer.url, peer.describe()
                log_line(f"bench servers: {name} {peer.version} ready on {peer.url} after {peer.start_s:.0f} s")
            return run_servers_bench(servers, loads, args.repeats, args.seed, args.num_warmups, info, log=log_line)

    return measure_and_report(args, measure, "bench_servers.json", format_table)


__all__ = ["add_parser", "cmd_servers"]
