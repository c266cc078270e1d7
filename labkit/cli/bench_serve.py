"""`labkit bench serve`: load-test an OpenAI-compatible server with `labkit.serving.loadgen` and print vLLM's
summary table; vLLM's `vllm bench serve` flag names are accepted."""

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path

from labkit.bench.peers import START_TIMEOUT_S
from labkit.cli.arguments import add_server_options, non_negative_float, non_negative_int, positive_float, positive_int
from labkit.cli.ping import add_api_key_options
from labkit.serving import loadgen
from labkit.serving.addresses import api_key_for, server_url
from labkit.serving.load_metrics import METRICS, PERCENTILES, percentile_key
from labkit.serving.loadgen import SLO_KEYS, BenchServeConfig, parse_goodput, parse_slo
from labkit.serving.protocol import ENDPOINTS, ServerError


def format_table(result: dict) -> str:
    """vLLM-style text summary of a result document."""
    m, c = result["metrics"], result["config"]

    def fmt(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    rate = "inf" if c["request_rate"] is None else c["request_rate"]
    counted = {"usage": "the server's usage", "tokenizer": f"re-tokenized with {result.get('tokenizer_id')}",
               "mixed": f"usage, else re-tokenized with {result.get('tokenizer_id')}"}
    lines = [f"{' Serving benchmark ':=^56}",
             f"{'Model / endpoint:':<40}{result['server']['model']} {c['endpoint']}",
             f"{'Request rate / burstiness:':<40}{rate} / {c['burstiness']}",
             f"{'Max concurrency:':<40}{c['max_concurrency'] or 'none'}",
             f"{'Server prefix caching:':<40}{_on_off(result['server'].get('prefix_caching'))}",
             f"{'Successful / failed requests:':<40}{m['num_completed']} / {m['num_failed']}",
             f"{'Duration (s):':<40}{fmt(m['duration_s'])}",
             f"{'Total input / output tokens:':<40}{m['total_input_tokens']} / {m['total_output_tokens']}",
             f"{'Token counts from:':<40}{counted.get(result.get('token_count_source'), 'n/a')}",
             f"{'Request throughput (req/s):':<40}{fmt(m['request_throughput_req_per_s'])}",
             f"{'Output token throughput (tok/s):':<40}{fmt(m['output_throughput_tokens_per_s'])}",
             f"{'Total token throughput (tok/s):':<40}{fmt(m['total_token_throughput_tokens_per_s'])}"]
    if m["request_goodput_req_per_s"] is not None:
        lines.append(f"{'Goodput (req/s):':<40}{fmt(m['request_goodput_req_per_s'])}")
    titles = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
              "itl": "Inter-token latency", "e2el": "End-to-end latency"}
    stats = ["mean", "median", *map(percentile_key, sorted({*PERCENTILES, *c.get("metric_percentiles", ())}))]
    for name in METRICS:
        lines.append(f"{' ' + titles[name] + ' ':-^56}")
        for stat in stats:
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms):':<40}{fmt(m[f'{stat}_{name}_ms'])}")
    for replica, r in (result.get("replicas") or {}).items():
        lines.append(f"{f'Replica {replica} (req ok/failed, tok/s):':<40}{r['num_completed']} / {r['num_failed']}, "
                     f"{r['output_throughput_tokens_per_s']:.1f}")
    lines.append("=" * 56)
    for error, count in result["errors"].items():
        lines.append(f"{count} × {error}")
    return "\n".join(lines)


def _on_off(value: bool | None) -> str:
    return "unknown (the server does not say)" if value is None else "on" if value else "off"


def _result_file(args: argparse.Namespace) -> Path | None:
    """Where the result JSON goes (None: the store's bench_serve/ folder), checked before any request is sent:
    a --result-file's folder must already exist (a typo must not create folders), and the store must be
    writable, so a long load test cannot end unsaved."""
    from labkit.lab.results import check_store, check_writable, store_path

    store = store_path().parent  # not data_dir(): checking creates nothing
    result_file = args.result_file
    if args.result_dir is not None or args.result_filename is not None:
        if result_file is not None:
            raise ValueError("give --result-file (a whole path) or --result-dir/--result-filename, not both")
        result_file = Path(args.result_dir or store / "bench_serve") / (args.result_filename
                                                                       or loadgen.default_result_name())
    elif result_file is not None:
        folder = result_file.expanduser().absolute().parent
        if not folder.is_dir():
            raise ValueError(f"--result-file {args.result_file}: the folder {folder} does not exist")
    check_writable(result_file or store / "bench_serve" / loadgen.default_result_name())
    check_store()
    return result_file


@contextlib.contextmanager
def _peer(args: argparse.Namespace):
    """With --server: the peer server started for this run (labkit.bench.peers.Peer), stopped after it."""
    if args.server is None:
        yield None
        return
    from labkit.bench.peers import Peer

    peer = Peer(args.server, args.peer_python, model=args.peer_model, flags=args.peer_args,
                start_timeout_s=args.peer_start_timeout)
    print(f"labkit bench serve: starting {args.server} from {peer.python} (its log goes to peers/ in the results "
          "store)", file=sys.stderr)
    with peer:
        print(f"labkit bench serve: {args.server} {peer.version} ready on {peer.url} after {peer.start_s:.0f} s",
              file=sys.stderr)
        yield peer


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from labkit.lab.results import to_jsonable

    result_file = _result_file(args)
    if args.server is not None:
        from labkit.bench.peers import peer_python

        if args.base_url is not None:
            raise ValueError("give --server (start a peer) or --base-url (an existing server), not both")
        peer_python(args.server, args.peer_python)  # a missing python: one line, before anything starts
    elif args.peer_python or args.peer_args or args.peer_model:
        raise ValueError("--peer-python, --peer-args and --peer-model need --server")
    base_url = args.base_url or server_url(args.host, args.port)
    api_key, note = api_key_for(base_url, args.api_key, args.use_env_key)
    config = BenchServeConfig(
        base_url=base_url, model=args.model, endpoint=args.endpoint, num_prompts=args.num_prompts,
        input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
        request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups, seed=args.seed, temperature=args.temperature, ignore_eos=args.ignore_eos,
        return_token_ids=args.return_token_ids, slo={**parse_slo(args.slo), **parse_goodput(args.goodput)},
        timeout_s=args.timeout, api_key=api_key, tokenizer=args.tokenizer,
        percentile_metrics=args.percentile_metrics, metric_percentiles=args.metric_percentiles)
    if note:
        print(f"labkit bench serve: {note}", file=sys.stderr)
    with _peer(args) as peer:
        if peer is not None:
            config = dataclasses.replace(config, base_url=peer.url)
        try:
            result = loadgen.benchmark(config)
        except ServerError as exc:
            print(f"labkit bench serve: {exc}", file=sys.stderr)
            return 1
    if peer is not None:  # the row says which server ran, its version and flags
        result["config"]["server"] = peer.describe()
    path = loadgen.save_result(result, result_file)
    print(format_table(result), file=sys.stderr)
    print(f"labkit bench serve: wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_jsonable(result), allow_nan=False))
    return 0 if result["metrics"]["num_completed"] else 1


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second or inf, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a rate > 0 or inf, got {text!r}")
    return value


def _endpoint(text: str) -> str:
    """chat or completions, or vLLM's spelling: the path."""
    return {path: name for name, path in ENDPOINTS.items()}.get(text.rstrip("/"), text)


def _names(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected percentiles like 50,90,99, got {text!r}") from None


def _add_peer_options(parser: argparse.ArgumentParser) -> None:
    """--server and the options of the peer it starts (labkit.bench.peers)."""
    g = parser.add_argument_group("a peer server started for the run (README: Peers)")
    g.add_argument("--server", choices=("vllm", "llama.cpp", "labkit"), default=None,
                   help="start this server on a free port, load it, stop it: vllm (its CPU build), llama.cpp "
                        "(llama-cpp-python[server]) or labkit (`labkit serve`); default: use --host/--port")
    g.add_argument("--peer-python", default=None, metavar="PYTHON",
                   help="the python of the peer's venv (default: $LABKIT_VLLM_PYTHON or $LABKIT_LLAMACPP_PYTHON; "
                        "labkit: this python)")
    g.add_argument("--peer-args", default="", metavar="FLAGS",
                   help="extra flags for the peer, one string: --peer-args='--max-num-seqs 64' (vllm gets "
                        "--max-model-len 2048, llama.cpp --n_threads 2 --n_ctx 2048 unless given)")
    g.add_argument("--peer-start-timeout", type=positive_float, default=START_TIMEOUT_S, metavar="SECONDS",
                   help="how long the peer may take to answer /v1/models (default: %(default)s; vLLM compiles its "
                        "model first, ~80 s on 2 quiet cores, much longer on busy ones)")
    g.add_argument("--peer-model", default=None, metavar="MODEL",
                   help="what the peer serves (default: the embedded model; llama.cpp: its GGUF file)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `labkit bench serve` on the `labkit bench` subparsers."""
    parser = subparsers.add_parser(
        "serve", help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, throughput, goodput)",
        description="Send a seeded workload of random-word prompts to an OpenAI-compatible server (labkit\n"
                    "serve, vLLM, TGI, llama.cpp) and measure it as vLLM's benchmark_serving does. Writes one\n"
                    "JSON result (docs/bench_serve_schema.md; it also carries vLLM's result keys) and a row in\n"
                    "the results store. The table goes to stderr; --json prints the result to stdout.\n"
                    "vLLM's `vllm bench serve` flag names work too (--random-input-len, --goodput, ...).\n"
                    "A key in $LABKIT_API_KEY or $OPENAI_API_KEY is sent only to a loopback address\n"
                    "(127.0.0.1, ::1, localhost) unless --use-env-key; --api-key is always sent.",
        epilog="examples:\n"
               "  labkit bench serve --server vllm --peer-python ~/venvs/vllm/bin/python --num-prompts 64\n"
               "  labkit bench serve --num-prompts 20 --request-rate 2 --slo ttft_ms=500,tpot_ms=100\n"
               "  labkit bench serve --base-url http://127.0.0.1:8001 --endpoint chat --max-concurrency 4 --json\n"
               "  labkit bench serve --no-ignore-eos --no-return-token-ids   # a server without vLLM's extensions\n"
               "  labkit bench serve --dataset-name random --random-input-len 128 --random-output-len 32 \\\n"
               "      --goodput ttft:500 tpot:50 --metric-percentiles 50,90,99 --result-dir results --save-result",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_options(parser)
    parser.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (overrides --host/--port)")
    _add_peer_options(parser)
    parser.add_argument("--endpoint", type=_endpoint, choices=tuple(ENDPOINTS), default="completions",
                        help="which API to load: completions or chat, or vLLM's /v1/completions or "
                             "/v1/chat/completions (default: %(default)s)")
    parser.add_argument("--dataset-name", choices=("random",), default="random",
                        help="vLLM's workload name: random (random-word prompts) is the one supported")
    parser.add_argument("--num-prompts", type=positive_int, default=50, help="timed requests (default: %(default)s)")
    parser.add_argument("--input-len", "--random-input-len", dest="input_len", type=positive_int, default=64,
                        help="words per prompt, about one token each (default: %(default)s)")
    parser.add_argument("--output-len", "--random-output-len", dest="output_len", type=positive_int, default=32,
                        help="max_tokens per request (default: %(default)s)")
    parser.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=non_negative_float,
                        default=0.0, help="lengths uniform in len*(1±r), r in [0, 1) (default: %(default)s)")
    parser.add_argument("--request-rate", type=_rate, default=math.inf,
                        help="requests per second, or inf to send all at once (default: %(default)s)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of inter-arrival times: 1 is Poisson, < 1 burstier (default: %(default)s)")
    parser.add_argument("--max-concurrency", type=positive_int, default=None,
                        help="cap on requests in flight (default: no cap)")
    parser.add_argument("--num-warmups", type=non_negative_int, default=1,
                        help="untimed requests first (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and arrivals (default: %(default)s)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="(default: %(default)s)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="send vLLM's ignore_eos so outputs have exactly --output-len tokens (default: on)")
    parser.add_argument("--return-token-ids", action=argparse.BooleanOptionalAction, default=True,
                        help="ask for vLLM's per-chunk token_ids so ITL splits multi-token chunks exactly; "
                             "without them the usage total is shared among chunks (default: on)")
    parser.add_argument("--slo", default=None, metavar="KEY=MS,...",
                        help=f"goodput targets among {', '.join(SLO_KEYS)}, e.g. ttft_ms=500,tpot_ms=50")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help="vLLM's spelling of --slo: ttft:500 tpot:50 e2el:2000")
    parser.add_argument("--percentile-metrics", type=_names, default=("ttft", "tpot", "itl"), metavar="NAMES",
                        help=f"metrics whose vLLM keys go into the result, among {','.join(METRICS)} "
                             "(default: ttft,tpot,itl)")
    parser.add_argument("--metric-percentiles", type=_percentiles, default=(99.0,), metavar="PERCENTILES",
                        help="percentiles of those metrics, e.g. 50,90,99 (default: 99; the lab's own metrics "
                             "always have p90 and p99)")
    parser.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                        help="counts tokens when the server sends no usage (llama.cpp): an HF id or a local "
                             "directory (default: the embedded model's tokenizer)")
    parser.add_argument("--timeout", type=positive_float, default=300.0, metavar="SECONDS",
                        help="per-request timeout (default: %(default)s)")
    add_api_key_options(parser)
    parser.add_argument("--result-file", type=Path, default=None,
                        help="where the JSON goes, in an existing folder (default: bench_serve/bench_serve_<UTC>.json "
                             "in the results store, runs/store/ or $LABKIT_DATA_DIR)")
    parser.add_argument("--result-dir", type=Path, default=None,
                        help="vLLM's spelling: the folder for the JSON (default: bench_serve/ in the results store)")
    parser.add_argument("--result-filename", default=None,
                        help="vLLM's spelling: the JSON's file name in --result-dir (default: bench_serve_<UTC>.json)")
    parser.add_argument("--save-result", action="store_true",
                        help="accepted for vLLM's command lines: the result is always saved")
    parser.add_argument("--json", action="store_true", help="print the result JSON to stdout")
    parser.add_argument("--refresh-reference", action="store_true",
                        help="write the row and the default result file to the committed reference data/ instead "
                             "of the untracked store runs/store/ (or $LABKIT_DATA_DIR)")
    parser.set_defaults(func=cmd_bench_serve)
    return parser


__all__ = ["format_table", "cmd_bench_serve", "add_parser"]
