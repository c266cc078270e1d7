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


def _checked_number(text: str, kind: Callable[[str], int | float], is_valid: Callable, expected: str,
                    unparsable: str | None = None) -> int | float:
    """`kind(text)` if it parses and `is_valid`; else an argparse error `expected <...>, got '<text>'` (with
    `unparsable` as the expectation when it does not parse, if given)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {unparsable or expected}, got {text!r}") from None
    if not is_valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _checked_number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _checked_number(text, int, lambda v: v >= 0, "an integer >= 0")


MAX_SEED = 2**63 - 1  # torch.manual_seed takes up to 64 bits; numpy folds it to 32


def seed(text: str) -> int:
    """A random seed: an integer in 0..2**63-1."""
    return _checked_number(text, int, lambda v: 0 <= v <= MAX_SEED, f"a seed in 0..{MAX_SEED}")


def non_negative_float(text: str) -> float:
    return _checked_number(text, float, lambda v: v >= 0, "a number >= 0", unparsable="a number")  # NaN fails


def positive_float(text: str) -> float:
    return _checked_number(text, float, lambda v: 0 < v < float("inf"), "a finite number > 0", unparsable="a number")


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


def add_run_output_options(parser: argparse.ArgumentParser, default_file: str | None, progress: bool = True, *,
                           output_help: str | None = None,
                           json_help: str = "print the rows as JSON on stdout; table on stderr",
                           no_save_help: str = "write nothing to the results store",
                           progress_help: str = "no progress bar") -> None:
    """--output (unless `default_file` and `output_help` are both None), --label, --json, --no-save,
    --refresh-reference and (with progress) --no-progress: what a benchmark does with its rows
    (`labkit.cli.reporting.report_rows` reads them)."""
    if default_file is not None or output_help is not None:
        parser.add_argument("--output", type=output_file, default=None,
                            help=output_help or f"JSON file for this run (default: {default_file} in the results "
                                                "store)")
    add_label_option(parser)
    parser.add_argument("--json", action="store_true", help=json_help)
    add_store_options(parser, no_save_help)
    if progress:
        parser.add_argument("--no-progress", action="store_true", help=progress_help)


def add_store_options(parser: argparse.ArgumentParser,
                      no_save_help: str = "write nothing to the results store") -> None:
    """--no-save and --refresh-reference: where a command's rows go. By default to the untracked store
    (`results.data_dir()`: $LABKIT_DATA_DIR, else runs/store/); only --refresh-reference writes the committed
    data/ (`labkit.cli.main` applies it before the command runs)."""
    parser.add_argument("--no-save", action="store_true", help=no_save_help)
    parser.add_argument("--refresh-reference", action="store_true",
                        help="write the rows and JSON to the committed reference data/ instead of the untracked "
                             "store runs/store/ (or $LABKIT_DATA_DIR)")


MODEL_HELP = "model (default: the embedded SmolLM2)"
DUMMY_HELP = "random weights from a preset (e.g. tiny-smollm2)"
DEVICE_HELP = "auto, cpu, cuda, mps"


def add_model_options(parser: argparse.ArgumentParser, *, model_help: str = MODEL_HELP, dummy_help: str = DUMMY_HELP,
                      device_help: str | None = DEVICE_HELP) -> None:
    """--model (default: the embedded model), --dummy and, unless device_help is None, --device (default auto)."""
    from labkit.model.loader import EMBEDDED_MODEL

    parser.add_argument("--model", default=EMBEDDED_MODEL, help=model_help)
    parser.add_argument("--dummy", action="store_true", help=dummy_help)
    if device_help is not None:
        add_device_option(parser, device_help)


def add_device_option(parser: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    """--device, default auto (`labkit.device.pick_device` reads it)."""
    parser.add_argument("--device", default="auto", help=help)


def add_command(subparsers: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
                description: str, *, help: str, **kwargs) -> argparse.ArgumentParser:
    """Register the command `name`, run as `func(args) -> exit status`, with its description (a command module
    passes its docstring), help line and any other `add_parser` keyword (e.g. epilog); returns its parser."""
    parser = subparsers.add_parser(name, help=help, description=description, **kwargs)
    parser.set_defaults(func=func)
    return parser


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


def speculative_config(text: str):
    """vLLM's --speculative-config: a JSON object of `SpeculativeConfig`'s keys."""
    from labkit.engine.config import SpeculativeConfig

    try:
        return SpeculativeConfig.from_json(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


ENGINE_GROUP = "engine (vLLM's names: a `vllm serve` command line works)"


def add_engine_options(parser: argparse.ArgumentParser, *, serving: bool = True) -> None:
    """The engine's settings under vLLM's names, in one group: with `serving`, the model (positional, as `vllm
    serve MODEL`, or --model), --dummy, --device, --dtype, batch limits, KV-cache size, --enable-prefix-caching,
    --enforce-eager and --tensor-parallel-size; always --quantization, --kv-cache-dtype, --speculative-config and
    --max-model-len. Defaults are EngineConfig's; `engine_config_from_args` reads them back."""
    from labkit.engine.config import DTYPE_ALIASES, KV_CACHE_DTYPES, MODEL_DTYPES, QUANTIZATIONS, EngineConfig

    defaults = EngineConfig()
    g = parser.add_argument_group(ENGINE_GROUP)
    if serving:
        from labkit.model.loader import EMBEDDED_MODEL

        g.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help=f"embedded name, HF hub id or local path; with --dummy a preset (default: {EMBEDDED_MODEL})")
        g.add_argument("--model", default=None, help="the same as MODEL (either one)")
        g.add_argument("--dummy", action="store_true", help="random weights of a preset shape (tests)")
        g.add_argument("--device", default=defaults.model.device, help="auto, cpu, cuda, cuda:1, mps (default: %(default)s)")
        g.add_argument("--dtype", default=defaults.model.dtype, choices=(*MODEL_DTYPES, *DTYPE_ALIASES),
                       help="weights and activations (default: %(default)s, labkit.device.pick_dtype's choice)")
        g.add_argument("--max-num-seqs", type=positive_int, default=defaults.scheduler.max_num_seqs,
                       help="requests decoded together in one step (default: %(default)s)")
        g.add_argument("--max-num-batched-tokens", type=positive_int,
                       default=defaults.scheduler.max_num_batched_tokens,
                       help="new tokens in one step; longer prompts are prefilled in chunks (default: %(default)s)")
        g.add_argument("--kv-cache-mb", type=positive_float, default=None, metavar="MIB",
                       help="KV-cache size (default: 512 MiB on a CPU, 40%% of the free memory on a GPU)")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=defaults.enable_prefix_caching,
                       help="reuse the KV blocks of a prompt prefix seen before (default: %(default)s)")
        g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=defaults.enforce_eager,
                       help="run the decode step eagerly; --no-enforce-eager compiles it with torch.compile "
                            "(default: %(default)s, EngineConfig's)")
        g.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=defaults.parallel.tensor_parallel_size,
                       help="split the model over N ranks started for you (gloo on a CPU, NCCL on N GPUs); rank 0 "
                            "serves HTTP (default: %(default)s)", metavar="N")
    g.add_argument("--quantization", "-q", default=None, choices=QUANTIZATIONS, metavar="METHOD",
                   help=f"weight quantization: {', '.join(QUANTIZATIONS)}; int4 is int4-g32 (default: none, the "
                        f"--dtype weights)")
    g.add_argument("--kv-cache-dtype", default=defaults.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                   help="auto: the activation dtype; int8: codes and a scale per slot and head (default: %(default)s)")
    g.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s JSON: e.g. \'{"method": "ngram", "num_speculative_tokens": 8, '
                        '"prompt_lookup_max": 4}\'; methods ngram, draft_model (with "model"), self_draft (with '
                        '"quantization"); the lab\'s "gamma_policy": "adaptive" (default: none)')
    g.add_argument("--max-model-len", type=positive_int, default=None,
                   help="the longest prompt + output served (default: the model's context)")


def model_name_from_args(args: argparse.Namespace) -> str:
    """MODEL or --model (the embedded model when neither is given); both, differing, is an error."""
    from labkit.model.loader import EMBEDDED_MODEL

    tag, flag = getattr(args, "model_tag", None), getattr(args, "model", None)
    if tag and flag and tag != flag:
        raise ValueError(f"two models given: {tag!r} and --model {flag!r}; give one")
    return tag or flag or EMBEDDED_MODEL


def engine_config_from_args(args: argparse.Namespace, **overrides):
    """The EngineConfig the engine options describe (`add_engine_options`); options a command lacks keep the
    config's defaults, and `overrides` set EngineConfig fields. Refused combinations are one-line ValueErrors."""
    from labkit.engine.config import EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig

    defaults = EngineConfig()
    get = lambda name, default: getattr(args, name, default)  # noqa: E731
    model = ModelConfig(model=model_name_from_args(args), dtype=get("dtype", defaults.model.dtype),
                        quantization=args.quantization, dummy=get("dummy", False),
                        device=get("device", defaults.model.device), max_model_len=args.max_model_len,
                        seed=get("seed", defaults.model.seed))
    scheduler = SchedulerConfig(
        max_num_seqs=get("max_num_seqs", defaults.scheduler.max_num_seqs),
        max_num_batched_tokens=get("max_num_batched_tokens", defaults.scheduler.max_num_batched_tokens))
    eager = get("enforce_eager", not get("compile", defaults.compile))
    fields = dict(scheduler=scheduler, model=model, kv_cache_dtype=args.kv_cache_dtype,
                  speculative=args.speculative_config, kv_cache_mb=get("kv_cache_mb", None),
                  enable_prefix_caching=get("enable_prefix_caching", defaults.enable_prefix_caching),
                  compile=not eager, parallel=ParallelConfig(get("tensor_parallel_size", 1)))
    return EngineConfig(**{**fields, **overrides})


__all__ = ["Parser", "positive_int", "non_negative_int", "non_negative_float", "positive_float", "seed", "port",
           "server_port", "output_file", "output_dir", "utf8_text", "label", "add_label_option", "comma_list",
           "add_server_options", "add_run_output_options", "add_store_options", "add_model_options",
           "add_device_option", "add_command", "speculative_config", "add_engine_options",
           "engine_config_from_args", "model_name_from_args"]
