"""The `labkit` command line: every parser and handler. Nothing outside labkit.cli imports it."""

from labkit.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
