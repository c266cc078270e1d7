"""`labkit serve`: an OpenAI-compatible HTTP server over the labkit engine (FastAPI + uvicorn).

The server itself is `labkit.serving` (app, worker, HTTP limits, server); this module is its command line.
"""

import argparse
import logging
import os
import signal
import sys

from labkit.cli.arguments import (add_command, add_engine_options, engine_config_from_args, non_negative_int, port,
                                  positive_float, positive_int)
from labkit.serving.addresses import API_KEY_ENV, is_loopback, server_url
from labkit.serving.config import (DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_TIMEOUT_S,
                                   DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_QUEUE,
                                   DEFAULT_MAX_QUEUE_WAIT_S, DEFAULT_SHUTDOWN_GRACE_S, ServeConfig)
from labkit.serving.protocol import DEFAULT_CHAT_MAX_TOKENS


def cmd_serve(args: argparse.Namespace) -> int:
    from labkit.engine import Engine
    from labkit.model.llama import SUPPORTED_ARCHITECTURES, UnsupportedArchitecture
    from labkit.serving.app import create_app
    from labkit.serving.server import bind_socket, exit_now, make_server, run_until_stopped

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    config = ServeConfig(served_model_name=args.served_model_name, max_queue=args.max_queue, api_key=api_key,
                         max_body_bytes=args.max_body_bytes, max_queue_wait_s=args.max_queue_wait,
                         default_max_tokens=args.default_max_tokens, max_connections=args.max_connections,
                         header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                         keep_alive_timeout_s=args.timeout_keep_alive,
                         shutdown_grace_s=args.timeout_graceful_shutdown, check_host=args.check_host,
                         log_iteration_details=args.enable_logging_iteration_details)
    engine_config = engine_config_from_args(args)  # a refused combination fails here, before anything loads
    if config.log_iteration_details:
        log_to_stderr(logging.getLogger("labkit.serving.server"))
    if engine_config.parallel.tensor_parallel_size > 1:  # this process becomes rank 0 of N it starts (cli.serve_tp)
        from labkit.cli.serve_tp import serve_tensor_parallel
        return serve_tensor_parallel(args, config, engine_config)
    sock = bind_socket(args.host, args.port)  # fail fast, before loading a model
    try:
        try:
            engine = Engine.load(config=engine_config)
        except UnsupportedArchitecture as exc:
            # its advice, "--engine hf", is an option of `labkit baseline`: the server has one engine, ours
            model = engine_config.model.model
            reason, supported = str(exc).split("; use ")[0], ", ".join(SUPPORTED_ARCHITECTURES)
            if supported not in reason:
                reason += f" (the labkit engine runs {supported} models)"
            raise ValueError(f"{reason}. labkit serve has no other engine: `labkit baseline --engine hf --model "
                             f"{model}` runs this model with transformers") from None
        app = create_app(engine, config)
        host, port = sock.getsockname()[:2]
        print(f"labkit serve: {config.served_model_name or engine.name} on http://{host}:{port} "
              f"(device {engine.device}, batch of up to {engine_config.scheduler.max_num_seqs}, "
              f"{engine.blocks.num_blocks} KV blocks of {engine_config.block_size} tokens, "
              f"max queue {config.max_queue}, {'API key required' if api_key else 'no API key'})",
              file=sys.stderr, flush=True)
        print(f"labkit serve: techniques: {format_techniques(engine.techniques())}", file=sys.stderr, flush=True)
        if not api_key and not is_loopback(server_url(host, port)):
            print(f"labkit serve: warning: {host} accepts other machines and no API key is set "
                  f"(--api-key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
        server = make_server(app, log_level=args.log_level, access_log=args.log_level == "debug")
        stops = run_until_stopped(server, sock)  # a requested stop exits 0 instead of as an interrupt
    finally:
        sock.close()
    if stops:
        print(f"labkit serve: stopped by {signal.Signals(stops[0]).name}", file=sys.stderr)
        exit_now(0)
    return 0


def log_to_stderr(logger: logging.Logger) -> None:
    """The server's own log lines (INFO and up) on stderr, each prefixed as the start-up lines are."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("labkit serve: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def format_techniques(techniques: dict[str, str]) -> str:
    """`Engine.techniques()` as one line: "dtype fp32, quantization int8, speculative ngram(...), ..."."""
    return ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in techniques.items())


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `labkit serve` on the CLI's subparsers."""
    parser = add_command(
        subparsers, "serve", cmd_serve, help="an OpenAI-compatible HTTP server over the labkit engine",
        description="Serve a model over OpenAI's HTTP API: /v1/completions, /v1/chat/completions (streaming as\n"
                    "server-sent events), /v1/models, /health and /metrics (Prometheus). Concurrent requests are\n"
                    "decoded together (continuous batching): up to --max-num-seqs run in each step, up to\n"
                    "--max-queue more wait for a place, and more are answered 429.",
        epilog="examples:\n"
               "  labkit serve                                   # the embedded SmolLM2 on 127.0.0.1:8000\n"
               "  labkit serve tiny-smollm2 --dummy --port 0\n"
               "  labkit serve --max-num-seqs 32 --kv-cache-mb 1024 --max-queue-wait 30\n"
               "  labkit serve --quantization int8 --kv-cache-dtype int8 --no-enforce-eager \\\n"
               "      --speculative-config '{\"method\": \"ngram\", \"num_speculative_tokens\": 8, \"prompt_lookup_max\": 4}'\n"
               f"  {API_KEY_ENV}=secret labkit serve --host 0.0.0.0   # other hosts: require a key",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=port, default=8000,
                        help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--max-queue", type=non_negative_int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait for a place in the batch (default: %(default)s)")
    parser.add_argument("--max-queue-wait", type=positive_float, default=DEFAULT_MAX_QUEUE_WAIT_S,
                        metavar="SECONDS", help="a request still waiting after this long is answered 503 with "
                                                "Retry-After (default: %(default)s)")
    parser.add_argument("--default-max-tokens", type=positive_int, default=DEFAULT_CHAT_MAX_TOKENS,
                        help="reply length of a chat request without max_tokens, at most what the context "
                             "leaves (default: %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies are answered 413 (default: %(default)s)")
    parser.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open connections; a request on one more is answered 503 (default: %(default)s)")
    parser.add_argument("--header-timeout", type=positive_float, default=DEFAULT_HEADER_TIMEOUT_S, metavar="SECONDS",
                        help="a connection that has not sent a whole request head this long after opening, or "
                             "after its last response, is closed (default: %(default)s)")
    parser.add_argument("--body-timeout", type=positive_float, default=DEFAULT_BODY_TIMEOUT_S, metavar="SECONDS",
                        help="a request body not received within this long is answered 408 (default: %(default)s)")
    parser.add_argument("--timeout-keep-alive", type=positive_float, default=DEFAULT_KEEP_ALIVE_TIMEOUT_S,
                        metavar="SECONDS", help="an idle connection between requests is closed after this long "
                                                "(default: %(default)s)")
    parser.add_argument("--timeout-graceful-shutdown", type=positive_float, default=DEFAULT_SHUTDOWN_GRACE_S,
                        metavar="SECONDS", help="on SIGTERM or Ctrl-C, new requests are answered 503 and those in "
                                                "flight get this long to finish; then each open stream ends with "
                                                "an error event and [DONE] (default: %(default)s)")
    parser.add_argument("--check-host", action=argparse.BooleanOptionalAction, default=True,
                        help="answer 400 to a request over loopback whose Host is not localhost, 127.0.0.1 or [::1] "
                             "(DNS rebinding); --no-check-host behind a local proxy that keeps the public Host "
                             "(default: on)")
    add_engine_options(parser)
    parser.add_argument("--enable-logging-iteration-details", action="store_true",
                        help="log every engine step to stderr, as vLLM's flag does: context (prompt) requests and "
                             "tokens, generation requests and tokens, the step's wall time, KV cache usage")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default: %(default)s)")
    return parser


__all__ = ["cmd_serve", "add_parser", "format_techniques"]
