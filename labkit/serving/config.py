"""The server's configuration: how `labkit serve` answers (model name, queue, key, limits, deadlines), validated."""

from __future__ import annotations

from dataclasses import dataclass

from labkit.checks import check_int, check_positive
from labkit.serving.protocol import DEFAULT_CHAT_MAX_TOKENS

DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_QUEUE_WAIT_S = 120.0  # longer than most clients wait for a first token anyway
DEFAULT_MAX_CONNECTIONS = 512  # well under the usual limit of 1024 open files
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0  # a whole default-size body (1 MiB) at 35 KB/s
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 5.0  # uvicorn's
DEFAULT_SHUTDOWN_GRACE_S = 5.0


@dataclass
class ServeConfig:
    """How the server answers: model name, queue bound and deadline, key, body and reply limits, connection
    limits and deadlines, Host check and shutdown grace; validated."""

    served_model_name: str | None = None  # None: the engine's name
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for a place in the running batch; one more answers 429
    api_key: str | None = None  # None: /v1 routes are open
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue_wait_s: float | None = DEFAULT_MAX_QUEUE_WAIT_S  # not admitted after this long: 503; None: no limit
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS  # a chat request without max_tokens (clipped to the context)
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open connections; a request on one more answers 503
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # a request head not in by then closes the connection
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # a request body not in by then answers 408
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S  # an idle connection between requests
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S  # on SIGTERM, for requests in flight to finish
    check_host: bool = True  # a request over loopback must name a loopback Host
    log_iteration_details: bool = False  # a log line per engine step (vLLM's --enable-logging-iteration-details)

    def __post_init__(self):
        for name, low in (("max_queue", 0), ("max_body_bytes", 1), ("default_max_tokens", 1),
                          ("max_connections", 1)):
            check_int(name, getattr(self, name), low)
        if self.max_queue_wait_s is not None:
            try:
                check_positive("max_queue_wait_s", self.max_queue_wait_s)
            except ValueError:
                raise ValueError(f"max_queue_wait_s must be a number > 0 or None, got {self.max_queue_wait_s!r}") \
                    from None
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "shutdown_grace_s"):
            check_positive(name, getattr(self, name))
        for name in ("check_host", "log_iteration_details"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None")
        if self.served_model_name is not None and not (isinstance(self.served_model_name, str)
                                                       and self.served_model_name.strip()):
            raise ValueError(f"served_model_name must be a non-empty string, got {self.served_model_name!r}")


__all__ = ["ServeConfig", "DEFAULT_MAX_QUEUE", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_QUEUE_WAIT_S",
           "DEFAULT_MAX_CONNECTIONS", "DEFAULT_HEADER_TIMEOUT_S", "DEFAULT_BODY_TIMEOUT_S",
           "DEFAULT_KEEP_ALIVE_TIMEOUT_S", "DEFAULT_SHUTDOWN_GRACE_S"]
