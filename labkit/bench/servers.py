"""`labkit bench servers`: `labkit serve` and its peers side by side, interleaved and repeated, so that each ratio
comes from a matched pair.

On a shared machine the speed of the same server drifts 10-25 % within minutes, and a comparison that measures
one server's whole sweep and then the other's hands that drift to whichever ran second (two such runs of this
lab, minutes apart and in opposite orders, read labkit at 1.10-1.26x and at 0.94-0.95x vLLM on the same loads).
So every server starts once, serves one untimed burst (a fresh server's first full batch is slower) and stays
up, idle while another is measured (each costs ~nothing idle); then each repeat runs each load on every server
back to back, in an order that turns over from one repeat to the next (A B, B A, A B, ...). Within a repeat and
load the servers get the same prompts and arrival times; every repeat and load has prompts of its own (the salt),
so no prefix cache answers one measurement from another. Each pair gives a ratio of the reference server (the
first, `labkit serve`) to the peer; the summary rows hold the median of those ratios and their range over the
pairs, beside every measurement. An A/A run (the peer a second `labkit serve`) shows how far identical servers'
pairs spread on the machine at hand.

LOADS are issue 19's: a Poisson sweep (2, 4, 8 requests/s; 256 prompt tokens, 128 output tokens), 64 requests
at once (64 / 64), and one request in flight (its TPOT: one user's decode speed).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from labkit.bench.stack import SUMMARY_METRICS

SCHEMA = "labkit.bench.servers/1"


@dataclass(frozen=True)
class ServerLoad:
    """One load of `bench serve`: `num_prompts` requests arriving at `request_rate` a second (inf: at once), at
    most `max_concurrency` in flight (None: no cap)."""

    name: str
    num_prompts: int
    input_len: int
    output_len: int
    request_rate: float = math.inf
    max_concurrency: int | None = None


LOADS = {load.name: load for load in (
    ServerLoad("poisson-2", 48, 256, 128, 2.0),
    ServerLoad("poisson-4", 48, 256, 128, 4.0),
    ServerLoad("poisson-8", 48, 256, 128, 8.0),
    ServerLoad("burst", 64, 64, 64),
    ServerLoad("one", 8, 64, 64, max_concurrency=1),
)}


def pick_loads(names: Sequence[str], num_prompts: int | None = None) -> list[ServerLoad]:
    """LOADS by name, in the order given; `num_prompts` (if given) replaces each load's count (short runs)."""
    unknown = [n for n in names if n not in LOADS]
    if unknown or not names:
        raise ValueError(f"unknown load {unknown[0] if unknown else ''!r}: choose among {', '.join(LOADS)}")
    return [dataclasses.replace(LOADS[n], num_prompts=num_prompts or LOADS[n].num_prompts) for n in names]


def plan(servers: Sequence[str], loads: Sequence[ServerLoad], repeats: int, seed: int = 0) -> list[dict]:
    """The measurements in the order they run: {repeat, load, server, position, seed, salt}. Repeat r runs each
    load on every server, in the given order when r is even and reversed when odd; the servers of one (repeat,
    load) share a seed (prompt lengths, arrivals) and a salt (the prompts' words), which no other has."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    steps = []
    for r in range(repeats):
        for i, load in enumerate(loads):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for position, server in enumerate(order):
                steps.append({"repeat": r, "load": load, "server": server, "position": position,
                              "seed": seed * 1000 + r * len(loads) + i, "salt": f"servers-{seed}-{r}-{load.name}"})
    return steps


def _bench(base_url: str, step: dict, num_warmups: int) -> dict:
    from labkit.serving.loadgen import BenchServeConfig, benchmark

    load = step["load"]
    config = BenchServeConfig(base_url=base_url, num_prompts=load.num_prompts, input_len=load.input_len,
                              output_len=load.output_len, request_rate=load.request_rate,
                              max_concurrency=load.max_concurrency, num_warmups=num_warmups, seed=step["seed"],
                              prompt_salt=step["salt"], timeout_s=3600.0)
    return benchmark(config)


def load_params(load: ServerLoad) -> dict:
    """A load as JSON has it: an infinite rate is "inf", as in vLLM's result files."""
    return {**dataclasses.asdict(load), "request_rate": "inf" if math.isinf(load.request_rate) else load.request_rate}


def measurement_row(step: dict, result: dict, env: dict, info: Mapping | None = None) -> dict:
    """One measured (repeat, load, server): the summary metrics, and one user's speed (1000 / median TPOT)."""
    from labkit.lab.results import make_row

    m = result["metrics"]
    metrics = {k: m.get(k) for k in SUMMARY_METRICS}
    metrics["decode_tokens_per_s"] = 1e3 / m["median_tpot_ms"] if m.get("median_tpot_ms") else None
    metrics["errors"] = result.get("errors") or {}
    params = {"kind": "measurement", "load": load_params(step["load"]), "server": step["server"],
              "repeat": step["repeat"], "position": step["position"], "seed": step["seed"], "salt": step["salt"],
              "peer": dict(info) if info else None}
    return make_row("servers", params, metrics, env)


RATIOS = {  # summary key -> (metric, True when the reference's value goes on top)
    "throughput_x": ("output_throughput_tokens_per_s", True),  # > 1: the reference serves more tokens a second
    "decode_speed_x": ("decode_tokens_per_s", True),  # > 1: the reference's median TPOT is shorter
    "ttft_x": ("median_ttft_ms", False),  # > 1: the reference's median TTFT is shorter
}


def summary_rows(rows: Sequence[dict], reference: str, env: dict) -> list[dict]:
    """Per load and peer: each matched pair's ratio (reference over peer, so > 1 favours the reference) for
    output tokens/s, one user's decode speed and median TTFT; their median, and min and max over the pairs."""
    from labkit.lab.results import make_row

    measured = {(r["params"]["repeat"], r["params"]["load"]["name"], r["params"]["server"]): r["metrics"]
                for r in rows if r["params"]["kind"] == "measurement"}
    loads = {r["params"]["load"]["name"]: r["params"]["load"] for r in rows}  # in the order they ran
    repeats = sorted({repeat for repeat, _, _ in measured})
    peers = [s for s in dict.fromkeys(server for _, _, server in measured) if s != reference]
    out = []
    for name, load in loads.items():
        for peer in peers:
            pairs_of = [(measured[(r, name, reference)], measured[(r, name, peer)]) for r in repeats
                        if (r, name, reference) in measured and (r, name, peer) in measured]
            metrics: dict = {}
            for key, (metric, on_top) in RATIOS.items():
                pairs = [a[metric] / b[metric] if on_top else b[metric] / a[metric] for a, b in pairs_of
                         if a.get(metric) and b.get(metric)]
                metrics[key] = statistics.median(pairs) if pairs else None
                metrics[f"{key}_min"], metrics[f"{key}_max"] = (min(pairs), max(pairs)) if pairs else (None, None)
                metrics[f"{key}_pairs"] = pairs
            for side, server in (("reference", reference), ("peer", peer)):
                values = [m["output_throughput_tokens_per_s"] for (_, n, s), m in measured.items()
                          if n == name and s == server and m.get("output_throughput_tokens_per_s")]
                metrics[f"{side}_tokens_per_s"] = statistics.median(values) if values else None
            params = {"kind": "summary", "load": load, "reference": reference, "server": peer,
                      "num_pairs": len(metrics["throughput_x_pairs"]),
                      "interval": "min and max of the matched pairs' ratios; the value is their median"}
            out.append(make_row("servers", params, metrics, env))
    return out


def run_servers_bench(servers: Mapping[str, str], loads: Sequence[ServerLoad], repeats: int = 3, seed: int = 0,
                      num_warmups: int = 2, info: Mapping[str, Mapping] | None = None,
                      log: Callable[[str], object] | None = None, env: dict | None = None) -> list[dict]:
    """Measure every load on every server ({name: base URL}, already answering; the first is the reference),
    interleaved as `plan` orders it, after one untimed burst on each; returns the measurement rows, then the
    summary rows."""
    from labkit.device import describe_environment

    if len(servers) < 2:
        raise ValueError(f"a comparison needs at least two servers, got {list(servers)}")
    log = log or (lambda message: None)
    env = env or describe_environment("cpu")
    for name, url in servers.items():  # a fresh server meets its first full batch here, not in a timed pair
        log(f"bench servers: warming {name} up (an untimed burst)")
        warm = dataclasses.replace(LOADS["burst"], num_prompts=max(load.num_prompts for load in loads))
        _bench(url, {"load": warm, "seed": seed, "salt": f"servers-{seed}-warm-up"}, 0)
    rows = []
    steps = plan(list(servers), loads, repeats, seed)
    for i, step in enumerate(steps, 1):
        log(f"bench servers: [{i}/{len(steps)}] repeat {step['repeat'] + 1}, {step['load'].name}, {step['server']}")
        result = _bench(servers[step["server"]], step, num_warmups)
        rows.append(measurement_row(step, result, env, (info or {}).get(step["server"])))
    return rows + summary_rows(rows, next(iter(servers)), env)


def format_table(rows: Sequence[dict]) -> str:
    """The summary rows: one line per load and peer."""
    def num(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    lines = [f"{'load':<11}{'peer':<12}{'pairs':>6}{'ref tok/s':>10}{'peer tok/s':>11}{'x tok/s (range)':>22}"
             f"{'x TTFT':>8}{'x TPOT':>8}"]
    for r in rows:
        p, m = r["params"], r["metrics"]
        if p["kind"] != "summary":
            continue
        span = f"{num(m['throughput_x'], '.2f')} ({num(m['throughput_x_min'], '.2f')}-" \
               f"{num(m['throughput_x_max'], '.2f')})"
        lines.append(f"{p['load']['name']:<11}{p['server']:<12}{p['num_pairs']:>6}"
                     f"{num(m['reference_tokens_per_s'], '10.1f')}{num(m['peer_tokens_per_s'], '11.1f')}{span:>22}"
                     f"{num(m['ttft_x'], '8.2f')}{num(m['decode_speed_x'], '8.2f')}")
    lines.append("x: the reference (first server) over the peer, median of matched pairs; > 1 favours the reference "
                 "(x TTFT: shorter median TTFT; x TPOT: shorter median TPOT)")
    return "\n".join(lines)


__all__ = ["SCHEMA", "ServerLoad", "LOADS", "pick_loads", "plan", "measurement_row", "summary_rows",
           "run_servers_bench", "format_table", "load_params"]
