"""`labkit router`: data-parallel replicas behind one OpenAI-compatible address, with a load-balancing policy.

The router itself is `labkit.serving.router` (policies, bookkeeping), `router_app` (forwarding) and `replicas`
(the engine processes); this module is its command line.
"""

import argparse
import shlex
import signal
import sys
from collections.abc import Callable

from labkit.cli.arguments import non_negative_int, port, positive_float, positive_int
from labkit.serving.router import POLICIES, Router, RouterConfig


def _check_url(text: str) -> str:
    from urllib.parse import urlsplit

    url = text.rstrip("/")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected http://host:port, got {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise argparse.ArgumentTypeError(f"expected http://host:port, got {text!r}")
    return url


class _Stopped(Exception):
    """SIGTERM or SIGINT: stop the replicas and exit 0."""


def _raise_stopped(stops: list) -> Callable:
    """A handler for SIGTERM and SIGINT that raises _Stopped once (later signals do not cut the cleanup short).
    uvicorn handles the signals while it serves and re-raises them to this handler after its shutdown: the
    default SIGTERM handler would end the process there, before the replicas are stopped."""
    def handler(signum, frame):
        if not stops:
            stops.append(signum)
            raise _Stopped()

    return handler


def cmd_router(args: argparse.Namespace) -> int:
    config = RouterConfig(policy=args.policy, max_attempts=args.max_attempts, max_resumes=args.max_resumes,
                          health_interval_s=args.health_interval, timeout_s=args.timeout,
                          prefix_chars=args.prefix_chars, load_factor=args.load_factor,
                          max_body_bytes=args.max_body_bytes)
    if bool(args.upstream) == bool(args.replicas):
        raise ValueError("give --replicas N (start engine processes) or --upstream URL ... (existing servers)")
    stops: list[int] = []
    handlers = {sig: signal.signal(sig, _raise_stopped(stops)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _serve(args, config)
    except _Stopped:
        pass
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stops:
        print(f"labkit router: stopped by {signal.Signals(stops[0]).name}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace, config: RouterConfig) -> None:
    """Start the replicas (if asked), serve until uvicorn stops, and stop the replicas whatever happens."""
    import uvicorn

    from labkit.serving.replicas import ReplicaSet, replica_tokenizer
    from labkit.serving.router_app import create_router_app
    from labkit.serving.server import bind_socket

    sock = bind_socket(args.host, args.port)  # fail fast, before starting replicas
    replicas = tokenizer = None
    try:
        urls = list(args.upstream or ())
        if args.replicas:
            serve_args = ["--model", args.model, "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
                          *(["--dummy"] if args.dummy else []), *shlex.split(args.serve_args or "")]
            replicas = ReplicaSet(args.replicas, serve_args, threads_per_replica=args.threads_per_replica,
                                  device=args.device)
            print(f"labkit router: starting {args.replicas} replicas of {args.model} "
                  f"({replicas.threads} threads each)", file=sys.stderr, flush=True)
            urls = replicas.start()
            tokenizer = replica_tokenizer(args.model, args.dummy)
        router = Router(urls, config)
        if replicas is not None:
            for replica, pid in zip(router.replicas, replicas.pids):
                replica.pid = pid
            replicas.supervise(on_exit=router.process_exited, on_restart=router.process_restarted)
        host, port = sock.getsockname()[:2]
        print(f"labkit router: http://{host}:{port} -> {', '.join(urls)} ({config.policy})", file=sys.stderr,
              flush=True)
        server = uvicorn.Server(uvicorn.Config(create_router_app(router, tokenizer), log_level=args.log_level,
                                               lifespan="on"))
        server.run(sockets=[sock])
    finally:
        sock.close()
        if replicas is not None:
            replicas.stop()


def add_parser(subparsers) -> None:
    """Register `labkit router` on the CLI's subparsers."""
    from labkit.model.loader import EMBEDDED_MODEL

    defaults = RouterConfig()
    p = subparsers.add_parser(
        "router", help="data-parallel replicas behind one OpenAI-compatible address (load balancing)",
        description="Spread requests over several engine processes (--replicas N starts them) or any\n"
                    "OpenAI-compatible servers (--upstream URL ...), by policy: round_robin, least_outstanding or\n"
                    "prefix_affinity. /router/stats lists the loads, restarts and recent requests.\n\n"
                    "When a replica dies: a request it had not answered yet is retried whole on another replica;\n"
                    "a stream it was sending is resumed on another from the tokens already sent (the prompt's\n"
                    "and the streamed token ids, the remaining max_tokens), so the client sees one stream with\n"
                    "no token twice or lost (greedy text as one replica would give; a sampled stream goes on\n"
                    "with a different draw). It gets no traffic until it answers /health again. Replicas the\n"
                    "router started are restarted with backoff (0.5 s doubling to 30 s) and die with the router\n"
                    "(SIGTERM, Ctrl-C, a crash, even kill -9). See docs/router.md.",
        epilog="examples:\n"
               "  labkit router --replicas 2 --port 8000                       # two labkit serve processes\n"
               "  labkit router --replicas 2 --model tiny-smollm2 --dummy --policy prefix_affinity\n"
               "  labkit router --upstream http://127.0.0.1:8001 --upstream http://127.0.0.1:8002\n"
               "  labkit bench serve --port 8000 --num-prompts 32     # then: per-replica load in the table",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=positive_int, default=None, help="labkit serve processes to start")
    p.add_argument("--upstream", action="append", type=_check_url, default=None, metavar="URL",
                   help="an existing OpenAI-compatible server (repeat for each)")
    p.add_argument("--policy", choices=POLICIES, default=defaults.policy, help="(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=port, default=8000, help="0 picks a free port (default: %(default)s)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="--replicas: the model each serves (default: %(default)s)")
    p.add_argument("--dummy", action="store_true", help="--replicas: random weights of a preset")
    p.add_argument("--device", default="auto", help="--replicas: cpu, or cuda (one GPU each, in turn)")
    p.add_argument("--dtype", default="fp32", help="--replicas: weights dtype (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=positive_int, default=16, help="--replicas: batch limit of each")
    p.add_argument("--threads-per-replica", type=positive_int, default=None,
                   help="--replicas: torch threads each (default: this machine's cores / replicas)")
    p.add_argument("--serve-args", default=None, metavar="'ARGS'", help="--replicas: more labkit serve options")
    p.add_argument("--max-attempts", type=positive_int, default=defaults.max_attempts,
                   help="replicas tried per request (default: %(default)s)")
    p.add_argument("--max-resumes", type=non_negative_int, default=defaults.max_resumes,
                   help="times a stream cut off by a dying replica is resumed on another (default: %(default)s)")
    p.add_argument("--health-interval", type=positive_float, default=defaults.health_interval_s, metavar="SECONDS",
                   help="probe a replica that is down this often (default: %(default)s)")
    p.add_argument("--timeout", type=positive_float, default=defaults.timeout_s, metavar="SECONDS",
                   help="longest wait for a replica's next byte (default: %(default)s)")
    p.add_argument("--prefix-chars", type=positive_int, default=defaults.prefix_chars,
                   help="prefix_affinity: prompt characters hashed (default: %(default)s)")
    p.add_argument("--load-factor", type=positive_float, default=defaults.load_factor,
                   help="prefix_affinity: a replica above this times the mean load passes requests on "
                        "(default: %(default)s)")
    p.add_argument("--max-body-bytes", type=positive_int, default=defaults.max_body_bytes,
                   help="larger bodies are answered 413 (default: %(default)s)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_router)


__all__ = ["cmd_router", "add_parser"]
