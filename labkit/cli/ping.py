"""`labkit ping`: send one request to an OpenAI-compatible server and time it (`labkit.serving.client.ping`).

Also `add_api_key_options`, the --api-key/--use-env-key pair `labkit bench serve` shares.
"""

import argparse
import json
import sys

from labkit.cli.arguments import add_server_options, positive_float, positive_int
from labkit.serving import client
from labkit.serving.addresses import API_KEY_ENVS, api_key_for, server_url
from labkit.serving.protocol import ENDPOINTS, ServerError


def cmd_ping(args: argparse.Namespace) -> int:
    api_key, note = api_key_for(server_url(args.host, args.port), args.api_key, args.use_env_key)
    if note:
        print(f"labkit ping: {note}", file=sys.stderr)
    try:
        result = client.ping(args.host, args.port, args.model, args.prompt, args.max_tokens, args.endpoint, api_key,
                             timeout_s=args.timeout)
    except ServerError as exc:
        print(f"labkit ping: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(result.text)
    counts = ("no usage sent" if result.completion_tokens is None else
              f"{result.prompt_tokens} prompt + {result.completion_tokens} completion tokens")
    print(f"{result.model} at {result.url}: {result.latency_ms:.0f} ms (first text after {result.ttft_ms:.0f} ms, "
          f"{counts}, finish {result.finish_reason})")
    return 0


def add_api_key_options(parser: argparse.ArgumentParser) -> None:
    """--api-key and --use-env-key: a key from the environment goes to loopback hosts only unless asked."""
    envs = " or ".join(f"${name}" for name in API_KEY_ENVS)
    parser.add_argument("--api-key", default=None,
                        help=f"bearer key to send (default: {envs} when the server is on a loopback address, "
                             "else none)")
    parser.add_argument("--use-env-key", action="store_true",
                        help=f"also send {envs} to a server that is not on a loopback address")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `labkit ping` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "ping", help="send one request to an OpenAI-compatible server and time it",
        description="Stream one greedy request to a server (labkit serve, vLLM, llama.cpp, ...) and print the\n"
                    "text and its latency. Exit status 1, with one line naming the URL, when the server is\n"
                    "unreachable, answers an error, or sends a reply that is not OpenAI's stream.",
        epilog="examples:\n"
               "  labkit ping\n"
               "  labkit ping --port 8001 --endpoint completions --prompt 'Once upon a time' --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_options(parser)
    parser.add_argument("--prompt", default="Say hello.", help="the prompt (default: %(default)r)")
    parser.add_argument("--max-tokens", type=positive_int, default=16, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="chat",
                        help="chat (with the model's chat template) or completions (default: %(default)s)")
    add_api_key_options(parser)
    parser.add_argument("--timeout", type=positive_float, default=60.0, metavar="SECONDS",
                        help="give up after this long (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=cmd_ping)
    return parser


__all__ = ["cmd_ping", "add_api_key_options", "add_parser"]
