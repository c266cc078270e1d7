"""Running a server: a listening socket, a uvicorn server with the HTTP limits and a graceful shutdown, and
`ServerThread` to serve an app on a background thread (tests, notebooks).

On SIGTERM the server stops taking work (503), gives requests in flight `shutdown_grace_s` to finish, then ends
each open stream with an error event and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

from labkit.serving.http_limits import guarded_h11_protocol

# After the grace period, for the last events (an error and [DONE]) to reach their clients and the connections
# to close; a client that has not read them by then is cut. The process exits within grace + this + ~0.3 s.
SHUTDOWN_FLUSH_S = 0.5


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one); a clear ValueError when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app, **uvicorn_kwargs):
    """A uvicorn server for an app of create_app's, with the connection limits of its ServeConfig, and a
    graceful shutdown: new requests answer 503 at once, those in flight get shutdown_grace_s to finish, then
    the engine's thread ends the rest (a stream with an error event and `data: [DONE]`) before uvicorn closes
    the connections. uvicorn_kwargs go to uvicorn.Config (log_level, access_log...)."""
    import uvicorn

    if not hasattr(app.state, "worker"):  # an app without an engine (labkit.serving.router's): plain uvicorn
        return uvicorn.Server(uvicorn.Config(app, lifespan="on", **uvicorn_kwargs))
    config, worker = app.state.config, app.state.worker  # a ServeConfig and an EngineWorker

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            worker.drain()  # the sockets still listen, so a new request gets a 503, not a refused connection
            deadline = time.monotonic() + config.shutdown_grace_s
            while worker.has_work and time.monotonic() < deadline and not self.force_exit:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(worker.stop)
            await super().shutdown(sockets)

    return DrainingServer(uvicorn.Config(
        app, http=guarded_h11_protocol(config.max_connections, config.header_timeout_s), lifespan="on",
        timeout_keep_alive=config.keep_alive_timeout_s, timeout_graceful_shutdown=SHUTDOWN_FLUSH_S, **uvicorn_kwargs))


def run_until_stopped(server, sock: socket.socket) -> list[int]:
    """Run a server of make_server's on the socket in this (main) thread until SIGINT or SIGTERM; the signals
    that stopped it. uvicorn shuts down gracefully on them, then re-raises the signal to the handler it found:
    that handler is a no-op here, so that a requested stop returns instead of ending the process."""
    stops: list[int] = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: stops.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return stops


def exit_now(code: int) -> None:
    """End the process once a signal (or a failure) has stopped the server, so that it exits when
    --timeout-graceful-shutdown says: the interpreter's own exit (tearing down torch's modules and objects) takes
    1-3 s more on a 2-core CPU. The exit handlers still run and the output is flushed; only that teardown is
    skipped, the OS frees it all."""
    import atexit
    import logging
    import os
    import sys

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ServerThread:
    """Serve an app of create_app's with uvicorn on a background thread (tests, notebooks):
    `with ServerThread(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = make_server(app, log_level=log_level)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="labkit-serve-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["bind_socket", "make_server", "run_until_stopped", "ServerThread", "SHUTDOWN_FLUSH_S"]
