"""`labkit serve --tensor-parallel-size N`: one server over N ranks (`labkit.parallel.serve`), rank 0 serving HTTP.

`cmd_serve` hands over here when N > 1. This process is rank 0: it refuses what the ranks could not serve before
any process starts, binds the socket, starts the other ranks, serves the app over its `LockstepEngine`, and stops
the ranks once the server has drained. A rank that dies, fails or drifts from rank 0 stops the server: exit 1,
with one line naming the rank.
"""

from __future__ import annotations

import signal
import sys
import threading

from labkit.engine.config import EngineConfig
from labkit.parallel.serve import RankGroup, RankSpec, check_spec
from labkit.serving.addresses import is_loopback, server_url
from labkit.serving.config import ServeConfig

FAILURE_EXIT_S = 30.0  # after a rank's failure, the server's shutdown gets this long before the process ends


def rank_spec(args, engine_config: EngineConfig) -> RankSpec:
    """What every rank builds, from the one engine configuration; speculation is refused (not split yet)."""
    m = engine_config.model
    if engine_config.speculative is not None:
        raise ValueError("--speculative-config with --tensor-parallel-size: speculation does not run under tensor "
                         "parallelism yet; drop one of the two")
    return RankSpec(world_size=engine_config.parallel.tensor_parallel_size, model=m.model, dummy=m.dummy,
                    device=m.device, dtype=m.dtype, quantize=m.quantize, linear_layout=m.linear_layout, gemm=m.gemm,
                    seed=m.seed, engine_config=engine_config)


def serve_tensor_parallel(args, config: ServeConfig, engine_config: EngineConfig) -> int:
    """Serve over the config's tensor_parallel_size ranks until SIGINT/SIGTERM (0) or a rank's failure (1)."""
    from labkit.serving.app import create_app
    from labkit.serving.server import bind_socket, exit_now, make_server, run_until_stopped

    spec = rank_spec(args, engine_config)
    plan = check_spec(spec)  # one line, before any process starts
    sock = bind_socket(args.host, args.port)
    try:
        with RankGroup(spec) as ranks:
            engine = ranks.start()
            server = make_server(create_app(engine, config), log_level=args.log_level,
                                 access_log=args.log_level == "debug")
            ranks.on_failure = lambda message: _stop_on_failure(server, ranks, message)
            _announce(engine, config, spec, plan, sock)
            stops = run_until_stopped(server, sock)
    finally:
        sock.close()
    if ranks.failure is not None:
        print(f"labkit serve: stopped: {ranks.failure}", file=sys.stderr, flush=True)
        exit_now(1)
    if stops:
        print(f"labkit serve: stopped by {signal.Signals(stops[0]).name}; {spec.world_size} ranks stopped",
              file=sys.stderr, flush=True)
        exit_now(0)
    return 0


def _announce(engine, config: ServeConfig, spec: RankSpec, plan: str, sock) -> None:
    host, port = sock.getsockname()[:2]
    scheduler = engine.config.scheduler
    print(f"labkit serve: {config.served_model_name or engine.name} on http://{host}:{port} (tensor parallel "
          f"{spec.world_size}: {plan}; device {engine.device.type}, batch of up to {scheduler.max_num_seqs}, "
          f"{engine.blocks.num_blocks} KV blocks of {engine.config.block_size} tokens on each rank, max queue "
          f"{config.max_queue}, {'API key required' if config.api_key else 'no API key'})",
          file=sys.stderr, flush=True)
    if not config.api_key and not is_loopback(server_url(host, port)):
        print(f"labkit serve: warning: {host} accepts other machines and no API key is set", file=sys.stderr,
              flush=True)


def _stop_on_failure(server, ranks: RankGroup, message: str) -> None:
    """A rank failed (from the ranks' watch): requests in flight answer 500, new ones 503, then the server
    stops; if its shutdown hangs (a collective waiting for a dead rank), the process ends after FAILURE_EXIT_S."""
    print(f"labkit serve: {message}; stopping the server", file=sys.stderr, flush=True)
    server.should_exit = True
    backstop = threading.Timer(FAILURE_EXIT_S, ranks.exit_now, args=(message,))
    backstop.daemon = True
    backstop.start()


__all__ = ["serve_tensor_parallel", "rank_spec", "FAILURE_EXIT_S"]
