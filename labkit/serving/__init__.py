"""Serving (notebook 02): an OpenAI-compatible server over the engine, its clients, a load generator and a router.

The server: `protocol` (requests, errors), `events` (server-sent events and the one reader of them),
`responses`, `config`, `worker` (the engine's thread), `app`, `http_limits`, `server` (sockets, uvicorn,
ServerThread), `metrics` (Prometheus) and `server_info` (the engine settings it publishes). Its clients:
`addresses`, `client` (ping), `workloads`, `loadgen` and `load_metrics` (bench serve). Data parallelism: `router`, `router_app` and `replicas`. Modules are imported on
first use, so `import labkit.serving` (and the command line's parsers) stays free of FastAPI and torch.
"""

import importlib

_NAMES = {
    "ServeConfig": "config", "EngineWorker": "worker", "create_app": "app", "error_response": "http_limits",
    "ServerThread": "server", "bind_socket": "server", "make_server": "server", "ServerMetrics": "metrics",
    "APIError": "protocol", "ServerError": "protocol", "ENDPOINTS": "protocol", "REPLICA_HEADER": "protocol",
    "SSEReader": "events", "read_events": "events", "aread_events": "events",
    "server_url": "addresses", "api_key_for": "addresses",
    "PingResult": "client", "ping": "client", "first_model": "client",
    "PromptSpec": "workloads", "make_prompts": "workloads", "arrival_offsets": "workloads",
    "LengthDist": "workloads", "TraceConfig": "workloads", "Trace": "workloads", "make_trace": "workloads",
    "load_trace": "workloads",
    "BenchServeConfig": "loadgen", "run_benchmark": "loadgen", "benchmark": "loadgen", "save_result": "loadgen",
    "measure_replicas": "loadgen", "RequestOutcome": "load_metrics", "compute_metrics": "load_metrics",
    "Router": "router", "RouterConfig": "router", "POLICIES": "router", "create_router_app": "router_app",
    "ReplicaSet": "replicas",
}
__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"labkit.serving.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'labkit.serving' has no attribute {name!r}")
