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
`max_attempts` replicas); a whole (non-streamed) answer is read in full first, so one cut off is retried whole.
A stream cut off mid-way (the connection drops, it ends without [DONE], or its replica sends a server error
event) is resumed on another replica from the tokens already sent (`labkit.serving.router_stream`), up to
`max_resumes` times, so the client sees one stream; only when no replica can carry it on does it end with an
OpenAI error event and `data: [DONE]`. A failing replica is marked down at once and probed at /health until it
answers again; a replica process that dies is restarted (`labkit.serving.replicas`) and gets no traffic until
its /health answers 200. Each answer names its replica in `x-labkit-replica`, which
`labkit bench serve` counts per replica; /router/stats lists the replicas' loads and the recent requests with
their attempts and outcomes.

Here: the configuration, the policies and the Router's bookkeeping (plain Python, testable without a network);
the app that forwards requests is `labkit.serving.router_app`, the replica processes `labkit.serving.replicas`.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from labkit.checks import check_choice, check_int, check_positive
from labkit.serving.config import DEFAULT_MAX_BODY_BYTES

logger = logging.getLogger("labkit.serving.router")

POLICIES = ("round_robin", "least_outstanding", "prefix_affinity")
RETRY_STATUSES = (429, 502, 503)  # the replica did no work for the request: another may
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_LOG = 10_000


@dataclass
class RouterConfig:
    """How the router picks and retries; validated on creation."""

    policy: str = "least_outstanding"
    max_attempts: int = 2  # replicas tried for one request before it is answered 503
    max_resumes: int = 2  # times one cut stream is resumed on another replica
    health_interval_s: float = 1.0  # how often a replica that is down is probed at /health
    connect_timeout_s: float = 5.0
    timeout_s: float = 600.0  # between two bytes of a replica's answer
    prefix_chars: int = 256  # prompt characters that prefix_affinity hashes
    load_factor: float = 1.5  # prefix_affinity: a replica above this times the mean load passes requests on
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self):
        check_choice("policy", self.policy, POLICIES)
        for name in ("max_attempts", "prefix_chars", "max_body_bytes"):
            check_int(name, getattr(self, name))
        check_int("max_resumes", self.max_resumes, minimum=0)
        for name in ("health_interval_s", "connect_timeout_s", "timeout_s"):
            check_positive(name, getattr(self, name))
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
    is_restarting: bool = False  # its process died: no traffic until the restarted one answers /health
    pid: int | None = None  # of a replica process the router started
    num_restarts: int = 0

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


@dataclass
class RequestRecord:
    """One request as the router handled it: the replicas tried, in order, and how it ended."""

    request_id: str
    path: str
    attempts: list[int] = field(default_factory=list)  # replica indices
    outcome: str | None = None  # completed, failed (cut off or refused everywhere), client_error, cancelled
    status: int | None = None
    replica: int | None = None  # the replica whose answer the client got (the last, for a resumed stream)
    num_resumes: int = 0  # times its stream, cut off by a dying replica, was carried on by another

    def to_dict(self) -> dict:
        return asdict(self)


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
        replica marked down may be back before its next probe) unless its process is being restarted."""
        healthy = [r for r in self.replicas if r.is_healthy]
        down = [r for r in self.replicas if not r.is_healthy and not r.is_restarting]
        return (self.policy.choose(healthy, key) if healthy else []) + down

    def mark_down(self, replica: Replica, error: str) -> None:
        if replica.is_healthy:
            logger.warning("replica %d (%s) is down: %s", replica.index, replica.url, error)
        replica.is_healthy, replica.last_error = False, error

    def process_exited(self, index: int, status: int) -> None:
        """A replica process the router started has died (from the supervising thread): no traffic until its
        restarted process answers /health."""
        replica = self.replicas[index]
        self.mark_down(replica, f"its process exited with status {status}")
        replica.is_restarting = True

    def process_restarted(self, index: int, pid: int) -> None:
        replica = self.replicas[index]
        replica.pid, replica.num_restarts = pid, replica.num_restarts + 1

    def mark_up(self, replica: Replica) -> None:
        if not replica.is_healthy:
            logger.warning("replica %d (%s) is back", replica.index, replica.url)
        replica.is_healthy, replica.is_restarting = True, False

    def stats(self, with_requests: bool = False) -> dict:
        out = {"policy": self.policy.name, "replicas": [r.to_dict() for r in self.replicas]}
        if with_requests:
            out["requests"] = [r.to_dict() for r in self.log]
        return out


__all__ = ["POLICIES", "RETRY_STATUSES", "REQUEST_ID_HEADER", "RouterConfig", "Replica", "RoundRobin",
           "LeastOutstanding", "PrefixAffinity", "make_policy", "prefix_key", "RequestRecord", "Router"]
