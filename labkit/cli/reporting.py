"""The end of a benchmark command: its rows stamped, stored and printed as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from labkit.lab.results import append_rows, check_store, data_dir, stamp_rows, write_json_atomic

Table = str | Callable[[list[dict]], str]


def report_rows(rows: list[dict], args: argparse.Namespace, default_file: str | None, table: Table) -> int:
    """Stamp the rows with the run id and --label, append them to the store and, unless `default_file` is None,
    write the run's JSON to --output or <store>/<default_file> (nothing with --no-save); then print the table, or
    with --json the rows on stdout and the table on stderr, and one line on stderr saying where the rows went.
    The options come from `arguments.add_run_output_options`. Returns the exit status, 0."""
    rows = stamp_rows(rows, label=args.label)
    written = []
    if not args.no_save:
        written.append(append_rows(rows))
        if default_file is not None:
            written.append(write_json_atomic(args.output or data_dir() / default_file, rows))
    text = table(rows) if callable(table) else table
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(rows, indent=2))
    if written:
        print(f"results: {', '.join(map(str, written))} (run {rows[0]['run_id'] if rows else '-'})", file=sys.stderr)
    return 0


def measure_and_report(args: argparse.Namespace, measure: Callable[[], list[dict]], default_file: str | None,
                       table: Table) -> int:
    """Check the store can be written (unless --no-save) before `measure()` runs, so an unwritable store cannot
    lose a measurement of minutes; then `report_rows` of what it returns."""
    if not args.no_save:
        check_store()
    return report_rows(measure(), args, default_file, table)


def log_line(message: str) -> None:
    """A line on stderr above the progress bars, which stay whole (a benchmark's `log=` callback)."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


__all__ = ["report_rows", "measure_and_report", "log_line"]
