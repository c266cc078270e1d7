"""Argument types and shared options of the `labkit` command line.

Kept apart from `labkit.cli`: the command modules register their parsers with these, and `cli` imports the
command modules, so nothing imports the CLI back. Bad values raise argparse errors naming the value.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


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
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
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


__all__ = ["Parser", "positive_int", "non_negative_int", "non_negative_float", "positive_float", "port",
           "server_port", "comma_list", "add_server_options"]
