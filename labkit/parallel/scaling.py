"""An alpha-beta cost model of tensor-parallel decode: what W devices and their links do to one decode step.

One decode step of a Megatron-split model on W ranks costs, per rank,

    step(W) = L * (layer_bytes / (W * bandwidth) + layer_overhead) + head_bytes / bandwidth + 2 * L * all_reduce(W)

- the layers' weights (and KV cache) are split W ways, so each rank streams 1/W of them (decode at small batch
  is bound by memory bandwidth); `layer_overhead` is what does not shrink with W (kernel launches, small ops),
  calibrated from a measured single-device step: measured per-layer time minus its bytes over the bandwidth;
- the LM head is whole on every rank (as in gpt-fast), so it does not shrink;
- each layer ends its two halves with an all-reduce of one row of activations per sequence. A ring all-reduce of
  n bytes over W ranks takes launch + 2(W-1) alpha + 2(W-1)/W * n / beta (Hockney 1994's alpha-beta model;
  Patarasuk & Yuan 2009 for the ring's bandwidth term). Across nodes it is hierarchical: reduce-scatter inside
  each node, all-reduce of the node's 1/G share across nodes, all-gather inside.

At decode sizes (a few KB per message) alpha dominates: the model says when adding devices stops paying.
Link parameters are nominal figures (bandwidth per direction from the vendors' specifications; latencies typical
of NCCL's small-message all-reduce), not measurements of this lab: the gloo link of this machine is measured by
`labkit bench tp`, and gpt-fast's published 8xA100 results are the reference the model is checked against.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from labkit.checks import check_choice
from labkit.device import repo_root
from labkit.model.loader import DUMMY_CONFIGS


@dataclass(frozen=True)
class Link:
    """A link between ranks: per-step latency alpha, bandwidth beta (one direction), and the fixed cost of
    launching one collective."""

    name: str
    alpha_us: float
    bandwidth_gbps: float
    launch_us: float = 5.0

    def all_reduce_us(self, num_bytes: float, world_size: int) -> float:
        """Ring all-reduce of num_bytes over world_size ranks on this link, in µs."""
        if world_size <= 1:
            return 0.0
        w = world_size
        return self.launch_us + 2 * (w - 1) * self.alpha_us + 2 * (w - 1) / w * num_bytes / (self.bandwidth_gbps * 1e3)


LINKS = {
    # NVIDIA's specifications: NVLink 4 is 900 GB/s per H100/H200 (450 each way), NVLink 3 600 per A100.
    "nvlink4": Link("NVLink 4 (H100/H200 SXM)", alpha_us=1.0, bandwidth_gbps=450.0),
    "nvlink3": Link("NVLink 3 (A100 SXM)", alpha_us=1.5, bandwidth_gbps=300.0),
    "pcie4": Link("PCIe 4.0 x16", alpha_us=4.0, bandwidth_gbps=25.0),  # 32 GB/s raw, ~25 achieved
    "eth100": Link("100 Gb Ethernet (RDMA)", alpha_us=8.0, bandwidth_gbps=11.0, launch_us=10.0),
    "eth400": Link("400 Gb Ethernet (RDMA)", alpha_us=6.0, bandwidth_gbps=45.0, launch_us=10.0),
}


@dataclass(frozen=True)
class Device:
    """A device's memory bandwidth as decode can use it (GB/s): a measured peak where there is one."""

    name: str
    bandwidth_gbps: float
    source: str = ""


# gpt-fast's README: its 330 W A100s reach "about 1700 GB/s" in practice, 83 % of the 2039 GB/s specification;
# the H200 (4.8 TB/s specified) is assumed to reach the same fraction.
ACHIEVED_FRACTION = 1700.0 / 2039.0
DEVICES = {
    "a100-80gb": Device("A100-SXM4-80GB (330 W)", 1700.0, "gpt-fast README"),
    "h200": Device("H200 SXM", 4800.0 * ACHIEVED_FRACTION, "4.8 TB/s specified, x 0.83 as on gpt-fast's A100"),
}


def hierarchical_all_reduce_us(num_bytes: float, gpus_per_node: int, num_nodes: int, intra: Link,
                               inter: Link) -> float:
    """All-reduce over num_nodes x gpus_per_node ranks: reduce-scatter in each node, all-reduce of each rank's
    1/G share across the nodes, all-gather in each node (NCCL's tree and ring hybrids do about this)."""
    g, n = gpus_per_node, num_nodes
    if n == 1:
        return intra.all_reduce_us(num_bytes, g)
    inside = 0.0 if g == 1 else intra.launch_us + 2 * (g - 1) * intra.alpha_us + \
        2 * (g - 1) / g * num_bytes / (intra.bandwidth_gbps * 1e3)
    across = inter.all_reduce_us(num_bytes / g, n)
    return inside + across


@dataclass(frozen=True)
class DecodeCost:
    """What the model needs about one decode step of one model on one device (bytes per step, batch rows)."""

    name: str
    num_layers: int
    layer_bytes: float  # weights (and KV cache) one layer reads per step, whole model
    head_bytes: float  # the LM head and embedding rows: not split
    message_bytes: float  # one all-reduce: rows x dim x activation bytes
    bandwidth_gbps: float
    layer_overhead_ms: float = 0.0  # per layer, does not shrink with W
    batch_size: int = 1

    @property
    def step_ms_1(self) -> float:
        """The single-device step this cost describes."""
        return self.num_layers * (self.layer_bytes / (self.bandwidth_gbps * 1e6) + self.layer_overhead_ms) + \
            self.head_bytes / (self.bandwidth_gbps * 1e6)

    def calibrated(self, measured_step_ms: float, overhead: str = "fixed") -> "DecodeCost":
        """The same cost made to take `measured_step_ms` on one device. What the bandwidth does not explain is
        either a per-layer overhead that stays at every world size ("fixed": kernel launches, host work; the
        pessimistic bound) or a lower effective bandwidth, which shrinks with the shard ("scales": the
        optimistic bound)."""
        total = self.num_layers * self.layer_bytes + self.head_bytes
        if overhead == "scales":
            return replace(self, bandwidth_gbps=total / (measured_step_ms * 1e6), layer_overhead_ms=0.0)
        if overhead != "fixed":
            raise ValueError(f"overhead must be 'fixed' or 'scales', got {overhead!r}")
        bytes_ms = total / (self.bandwidth_gbps * 1e6)
        return replace(self, layer_overhead_ms=max(0.0, (measured_step_ms - bytes_ms) / self.num_layers))


def predict(cost: DecodeCost, world_size: int, intra: Link, gpus_per_node: int | None = None,
            inter: Link | None = None) -> dict:
    """Per-rank compute, communication and step time (ms) and tokens/s of `cost` split over world_size ranks:
    one node (gpus_per_node None or >= world_size) over `intra`, else nodes of gpus_per_node joined by `inter`."""
    w = world_size
    g = w if gpus_per_node is None or gpus_per_node >= w else gpus_per_node
    if w % g:
        raise ValueError(f"{w} ranks do not fill nodes of {g}")
    nodes = w // g
    if nodes > 1 and inter is None:
        raise ValueError(f"{w} ranks over {nodes} nodes need an inter-node link")
    compute = cost.num_layers * (cost.layer_bytes / (w * cost.bandwidth_gbps * 1e6) + cost.layer_overhead_ms) + \
        cost.head_bytes / (cost.bandwidth_gbps * 1e6)
    per_all_reduce = hierarchical_all_reduce_us(cost.message_bytes, g, nodes, intra, inter or intra) if w > 1 else 0
    comm = 2 * cost.num_layers * per_all_reduce / 1e3
    step = compute + comm
    return {"world_size": w, "num_nodes": nodes, "compute_ms": compute, "comm_ms": comm, "step_ms": step,
            "all_reduce_us": per_all_reduce, "tokens_per_s": cost.batch_size * 1e3 / step}


def config_cost(name: str, config: dict, device: Device, dtype_bytes: int = 2, batch_size: int = 1,
                context_len: int = 128, act_bytes: int | None = None) -> DecodeCost:
    """The DecodeCost of a Llama-family config (an HF-style dict: hidden_size, intermediate_size, heads, ...)
    read at `dtype_bytes` per weight, with `context_len` tokens of KV cache per row."""
    dim, hidden, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or dim // heads
    weights = dim * (heads + 2 * kv_heads) * head_dim + heads * head_dim * dim + 3 * dim * hidden
    kv = 2 * context_len * kv_heads * head_dim * batch_size
    return DecodeCost(name=name, num_layers=layers, layer_bytes=(weights + kv) * dtype_bytes,
                      head_bytes=config["vocab_size"] * dim * dtype_bytes,
                      message_bytes=batch_size * dim * (act_bytes or dtype_bytes),
                      bandwidth_gbps=device.bandwidth_gbps, batch_size=batch_size)


def preset_cost(preset: str, device: Device, **kwargs) -> DecodeCost:
    """config_cost of a labkit.model.loader preset (llama-1b, llama-8b, smollm2-135m, ...)."""
    check_choice("preset", preset, DUMMY_CONFIGS)
    return config_cost(preset, DUMMY_CONFIGS[preset], device, **kwargs)


# -- data that carries over ----------------------------------------------------------------------------------
# Llama 2's shapes (Touvron et al. 2023; the models' HF configs).
REFERENCE_CONFIGS = {
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}
GPT_FAST_SOURCE = ("gpt-fast README, 'Tensor Parallelism' table (github.com/pytorch-labs/gpt-fast): 8xA100-80GB "
                   "power-limited to 330 W, hybrid cube mesh NVLink, batch 1, 5-token prompt, bf16, torch.compile")
GPT_FAST_TP = [  # (model, GPUs, tokens/s, GB/s the README reports)
    ("Llama-2-7B", 1, 104.9, 1397.31), ("Llama-2-7B", 2, 168.84, 1181.99), ("Llama-2-7B", 4, 254.02, 955.83),
    ("Llama-2-7B", 8, 328.43, 704.10),
    ("Llama-2-70B", 2, 21.32, 1481.87), ("Llama-2-70B", 4, 38.01, 1340.76), ("Llama-2-70B", 8, 62.50, 1135.29),
]
# The lab's own single-H200 decode, the per-layer compute the presets are fed, is data: data/scaling_inputs.json
# holds it with its source, date, hardware and method.
SCALING_INPUTS = "scaling_inputs.json"


def load_scaling_inputs(path: str | Path | None = None) -> dict:
    """The committed inputs of the preset predictions (default `<repo>/data/scaling_inputs.json`)."""
    path = Path(path) if path is not None else repo_root() / "data" / SCALING_INPUTS
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"scaling inputs not found: {path}") from None


def measured_tokens_per_s(preset: str, device: str = "h200", batch_size: int = 1, inputs: dict | None = None) -> float:
    """A preset's measured single-device decode tokens/s from the scaling inputs (ValueError naming what exists)."""
    inputs = inputs if inputs is not None else load_scaling_inputs()
    check_choice("device", device, [k for k, v in inputs.items() if isinstance(v, dict)])
    by_batch = inputs[device]["decode_tokens_per_s"]
    check_choice("batch_size", str(batch_size), by_batch)
    check_choice("preset", preset, by_batch[str(batch_size)])
    return float(by_batch[str(batch_size)][preset])


def gpt_fast_check(link: Link | None = None) -> list[dict]:
    """The model against gpt-fast's published TP figures, as a band: Llama-2-7B calibrated on its 1-GPU figure
    (the time the bandwidth does not explain either fixed per layer, or scaling with the shard), Llama-2-70B
    (it has no 1-GPU figure: it does not fit) with the 7B's per-layer overhead or effective bandwidth."""
    link = link or LINKS["nvlink3"]
    a100 = DEVICES["a100-80gb"]
    base = next(t for m, g, t, _ in GPT_FAST_TP if m == "Llama-2-7B" and g == 1)
    seven = config_cost("Llama-2-7B", REFERENCE_CONFIGS["Llama-2-7B"], a100, context_len=5)
    fixed, scales = seven.calibrated(1e3 / base, "fixed"), seven.calibrated(1e3 / base, "scales")
    seventy = config_cost("Llama-2-70B", REFERENCE_CONFIGS["Llama-2-70B"], a100, context_len=5)
    costs = {"Llama-2-7B": (fixed, scales),
             "Llama-2-70B": (replace(seventy, layer_overhead_ms=fixed.layer_overhead_ms),
                             replace(seventy, bandwidth_gbps=scales.bandwidth_gbps))}
    out = []
    for model, gpus, tokens_per_s, _ in GPT_FAST_TP:
        low, high = (predict(c, gpus, link) for c in costs[model])
        out.append({"model": model, "gpus": gpus, "published_tokens_per_s": tokens_per_s,
                    "predicted_low_tokens_per_s": low["tokens_per_s"],
                    "predicted_high_tokens_per_s": high["tokens_per_s"],
                    "is_within": low["tokens_per_s"] * 0.9 <= tokens_per_s <= high["tokens_per_s"] * 1.1,
                    "comm_ms": high["comm_ms"]})
    return out


def scaling_table(costs: dict[str, DecodeCost], world_sizes=(1, 2, 4, 8), gpus_per_node: int = 8,
                  num_nodes: int = 2) -> list[dict]:
    """Predicted tokens/s of each cost: one node over NVLink 4 and over PCIe 4 at each world size, and num_nodes
    nodes of gpus_per_node GPUs (NVLink inside) joined by 100 or 400 Gb Ethernet."""
    rows = []
    for name, cost in costs.items():
        for link in ("nvlink4", "pcie4"):
            for w in world_sizes:
                rows.append({"model": name, "setup": f"1 node, {LINKS[link].name}", "gpus": w,
                             **predict(cost, w, LINKS[link])})
        for link in ("eth100", "eth400"):
            for g in world_sizes:
                rows.append({"model": name, "setup": f"{num_nodes} nodes, {LINKS[link].name}",
                             "gpus": g * num_nodes, **predict(cost, g * num_nodes, LINKS["nvlink4"], g, LINKS[link])})
    return rows


def preset_bands(presets=("llama-1b", "llama-8b"), device: Device | None = None, inputs: dict | None = None,
                 **kwargs) -> list[dict]:
    """Predicted scaling_table of real-size presets on H200s, each calibrated on the lab's measured single-H200
    decode (`load_scaling_inputs`), as a band: `bound` "fixed" (per-layer overhead stays) and "scales" (it shrinks
    with the shard). Every row is a prediction ("is_prediction": True) naming its calibration's source."""
    device = device or DEVICES["h200"]
    inputs = inputs if inputs is not None else load_scaling_inputs()
    rows = []
    for preset in presets:
        cost = preset_cost(preset, device)
        measured_ms = 1e3 / measured_tokens_per_s(preset, "h200", 1, inputs)
        for bound in ("fixed", "scales"):
            rows += [{**r, "bound": bound, "is_prediction": True, "calibrated_on": inputs["h200"]["source"]}
                     for r in scaling_table({preset: cost.calibrated(measured_ms, bound)}, **kwargs)]
    return rows


def measured_link(alpha_us: float, bandwidth_gbps: float | None, world_size: int, name: str = "measured") -> Link:
    """A Link from an all-reduce fit (latency = a + n / b over world_size ranks): the ring's 2(W-1) steps share a,
    and b is the whole message's rate, so beta = b * 2(W-1)/W."""
    steps = 2 * (world_size - 1)
    bandwidth = math.inf if bandwidth_gbps is None else bandwidth_gbps  # a fit without a bytes term (stored null)
    return Link(name, alpha_us=alpha_us / steps, bandwidth_gbps=bandwidth * steps / world_size, launch_us=0.0)


def predict_from_rows(decode_rows: list[dict], allreduce_rows: list[dict], world_size: int) -> dict:
    """The model fed by `labkit bench tp` rows of one launch on this machine: world size 1's measured compute per
    step calibrates the per-layer overhead, each world size's measured per-rank memory bandwidth sets how fast its
    shard streams, and the all-reduce fit is the link; predicts world_size's step at the rows' batch size."""
    def row(w):
        return next(r for r in decode_rows if r["params"]["world_size"] == w)

    one, target = row(1), row(world_size)
    p, m = one["params"], one["metrics"]
    cost = DecodeCost(name=p["model"], num_layers=p["num_layers"], layer_bytes=p["layer_weight_bytes"],
                      head_bytes=p["head_weight_bytes"], message_bytes=p["dim"] * 4 * p["batch_size"],
                      bandwidth_gbps=m["bandwidth_gbps"], batch_size=p["batch_size"])
    cost = replace(cost.calibrated(m["compute_ms_per_step"]), bandwidth_gbps=target["metrics"]["bandwidth_gbps"])
    fit = next(r for r in allreduce_rows if r["params"]["world_size"] == world_size)["metrics"]
    link = measured_link(fit["fit_alpha_us"], fit["fit_bandwidth_gbps"], world_size, "gloo over loopback")
    return predict(cost, world_size, link)


__all__ = ["Link", "LINKS", "Device", "DEVICES", "ACHIEVED_FRACTION", "hierarchical_all_reduce_us", "DecodeCost", "predict", "config_cost",
           "preset_cost", "REFERENCE_CONFIGS", "GPT_FAST_SOURCE", "GPT_FAST_TP", "SCALING_INPUTS",
           "load_scaling_inputs", "measured_tokens_per_s",
           "gpt_fast_check", "scaling_table", "preset_bands", "measured_link", "predict_from_rows"]
