"""`labkit router`: data-parallel replicas behind one OpenAI-compatible address, with a load-balancing policy.

The router forwards /v1/completions and /v1/chat/completions to one of several replicas (engine processes it
starts with `--replicas N`, or any OpenAI-compatible servers given with `--upstream URL`), chosen by policy:
- `round_robin`: the next healthy replica in turn;
- `least_outstanding`: the healthy replica with the fewest requests in flight (ties in turn);
- `prefix_affinity`: rendezvous hashing of the prompt's first characters (Thaler & Ravishankar 1998), so
  requests that share a system prompt meet that replica's prefix cache, with bounded loads (Mirrokni et al.
  2018, "Consistent Hashing with Bounded Loads"): a replica already above `load_factor` times the mean load
  passes the request on to the next replica in hash order.

Every request is answered exactly once. A replica that refuses the connection, drops it before its first
byte, or answers 429/502/503 has sent the client nothing, so the request is retried on another replica (up to
`max_attempts` replicas); one that fails mid-stream has already streamed tokens, so the stream is ended with
an OpenAI error event and `data: [DONE]` rather than replayed elsewhere. A failing replica is marked down at
once and probed at /health until it answers again. Each answer names its replica in `x-labkit-replica`, which
`labkit bench serve` counts per replica; /router/stats lists the replicas' loads and the recent requests with
their attempts and outcomes. Bodies are checked with `labkit.serving.protocol` (a JSON object, within the size limit);
errors use its OpenAI error body.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (see labkit.serving.server).
import argparse
import asyncio
import collections
import hashlib
import itertools
import json
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from labkit.serving.protocol import DONE_EVENT, ENDPOINTS, REPLICA_HEADER, APIError, parse_json_object, sse

logger = logging.getLogger("labkit.serving.router")

POLICIES = ("round_robin", "least_outstanding", "prefix_affinity")
RETRY_STATUSES = (429, 502, 503)  # the replica did no work for the request: another may
REQUEST_ID_HEADER = "x-request-id"
DEFAULT_MAX_BODY_BYTES = 1 << 20
MAX_REQUEST_LOG = 10_000


@dataclass
class RouterConfig:
    """How the router picks and retries; validated on creation."""

    policy: str = "least_outstanding"
    max_attempts: int = 2  # replicas tried for one request before it is answered 503
    health_interval_s: float = 1.0  # how often a replica that is down is probed at /health
    connect_timeout_s: float = 5.0
    timeout_s: float = 600.0  # between two bytes of a replica's answer
    prefix_chars: int = 256  # prompt characters that prefix_affinity hashes
    load_factor: float = 1.5  # prefix_affinity: a replica above this times the mean load passes requests on
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        for name in ("max_attempts", "prefix_chars", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("health_interval_s", "connect_timeout_s", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if not (isinstance(self.load_factor, (int, float)) and 1 <= self.load_factor < math.inf):
            raise ValueError(f"load_factor must be a number >= 1, got {self.load_factor!r}")


@dataclass(eq=False)
class Replica:
    """One upstream server and what the router has sent it."""

    index: int
    url: str
    is_healthy: bool = True
    num_outstanding: int = 0  # requests in flight now
    num_requests: int = 0  # requests sent (attempts, retries included)
    num_completed: int = 0  # answered in full (a stream up to its [DONE], a whole response)
    num_failed: int = 0  # connection failures, retryable refusals, streams cut off
    last_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# -- policies (plain Python: which healthy replica gets a request) ---------------------------------------------
class RoundRobin:
    name = "round_robin"

    def __init__(self):
        self._turn = itertools.count()

    def choose(self, replicas: Sequence[Replica], key: str) -> list[Replica]:
        """The replicas in the order to try them."""
        start = next(self._turn) % len(replicas)
        return [*replicas[start:], *replicas[:start]]


class LeastOutstanding(RoundRobin):
    name = "least_outstanding"

    def choose(self, replicas: Sequence[Replica], key: str) -> list[Replica]:
        turned = super().choose(replicas, key)  # equal loads are broken in turn
        return sorted(turned, key=lambda r: r.num_outstanding)


class PrefixAffinity:
    name = "prefix_affinity"

    def __init__(self, load_factor: float = 1.5):
        self.load_factor = load_factor

    @staticmethod
    def score(key: str, replica: Replica) -> int:
        """Rendezvous weight of a key on a replica: the replica with the highest weight owns the key, and removing
        a replica moves only its own keys."""
        return int.from_bytes(hashlib.blake2b(f"{replica.url}\0{key}".encode(), digest_size=8).digest(), "big")

    def choose(self, replicas: Sequence[Replica], key: str) -> list[Replica]:
        ranked = sorted(replicas, key=lambda r: self.score(key, r), reverse=True)
        total = sum(r.num_outstanding for r in replicas) + 1  # this request included
        bound = math.ceil(self.load_factor * total / len(replicas))
        within = [r for r in ranked if r.num_outstanding + 1 <= bound]
        return within + [r for r in ranked if r not in within]


def make_policy(config: RouterConfig):
    if config.policy == "round_robin":
        return RoundRobin()
    if config.policy == "least_outstanding":
        return LeastOutstanding()
    return PrefixAffinity(config.load_factor)


def prefix_key(body: Mapping, limit: int) -> str:
    """The text prefix_affinity hashes: a completion's prompt, or a chat's messages, cut at `limit` characters."""
    if "messages" in body and isinstance(body["messages"], list):
        parts = []
        for message in body["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role') if isinstance(message, dict) else ''}:{content}")
        text = "\n".join(parts)
    else:
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return text[:limit]


# -- the router ----------------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One request as the router handled it: the replicas tried, in order, and how it ended."""

    request_id: str
    path: str
    attempts: list[int] = field(default_factory=list)  # replica indices
    outcome: str | None = None  # completed, failed (cut off or refused everywhere), client_error, cancelled
    status: int | None = None
    replica: int | None = None  # the replica whose answer the client got

    def to_dict(self) -> dict:
        return asdict(self)


class _Upstream(Exception):
    """A replica failed before sending the client anything: try another."""


class Router:
    """Picks replicas, tracks their loads and health, and keeps the log of recent requests."""

    def __init__(self, urls: Sequence[str], config: RouterConfig | None = None):
        if not urls:
            raise ValueError("the router needs at least one replica")
        self.config = config or RouterConfig()
        self.replicas = [Replica(i, url.rstrip("/")) for i, url in enumerate(urls)]
        self.policy = make_policy(self.config)
        self.log: collections.deque[RequestRecord] = collections.deque(maxlen=MAX_REQUEST_LOG)

    def order(self, key: str) -> list[Replica]:
        """The replicas to try for a request, best first: healthy ones by policy, then any that are down (a
        replica marked down may be back before its next probe)."""
        healthy = [r for r in self.replicas if r.is_healthy]
        down = [r for r in self.replicas if not r.is_healthy]
        return (self.policy.choose(healthy, key) if healthy else []) + down

    def mark_down(self, replica: Replica, error: str) -> None:
        if replica.is_healthy:
            logger.warning("replica %d (%s) is down: %s", replica.index, replica.url, error)
        replica.is_healthy, replica.last_error = False, error

    def stats(self, with_requests: bool = False) -> dict:
        out = {"policy": self.policy.name, "replicas": [r.to_dict() for r in self.replicas]}
        if with_requests:
            out["requests"] = [r.to_dict() for r in self.log]
        return out


def _error_response(exc: APIError, headers: Mapping[str, str] | None = None):
    from starlette.responses import Response

    return Response(json.dumps(exc.body()), status_code=exc.status, headers={**exc.headers, **(headers or {})},
                    media_type="application/json")


def create_app(router: Router):
    """The FastAPI app of a Router; serve it with uvicorn (`labkit.serving.server.ServerThread` in tests and notebooks)."""
    from contextlib import asynccontextmanager

    import httpx
    from fastapi import FastAPI, Request
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response, StreamingResponse

    config = router.config
    clients: list[httpx.AsyncClient] = []

    async def probe(client: httpx.AsyncClient) -> None:
        """Bring replicas that are down back once their /health answers 200."""
        while True:
            await asyncio.sleep(config.health_interval_s)
            for replica in router.replicas:
                if replica.is_healthy:
                    continue
                try:
                    response = await client.get(f"{replica.url}/health", timeout=config.connect_timeout_s)
                    if response.status_code == 200:
                        logger.warning("replica %d (%s) is back", replica.index, replica.url)
                        replica.is_healthy = True
                except httpx.HTTPError:
                    pass

    @asynccontextmanager
    async def lifespan(app):
        timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        clients.append(client)
        prober = asyncio.create_task(probe(client))
        try:
            yield
        finally:
            prober.cancel()
            await client.aclose()
            clients.clear()

    app = FastAPI(title="labkit router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return _error_response(exc)

    async def read_json(request: Request) -> tuple[bytes, dict]:
        content_type = request.headers.get("content-type")
        if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'}",
                           code="unsupported_media_type")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > config.max_body_bytes:
                    raise APIError(413, f"request body over {config.max_body_bytes} bytes",
                                   code="request_too_large")
        except ClientDisconnect:  # the client left mid-body: nobody to answer, nothing to forward
            raise APIError(499, "client closed the request") from None
        return bytes(body), parse_json_object(body)

    def forward_headers(request: Request, request_id: str) -> dict:
        headers = {"content-type": "application/json", REQUEST_ID_HEADER: request_id}
        if "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        return headers

    def answer_headers(replica: Replica, request_id: str) -> dict:
        return {REPLICA_HEADER: str(replica.index), REQUEST_ID_HEADER: request_id}

    async def open_stream(replica: Replica, path: str, raw: bytes, headers: dict):
        """Send the request to a replica and wait for the start of its answer: (response, first bytes), or
        _Upstream when the replica failed before sending anything the client would see."""
        client = clients[0]
        replica.num_requests += 1
        replica.num_outstanding += 1
        response = None
        try:
            request = client.build_request("POST", replica.url + path, content=raw, headers=headers)
            response = await client.send(request, stream=True)
            if response.status_code in RETRY_STATUSES:
                body = await response.aread()
                error = f"HTTP {response.status_code}: {body[:200].decode('utf-8', 'replace')}"
                if response.status_code != 429:  # busy is not down; unavailable is, until /health says otherwise
                    router.mark_down(replica, error)
                raise _Upstream(error)
            chunks = response.aiter_raw()
            first = b"" if response.status_code != 200 else await anext(chunks, b"")
            if response.status_code == 200 and not first:
                raise _Upstream("the replica closed the stream before its first event")
            return response, first, chunks
        except (httpx.HTTPError, _Upstream) as exc:
            replica.num_outstanding -= 1
            replica.num_failed += 1
            if response is not None:
                await response.aclose()
            error = f"{type(exc).__name__}: {exc}" if isinstance(exc, httpx.HTTPError) else str(exc)
            if isinstance(exc, httpx.HTTPError):
                router.mark_down(replica, error)
            raise _Upstream(error) from None

    async def forward(request: Request, path: str):
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        record = RequestRecord(request_id, path)
        router.log.append(record)
        try:
            raw, body = await read_json(request)
        except APIError as exc:
            record.outcome, record.status = "client_error", exc.status
            raise
        headers = forward_headers(request, request_id)
        errors = []
        for replica in router.order(prefix_key(body, config.prefix_chars))[: config.max_attempts]:
            record.attempts.append(replica.index)
            try:
                response, first, chunks = await open_stream(replica, path, raw, headers)
            except _Upstream as exc:
                errors.append(f"replica {replica.index}: {exc}")
                continue
            record.replica, record.status = replica.index, response.status_code
            return relay(replica, record, response, first, chunks)
        record.outcome, record.status = "failed", 503
        raise APIError(503, f"no replica could take the request ({'; '.join(errors) or 'none configured'})",
                       type="server_error", code="no_replica", headers={"Retry-After": "1"})

    def relay(replica: Replica, record: RequestRecord, response, first: bytes, chunks):
        """The client's answer: the replica's status, headers and bytes as they come. A stream the replica cuts
        off ends with an error event and [DONE], so the client sees one clean end."""
        is_stream = response.headers.get("content-type", "").startswith("text/event-stream")
        tail = first[-64:]

        async def body():
            nonlocal tail
            outcome = "cancelled"  # unless the loop below reaches an end
            try:
                yield first
                async for chunk in chunks:
                    tail = (tail + chunk)[-64:]
                    yield chunk
                if response.status_code != 200:
                    outcome = "client_error" if response.status_code < 500 else "failed"
                elif is_stream and b"[DONE]" not in tail:
                    raise httpx.RemoteProtocolError("the stream ended without data: [DONE]")
                else:
                    outcome = "completed"
            except httpx.HTTPError as exc:
                outcome = "failed"
                router.mark_down(replica, f"{type(exc).__name__}: {exc}")
                if is_stream:
                    error = APIError(502, f"replica {replica.index} failed mid-stream ({type(exc).__name__}); "
                                          "the tokens so far were sent, so the request is not retried",
                                     type="server_error", code="replica_failed")
                    yield sse(error.body()).encode()
                    yield DONE_EVENT.encode()
            finally:
                replica.num_outstanding -= 1
                if outcome == "completed":
                    replica.num_completed += 1
                elif outcome == "failed":
                    replica.num_failed += 1
                record.outcome = outcome
                await response.aclose()

        passed = {k: v for k, v in response.headers.items()
                  if k.lower() in ("content-type", "cache-control", "retry-after", "x-accel-buffering")}
        return StreamingResponse(body(), status_code=response.status_code,
                                 headers={**passed, **answer_headers(replica, record.request_id)})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await forward(request, ENDPOINTS["completions"])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await forward(request, ENDPOINTS["chat"])

    @app.get("/v1/models")
    async def models(request: Request):
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        for replica in router.order(""):
            try:
                response = await clients[0].get(f"{replica.url}/v1/models", headers=headers,
                                                timeout=config.connect_timeout_s)
            except httpx.HTTPError as exc:
                router.mark_down(replica, f"{type(exc).__name__}: {exc}")
                continue
            return Response(response.content, status_code=response.status_code,
                            media_type=response.headers.get("content-type"))
        raise APIError(503, "no replica answers /v1/models", type="server_error", code="no_replica")

    @app.get("/health")
    async def health():
        up = sum(r.is_healthy for r in router.replicas)
        state = {"status": "ok" if up else "unhealthy", "num_replicas": len(router.replicas),
                 "num_healthy": up, "policy": router.policy.name}
        return JSONResponse(state, status_code=200 if up else 503)

    @app.get("/router/stats")
    async def stats(requests: bool = False):
        return router.stats(with_requests=requests)

    return app


# -- replica processes ---------------------------------------------------------------------------------------
def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ReplicaSet:
    """N `labkit serve` processes on free ports of this machine, each with its share of the cores (or its own
    GPU); `with ReplicaSet(2, ["--model", "tiny-smollm2", "--dummy"]) as urls: ...`."""

    def __init__(self, num_replicas: int, serve_args: Sequence[str] = (), host: str = "127.0.0.1",
                 threads_per_replica: int | None = None, start_timeout_s: float = 300.0, device: str = "auto"):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.num_replicas, self.serve_args, self.host = num_replicas, list(serve_args), host
        self.threads = threads_per_replica or max(1, (os.cpu_count() or 1) // num_replicas)
        self.start_timeout_s, self.device = start_timeout_s, device
        self.processes: list[subprocess.Popen] = []
        self.logs: list = []  # each replica's stderr, in a temporary file (a pipe nobody reads would fill up)
        self.urls: list[str] = []

    def _env(self, index: int) -> dict:
        import labkit

        root = os.path.dirname(os.path.dirname(os.path.abspath(labkit.__file__)))
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        if self.device.startswith("cuda") and "CUDA_VISIBLE_DEVICES" not in os.environ:
            import torch

            env["CUDA_VISIBLE_DEVICES"] = str(index % max(1, torch.cuda.device_count()))
        return env

    def start(self) -> list[str]:
        import httpx

        for i in range(self.num_replicas):
            port = _free_port(self.host)
            cmd = [sys.executable, "-m", "labkit.cli", "serve", "--host", self.host, "--port", str(port),
                   "--device", self.device, *self.serve_args]
            log = tempfile.TemporaryFile("w+")
            self.logs.append(log)
            self.processes.append(subprocess.Popen(cmd, env=self._env(i), stdout=subprocess.DEVNULL, stderr=log))
            self.urls.append(f"http://{self.host}:{port}")
        deadline = time.monotonic() + self.start_timeout_s
        for proc, url, log in zip(self.processes, self.urls, self.logs):
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    message = log.read().strip().splitlines()
                    self.stop()
                    raise ValueError(f"a replica exited with status {proc.returncode}: "
                                     f"{message[-1] if message else 'no message'}")
                try:
                    if httpx.get(f"{url}/health", timeout=1.0, trust_env=False).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ValueError(f"the replica on {url} did not answer /health within {self.start_timeout_s:g} s")
                time.sleep(0.2)
        return self.urls

    def kill(self, index: int) -> None:
        """SIGKILL one replica (the failure tests and the notebook stage)."""
        self.processes[index].kill()
        self.processes[index].wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()
        self.logs.clear()

    def __enter__(self) -> list[str]:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def measure_replicas(serve_args: Sequence[str], num_replicas: int, bench_config, policy: str = "least_outstanding",
                     threads_per_replica: int | None = None) -> dict:
    """The same `labkit bench serve` load through the router to one replica, then to num_replicas replicas, each
    with the same cores (on one CPU, a core's share each: one device per replica, as on GPUs):
    {"one": result, "replicas": result}."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from labkit.serving import loadgen
    from labkit.serving.server import ServerThread

    def bench(urls: list[str]) -> dict:
        with ServerThread(create_app(Router(urls, RouterConfig(policy=policy)))) as front, \
                ThreadPoolExecutor(1) as pool:  # a thread of its own: a notebook's event loop is already running
            return pool.submit(loadgen.benchmark, dataclasses.replace(bench_config, base_url=front.url)).result()

    with ReplicaSet(num_replicas, serve_args, threads_per_replica=threads_per_replica) as urls:
        return {"one": bench(urls[:1]), "replicas": bench(urls)}


# -- the command ---------------------------------------------------------------------------------------------
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


def cmd_router(args: argparse.Namespace) -> int:
    from labkit.serving.server import bind_socket

    config = RouterConfig(policy=args.policy, max_attempts=args.max_attempts, health_interval_s=args.health_interval,
                          timeout_s=args.timeout, prefix_chars=args.prefix_chars, load_factor=args.load_factor,
                          max_body_bytes=args.max_body_bytes)
    if bool(args.upstream) == bool(args.replicas):
        raise ValueError("give --replicas N (start engine processes) or --upstream URL ... (existing servers)")
    sock = bind_socket(args.host, args.port)  # fail fast, before starting replicas
    replicas = None
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
        router = Router(urls, config)
        host, port = sock.getsockname()[:2]
        print(f"labkit router: http://{host}:{port} -> {', '.join(urls)} ({config.policy})", file=sys.stderr,
              flush=True)
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(create_app(router), log_level=args.log_level, lifespan="on"))
        server.run(sockets=[sock])
    finally:
        sock.close()
        if replicas is not None:
            replicas.stop()
    return 0


def add_parser(subparsers) -> None:
    """Register `labkit router` on the CLI's subparsers."""
    from labkit.cli.arguments import port, positive_float, positive_int
    from labkit.model.loader import EMBEDDED_MODEL

    p = subparsers.add_parser(
        "router", help="data-parallel replicas behind one OpenAI-compatible address (load balancing)",
        description="Spread requests over several engine processes (--replicas N starts them) or any\n"
                    "OpenAI-compatible servers (--upstream URL ...), by policy: round_robin, least_outstanding or\n"
                    "prefix_affinity. A replica that fails before sending anything has its requests retried on\n"
                    "another; a stream cut off mid-way ends with an error event. /router/stats lists the loads.",
        epilog="examples:\n"
               "  labkit router --replicas 2 --port 8000                       # two labkit serve processes\n"
               "  labkit router --replicas 2 --model tiny-smollm2 --dummy --policy prefix_affinity\n"
               "  labkit router --upstream http://127.0.0.1:8001 --upstream http://127.0.0.1:8002\n"
               "  labkit bench serve --port 8000 --num-prompts 32     # then: per-replica load in the table",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=positive_int, default=None, help="labkit serve processes to start")
    p.add_argument("--upstream", action="append", type=_check_url, default=None, metavar="URL",
                   help="an existing OpenAI-compatible server (repeat for each)")
    p.add_argument("--policy", choices=POLICIES, default="least_outstanding", help="(default: %(default)s)")
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
    p.add_argument("--max-attempts", type=positive_int, default=2, help="replicas tried per request (default: 2)")
    p.add_argument("--health-interval", type=positive_float, default=1.0, metavar="SECONDS",
                   help="probe a replica that is down this often (default: %(default)s)")
    p.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="longest wait for a replica's next byte (default: %(default)s)")
    p.add_argument("--prefix-chars", type=positive_int, default=256,
                   help="prefix_affinity: prompt characters hashed (default: %(default)s)")
    p.add_argument("--load-factor", type=positive_float, default=1.5,
                   help="prefix_affinity: a replica above this times the mean load passes requests on (default: 1.5)")
    p.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger bodies are answered 413 (default: %(default)s)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_router)


__all__ = ["POLICIES", "RouterConfig", "Replica", "RoundRobin", "LeastOutstanding", "PrefixAffinity", "make_policy",
           "prefix_key", "RequestRecord", "Router", "create_app", "ReplicaSet", "measure_replicas", "REQUEST_ID_HEADER",
           "cmd_router", "add_parser"]
