"""Argument types and shared options of the `labkit` command line.

Kept apart from `labkit.cli.main`: the command modules register their parsers with these, and `cli` imports the
command modules, so nothing imports the CLI back. Bad values raise argparse errors naming the value.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): `labkit baseline: argument --max-tokens: ...`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


MAX_SEED = 2**63 - 1  # torch.manual_seed takes up to 64 bits; numpy folds it to 32


def seed(text: str) -> int:
    """A random seed: an integer in 0..2**63-1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{MAX_SEED}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port to listen on: 0 (any free port) to 65535."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {text!r}")
    return value


def server_port(text: str) -> int:
    """A TCP port to connect to: 1 to 65535."""
    value = port(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {text!r}")
    return value


def output_file(text: str) -> Path:
    """A file the command will write: checked before any work starts (its folder may not exist yet)."""
    return _writable(text, is_dir=False)


def output_dir(text: str) -> Path:
    """A folder the command will write into: checked before any work starts."""
    return _writable(text, is_dir=True)


def _writable(text: str, is_dir: bool) -> Path:
    from labkit.lab.results import check_writable

    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got ''")
    try:
        return check_writable(text, is_dir=is_dir)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def utf8_text(value: str) -> str:
    """Text that is valid Unicode: argv bytes that are not UTF-8 arrive as lone surrogates, which tokenizers and
    JSON refuse."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"expected UTF-8 text, got {value!r}") from None
    return value


MAX_LABEL_CHARS = 100


def label(text: str) -> str:
    """A run label: one line of text, at most MAX_LABEL_CHARS characters."""
    value = utf8_text(text).strip()
    if not value or "\n" in value or "\r" in value or len(value) > MAX_LABEL_CHARS:
        raise argparse.ArgumentTypeError(f"expected one line of 1 to {MAX_LABEL_CHARS} characters, got {text!r}")
    return value


def add_label_option(parser: argparse.ArgumentParser) -> None:
    """--label: a name stored with every result row the command writes, for `labkit results --compare label`."""
    parser.add_argument("--label", type=label, default=None,
                        help="a name stored with every result row of this run, e.g. 'before-fix' "
                             "(default: $LABKIT_LABEL, else none); compare with `labkit results --compare label`")


def add_run_output_options(parser: argparse.ArgumentParser, default_file: str, progress: bool = True) -> None:
    """--output, --label, --json, --no-save and (with progress) --no-progress: what a benchmark does with its
    rows (`results.report_rows` reads them back)."""
    parser.add_argument("--output", type=output_file, default=None,
                        help=f"JSON file for this run (default: data/{default_file})")
    add_label_option(parser)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout; table on stderr")
    parser.add_argument("--no-save", action="store_true", help="write nothing under data/")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def comma_list(kind: Callable[[str], object]) -> Callable[[str], tuple]:
    """A type for `a,b,c`: each item parsed by `kind`."""
    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return tuple(kind(t) for t in items)
    return parse


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """--host, --port and --model of a client of an OpenAI-compatible server."""
    parser.add_argument("--host", default="127.0.0.1", help="server address (default: %(default)s)")
    parser.add_argument("--port", type=server_port, default=8000, help="server port (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model id (default: the first one at /v1/models)")


__all__ = ["Parser", "positive_int", "non_negative_int", "non_negative_float", "positive_float", "seed", "port",
           "server_port", "output_file", "output_dir", "utf8_text", "label", "add_label_option", "comma_list",
           "add_server_options"]
