"""Read the results store (runs/store/results.jsonl, or $LABKIT_DATA_DIR/results.jsonl; --reference: the committed
data/results.jsonl) with pandas. Without --rows or --compare: one line per run (run id, start, label, techniques,
engines, rows, hardware, git SHA). A row's engine is its params.variant, params.policy or params.engine. Rows
written before run ids existed are grouped into legacy-<time> runs. Corrupt lines are skipped with a warning
naming file and line. --compare says on stderr which hardware each side ran on, and warns when a ratio compares
different hardware. --format csv|parquet --out FILE writes the view instead of printing it (with --rows: every
column of the selected rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from labkit.cli.arguments import add_command, comma_list, output_file
from labkit.lab.analysis import (COMPARE_BY, HEADLINE_METRICS, compare, hardware_warnings, list_runs, rows_frame,
                                 select, tabulate)
from labkit.lab.results import EXPORT_FORMATS, RESULTS_FILE, export_frame, read_rows, reference_data_dir, store_path

if TYPE_CHECKING:
    import pandas as pd


def _print_frame(frame: pd.DataFrame, as_json: bool, index: bool) -> None:
    if as_json:
        data = frame.reset_index() if index else frame
        print(data.to_json(orient="records", date_format="iso", double_precision=6))
        return
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_colwidth", 40,
                           "display.float_format", "{:.4g}".format):
        print(frame.to_string(index=index))


def _files(args) -> list[Path]:
    """The files to read; a --file that does not exist is an error naming it (the default store may be empty)."""
    if args.file:
        missing = [path for path in args.file if not path.is_file()]
        if missing:
            raise ValueError(f"--file {missing[0]}: no such file")
        return args.file
    return [reference_data_dir() / RESULTS_FILE if args.reference else store_path()]


def _compare(df: pd.DataFrame, args) -> pd.DataFrame:
    """The comparison, with a stderr line per side naming its hardware and a warning for each mixed ratio."""
    table = compare(df, args.compare, args.metric, args.on)
    hardware = table.attrs.get("hardware", {})
    for group, machines in hardware.items():
        print(f"labkit results: {args.compare} {group!r} ran on {' + '.join(machines)}", file=sys.stderr)
    for warning in hardware_warnings(hardware):
        print(f"labkit results: warning: {warning}", file=sys.stderr)
    return table


def cmd_results(args) -> int:
    """`labkit results`: the runs, the rows of a selection, or a comparison; warnings for skipped lines."""
    def warn(message: str) -> None:
        print(f"labkit results: warning: {message}", file=sys.stderr)

    if (args.format is None) != (args.out is None):
        raise ValueError("--format and --out go together: e.g. --format csv --out results.csv")
    if args.format is not None and args.json:
        raise ValueError("--json prints; --format writes a file: choose one")
    files = _files(args)
    rows = [row for path in files for row in read_rows(path, on_error=warn)]
    df = rows_frame(rows)
    if df.empty:
        print(f"labkit results: no results in {', '.join(map(str, files))}", file=sys.stderr)
        if args.json:
            print("[]")
        return 0
    df = select(df, args.run, args.label, args.technique, args.engine)
    if args.compare:
        frame, index = _compare(df, args), True
    elif args.rows:
        if args.json:
            print(json.dumps([rows[i] for i in df.index], allow_nan=False))
            return 0
        frame, index = (df if args.format else tabulate(df, [args.metric] if args.metric else None)), False
    else:
        frame, index = list_runs(df), False
    if args.format:
        path = export_frame(frame, args.out, args.format, index=index)
        print(f"labkit results: wrote {len(frame)} lines to {path}", file=sys.stderr)
    else:
        _print_frame(frame, args.json, index=index)
    return 0


def add_parser(subparsers) -> None:
    """Register `labkit results` on the CLI's subparsers."""
    p = add_command(subparsers, "results", cmd_results, __doc__,
                    help="list runs in the results store; tabulate or compare them",
                    epilog="examples:\n"
                           "  labkit results                                   # the runs\n"
                           "  labkit results --rows --run last                 # the newest run's rows\n"
                           "  labkit results --compare label --technique decode --metric tokens_per_s\n"
                           "  labkit results --compare engine --technique batching --metric output_tokens_per_s\n"
                           "  labkit results --file runs/*/data/results.jsonl  # the lab runs kept under runs/\n"
                           "  labkit results --reference --compare run --technique decode  # the committed data/\n"
                           "  labkit results --rows --format parquet --out rows.parquet      # a DataFrame file",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rows", action="store_true", help="tabulate the selected rows")
    mode.add_argument("--compare", choices=tuple(COMPARE_BY), metavar="BY",
                      help=f"one column per {'/'.join(COMPARE_BY)}, ratios to the first")
    p.add_argument("--metric", default=None,
                   help=f"the metric to compare or show (default: the first of {', '.join(HEADLINE_METRICS[:4])}, "
                        "... that the rows have)")
    p.add_argument("--on", type=comma_list(str), default=None, metavar="COL,...",
                   help="--compare: the columns that name a case (default: technique, engine and the params "
                        "that vary within a group)")
    p.add_argument("--run", type=comma_list(str), default=None, metavar="ID,...",
                   help="runs by id, unique prefix, or 'last'")
    p.add_argument("--label", type=comma_list(str), default=None, metavar="LABEL,...", help="rows with these labels")
    p.add_argument("--technique", type=comma_list(str), default=None, metavar="NAME,...",
                   help="e.g. decode, batching, baseline, bench_serve")
    p.add_argument("--engine", type=comma_list(str), default=None, metavar="NAME,...",
                   help="e.g. hf-fp32, labkit-fp32, continuous")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--file", type=Path, nargs="+", action="extend", default=None, metavar="FILE",
                        help="results files to read (default: the store, runs/store/results.jsonl or "
                             "$LABKIT_DATA_DIR/results.jsonl)")
    source.add_argument("--reference", action="store_true",
                        help="read the committed reference results, data/results.jsonl")
    p.add_argument("--json", action="store_true", help="JSON on stdout: records of the table, or with --rows the rows")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                   help="write the view to --out as CSV or Parquet (Parquet needs pyarrow) instead of printing it; "
                        "with --rows every column of the selected rows")
    p.add_argument("--out", type=output_file, default=None, metavar="FILE", help="the file --format writes, atomically")
