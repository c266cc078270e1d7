"""`labkit` command line: baseline, run, results, bench decode|serve|batching|kernels|tp|spec|quant|stack|servers,
serve, ping, tp, router, spec train.

Each command module registers its parser with `add_parser(subparsers)` and sets `func(args) -> int`.
Bad input prints one line `labkit <command>: <message>` on stderr and exits 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

from labkit.cli.arguments import Parser

# command name -> module that registers it; imported only when needed, so `labkit --help` is fast
COMMANDS = {
    "baseline": "labkit.cli.baseline",
    "run": "labkit.cli.run",
    "results": "labkit.cli.results",
    "serve": "labkit.cli.serve",
    "ping": "labkit.cli.ping",
    "tp": "labkit.cli.tp",
    "router": "labkit.cli.router",
    "spec": "labkit.cli.spec",
}
BENCH_COMMANDS = {
    "decode": "labkit.cli.bench_decode",
    "serve": "labkit.cli.bench_serve",
    "batching": "labkit.cli.bench_batching",
    "kernels": "labkit.cli.bench_kernels",
    "tp": "labkit.cli.bench_tp",
    "spec": "labkit.cli.bench_spec",
    "quant": "labkit.cli.bench_quant",
    "stack": "labkit.cli.bench_stack",
    "servers": "labkit.cli.bench_servers",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("labkit")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from labkit import __version__

        return __version__


def build_parser() -> Parser:
    parser = Parser(prog="labkit", description="The LLM Inference Lab's command line.")
    parser.add_argument("--version", action="version", version=f"labkit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks: decode, serving load, batching, kernels, TP, speculation, "
                                         "quantization",
                           description="Benchmarks. Each appends result rows to the untracked store runs/store/ (or "
                                       "$LABKIT_DATA_DIR; --refresh-reference: the committed data/) and accepts "
                                       "--json.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for module in BENCH_COMMANDS.values():
        importlib.import_module(module).add_parser(bench_sub)
    return parser


@contextlib.contextmanager
def _results_folder(args) -> Iterator[None]:
    """With --refresh-reference (a benchmark's, not `labkit run`'s, which sets its notebooks' environment
    itself), every writer of this command (rows, run JSON, bench serve's result) goes to the committed data/:
    $LABKIT_DATA_DIR points there while the command runs, then is restored."""
    if not getattr(args, "refresh_reference", False) or args.command == "run":
        yield
        return
    from labkit.lab.results import DATA_DIR_ENV, reference_data_dir

    if getattr(args, "no_save", False):
        raise ValueError("--refresh-reference writes the reference results; --no-save writes nothing: choose one")
    saved = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(reference_data_dir())
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = saved


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.command if args.command != "bench" else f"bench {args.bench_command}"
    try:
        with _results_folder(args):
            return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"labkit {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"labkit {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): nothing left to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a file or folder the user named: missing, unreadable, a full disk
        print(f"labkit {name}: {exc}", file=sys.stderr)
        return 1

