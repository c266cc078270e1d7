"""Each Triton kernel against torch eager and torch.compile, over a sweep of sizes.

Per op and size, every provider runs the same inputs: `torch` (the eager code the model's torch backend runs,
or SDPA's flash backend for attention), `compile` (torch.compile of that code) and `triton` (labkit.kernels).
Rows report the median latency (CUDA events, L2 flushed between runs: `triton.testing.do_bench`), GB/s for the
memory-bound ops or TFLOP/s for flash attention from the op's `<op>_cost`, and the fraction of the peak measured
in the same run (a streaming copy for bandwidth, a large bf16 matmul for FLOP/s). Before timing, the Triton
output is checked against the op's float32 reference.

Without a GPU only that check runs (under TRITON_INTERPRET=1, at small sizes): the interpreter executes kernels
in numpy, one program after another, so its timings say nothing about the kernels.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labkit.device import describe_environment, dtype_name, format_environment, pick_device

PROVIDERS = ("torch", "compile", "triton")


@dataclass
class Case:
    """One size of one op: its inputs, a call per provider, the Triton check, the cost."""

    size: dict  # the shape parameters, e.g. {"M": 4096, "N": 8192}
    run: dict  # provider -> zero-argument callable
    check: Callable[[], float]  # max |triton - reference| after asserting the tolerance
    cost: object  # labkit.kernels.common.Cost
    metric: str  # "bandwidth_gbps" or "tflops"


def _randn(*shape, dtype, device, seed=0):
    """Seeded normal values, drawn on the device (gigabytes of them for the large sizes)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=generator, device=device).to(dtype)


def _checker(actual_fn, expected_fn, dtype):
    from labkit.kernels.common import TOLERANCES

    def check():
        actual, expected = actual_fn(), expected_fn()
        torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype])
        return float((actual.float() - expected.float()).abs().max())

    return check


def _compiled(fn):
    """torch.compile with dynamic shapes from the start: one compile serves every size of the sweep."""
    return torch.compile(fn, fullgraph=True, dynamic=True)


# -- one builder per op: (size, dtype, device) -> Case ------------------------------------------------------------
def rms_norm_case(M, N, dtype, device):
    from labkit.kernels.rms_norm import rms_norm, rms_norm_cost, rms_norm_ref

    x, r, w = _randn(M, N, dtype=dtype, device=device), _randn(M, N, dtype=dtype, device=device, seed=1), \
        _randn(N, dtype=dtype, device=device, seed=2)

    def eager(x, r, w):  # what the torch backend runs: the add, then the norm
        s = x + r
        return F.rms_norm(s, (N,), w, 1e-5), s

    fused = _compiled(eager)
    return Case({"M": M, "N": N}, {"torch": lambda: eager(x, r, w), "compile": lambda: fused(x, r, w),
                                   "triton": lambda: rms_norm(x, w, 1e-5, residual=r)},
                _checker(lambda: rms_norm(x, w, 1e-5, residual=r)[0], lambda: rms_norm_ref(x, w, 1e-5, residual=r)[0],
                         dtype), rms_norm_cost(M, N, dtype), "bandwidth_gbps")


def swiglu_case(M, F_, dtype, device):
    from labkit.kernels.swiglu import swiglu, swiglu_cost, swiglu_ref

    gate_up = _randn(M, 2 * F_, dtype=dtype, device=device)

    def eager(gu):
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up

    fused = _compiled(eager)
    return Case({"M": M, "F": F_}, {"torch": lambda: eager(gate_up), "compile": lambda: fused(gate_up),
                                    "triton": lambda: swiglu(gate_up)},
                _checker(lambda: swiglu(gate_up), lambda: swiglu_ref(gate_up), dtype), swiglu_cost(M, F_, dtype),
                "bandwidth_gbps")


def softmax_case(M, N, dtype, device):
    from labkit.kernels.softmax import softmax, softmax_cost, softmax_ref

    x = _randn(M, N, dtype=dtype, device=device)
    eager = lambda t: torch.softmax(t, dim=-1)  # noqa: E731
    fused = _compiled(eager)
    return Case({"M": M, "N": N}, {"torch": lambda: eager(x), "compile": lambda: fused(x),
                                   "triton": lambda: softmax(x)},
                _checker(lambda: softmax(x), lambda: softmax_ref(x), dtype), softmax_cost(M, N, dtype),
                "bandwidth_gbps")


def rope_case(T, H, HK, D, dtype, device):
    from labkit.kernels.rope import rope, rope_cost, rope_ref
    from labkit.model.backends import TorchKernels

    qkv = _randn(T, H + 2 * HK, D, dtype=dtype, device=device)
    angles = _randn(T, D // 2, dtype=torch.float32, device=device, seed=1) * 100
    cos, sin = angles.cos(), angles.sin()
    cos_full = torch.cat((cos, cos), -1).to(dtype)[:, None]  # [T, 1, D]: the torch backend's layout
    sin_full = torch.cat((-sin, sin), -1).to(dtype)[:, None]
    eager = lambda x: TorchKernels.rope(x, cos_full, sin_full)  # noqa: E731  (out of place)
    fused = _compiled(eager)
    qk = qkv[:, :H + HK]

    def rotated():  # the kernel works in place: rotate a fresh copy
        fresh = qkv.clone()
        rope(fresh[:, :H], fresh[:, H:H + HK], cos, sin)
        return fresh[:, :H + HK]

    expected = lambda: torch.cat(rope_ref(qkv[:, :H], qkv[:, H:H + HK], cos, sin), dim=1)  # noqa: E731
    return Case({"T": T, "H": H, "HK": HK, "D": D},
                {"torch": lambda: eager(qk), "compile": lambda: fused(qk),
                 "triton": lambda: rope(qkv[:, :H], qkv[:, H:H + HK], cos, sin)},
                _checker(rotated, expected, dtype), rope_cost(T, H, HK, D, dtype), "bandwidth_gbps")


def flash_attention_case(B, S, H, HK, D, dtype, device):
    from labkit.kernels.flash_attention import flash_attention, flash_attention_cost, flash_attention_ref

    q = _randn(B, S, H, D, dtype=dtype, device=device)
    k, v = _randn(B, S, HK, D, dtype=dtype, device=device, seed=1), _randn(B, S, HK, D, dtype=dtype, device=device,
                                                                             seed=2)
    cu = torch.arange(0, (B + 1) * S, S, device=device, dtype=torch.int32)
    packed = [t.view(B * S, t.shape[2], D) for t in (q, k, v)]

    def sdpa(q, k, v):  # [B, S, H, D] viewed as [B, H, S, D]: SDPA's layout without a copy
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=H != HK)

    def flash_only(q, k, v):  # SDPA restricted to its FlashAttention-2 backend, the issue's yardstick
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if q.is_cuda and q.dtype != torch.float32 else SDPBackend.MATH
        with sdpa_kernel(backend):
            return sdpa(q, k, v)

    fused = _compiled(sdpa)
    reference = flash_only if H == HK else sdpa  # SDPA's flash backend takes no GQA: the default dispatch then
    small = min(S, 300)  # the float32 reference materialises [H, S, S] scores: check a prefix of the rows
    cu_small = torch.arange(0, (B + 1) * small, small, device=device, dtype=torch.int32)
    sub = [t[:, :small].reshape(B * small, t.shape[2], D) for t in (q, k, v)]
    return Case({"B": B, "S": S, "H": H, "HK": HK, "D": D},
                {"torch": lambda: reference(q, k, v), "compile": lambda: fused(q, k, v),
                 "triton": lambda: flash_attention(*packed, cu, cu, S)},
                _checker(lambda: flash_attention(*sub, cu_small, cu_small, small),
                         lambda: flash_attention_ref(*sub, cu_small, cu_small), dtype),
                flash_attention_cost([S] * B, [S] * B, H, HK, D, dtype), "tflops")


def decode_attention_case(B, L, H, HK, D, dtype, device, block_size=16):
    from labkit.model.attention import AttentionMetadata, paged_attention, sdpa_core
    from labkit.kernels.common import scatter_to_blocks
    from labkit.kernels.decode_attention import decode_attention, decode_attention_cost, decode_attention_ref

    lens = [L] * B
    k, v = _randn(B * L, HK, D, dtype=dtype, device=device, seed=1), _randn(B * L, HK, D, dtype=dtype,
                                                                              device=device, seed=2)
    k_cache, v_cache, tables = scatter_to_blocks(k, v, lens, block_size, torch.Generator().manual_seed(0))
    del k, v
    q = _randn(B, H, D, dtype=dtype, device=device)
    ctx = torch.tensor(lens, device=device)
    meta = AttentionMetadata(positions=ctx - 1, slot_mapping=ctx - 1, block_tables=tables.long(), context_lens=ctx,
                             query_start=None, block_size=block_size)  # the static step's metadata
    k_new = q.new_empty(B, HK, D)  # the step's own k: the static path reads only its shape (already cached)
    eager = lambda q: paged_attention(q, k_new, k_new, k_cache, v_cache, meta, D**-0.5, sdpa_core)  # noqa: E731
    fused = _compiled(eager)
    return Case({"B": B, "L": L, "H": H, "HK": HK, "D": D},
                {"torch": lambda: eager(q), "compile": lambda: fused(q),
                 "triton": lambda: decode_attention(q, k_cache, v_cache, tables, ctx, block_size)},
                _checker(lambda: decode_attention(q, k_cache, v_cache, tables, ctx, block_size),
                         lambda: decode_attention_ref(q, k_cache, v_cache, tables, ctx, block_size), dtype),
                decode_attention_cost(lens, H, HK, D, dtype), "bandwidth_gbps")


# Sizes: decode-shaped (a few rows) to prefill-shaped (thousands), at llama-8b's widths (dim 4096, MLP 14336,
# 32 heads over 8 KV heads of 128). CPU_SWEEP is what the interpreter checks in seconds.
GPU_SWEEP = {
    "rms_norm": (rms_norm_case, [(M, 4096) for M in (1, 256, 4096, 16384)]),
    "swiglu": (swiglu_case, [(M, 14336) for M in (1, 256, 4096, 16384)]),
    "softmax": (softmax_case, [(4096, 1024), (4096, 16384), (1024, 131072)]),
    "rope": (rope_case, [(T, 32, 8, 128) for T in (1, 256, 4096, 16384)]),
    "flash_attention": (flash_attention_case, [(B, S, 32, 32, 128) for B, S in ((8, 1024), (4, 2048), (2, 4096),
                                                                                (1, 8192))]
                        + [(2, 4096, 32, 8, 128)]),
    "decode_attention": (decode_attention_case, [(1, 1024, 32, 8, 128), (1, 32768, 32, 8, 128),
                                                 (8, 8192, 32, 8, 128), (32, 4096, 32, 8, 128)]),
}
CPU_SWEEP = {
    "rms_norm": (rms_norm_case, [(1, 1), (37, 781)]),
    "swiglu": (swiglu_case, [(1, 1), (37, 781)]),
    "softmax": (softmax_case, [(1, 1), (5, 5000)]),
    "rope": (rope_case, [(1, 1, 1, 2), (33, 4, 2, 64)]),
    "flash_attention": (flash_attention_case, [(1, 1, 1, 1, 16), (2, 70, 4, 2, 32)]),
    "decode_attention": (decode_attention_case, [(1, 1, 1, 1, 16), (2, 100, 8, 2, 32)]),
}
OPS = tuple(GPU_SWEEP)


def fusion_traffic(dim: int, hidden_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, num_tokens: int,
                   dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Bytes one decoder layer's fused ops move, per op: the fused kernel's `<op>_cost` against the least that the
    unfused torch code moves, one pass per op it calls (a model of the traffic, not a measurement).

    For num_tokens tokens attending causally to each other (a prefill): the add and the norm are a 3-pass and a
    2-pass op (x2 per layer); silu then the product 2 + 3 passes; rotate-half RoPE on q and k a multiply, a roll,
    a multiply and an add (8 passes); attention without fusion writes and reads the [H, T, T] scores and the
    probabilities in float32 (softmax reads and writes, the matmuls write and read).
    """
    from labkit.kernels.common import element_size
    from labkit.kernels.flash_attention import flash_attention_cost
    from labkit.kernels.rms_norm import rms_norm_cost
    from labkit.kernels.rope import rope_cost
    from labkit.kernels.swiglu import swiglu_cost

    e, T, qk_heads = element_size(dtype), num_tokens, num_heads + num_kv_heads
    flash = flash_attention_cost([T], [T], num_heads, num_kv_heads, head_dim, dtype)
    return [
        {"op": "add+norm x2", "unfused_bytes": 2 * (5 * T * dim * e + dim * e),
         "fused_bytes": 2 * rms_norm_cost(T, dim, dtype).bytes},
        {"op": "SwiGLU", "unfused_bytes": 5 * T * hidden_dim * e,
         "fused_bytes": swiglu_cost(T, hidden_dim, dtype).bytes},
        {"op": "RoPE", "unfused_bytes": 8 * T * qk_heads * head_dim * e,
         "fused_bytes": rope_cost(T, num_heads, num_kv_heads, head_dim, dtype).bytes},
        {"op": "attention", "unfused_bytes": flash.bytes + 4 * num_heads * T * T * 4, "fused_bytes": flash.bytes},
    ]


def sweep_frame(rows: list[dict]):
    """Timed rows as a flat table: op, provider, size (its parameters as text), MB moved, GB/s, TFLOP/s, % of peak."""
    import pandas as pd

    keep = ("op", "dtype", "device", "provider")
    return pd.DataFrame([{"op": r["params"]["op"], "provider": r["params"]["provider"],
                          "size": " ".join(f"{k}={v}" for k, v in r["params"].items() if k not in keep),
                          "megabytes": r["metrics"]["bytes"] / 1e6, "gflop": r["metrics"]["flops"] / 1e9,
                          "bandwidth_gbps": r["metrics"]["bandwidth_gbps"], "tflops": r["metrics"]["tflops"],
                          "fraction_of_peak": r["metrics"]["fraction_of_peak"], "latency_ms": r["metrics"]["median_ms"],
                          **{k: r["params"][k] for k in ("S", "HK") if k in r["params"]}}
                         for r in rows if r["metrics"].get("timed")])


FIGURE_LABELS = {"megabytes": "MB moved per call", "bandwidth_gbps": "GB/s", "tflops": "TFLOP/s", "op": "kernel",
                 "provider": "provider", "S": "sequence length", "fraction_of_peak": "fraction of the measured peak"}
PROVIDER_NAMES = {"torch": "torch eager", "compile": "torch.compile", "triton": "Triton (labkit)"}


def bandwidth_figure(rows: list[dict]):
    """(figure, caption): GB/s against bytes moved for the memory-bound kernels, one panel per op, the measured
    peak dashed; the caption states the finding."""
    import plotly.express as px

    frame = sweep_frame(rows)
    frame = frame[frame.op != "flash_attention"].replace({"provider": PROVIDER_NAMES})
    peak = rows[0]["metrics"]["peak_bandwidth_gbps"]
    best = frame[frame.provider == PROVIDER_NAMES["triton"]].groupby("op").fraction_of_peak.max()
    fig = px.line(frame, x="megabytes", y="bandwidth_gbps", color="provider", facet_col="op", facet_col_wrap=3,
                  markers=True, log_x=True, labels=FIGURE_LABELS, title="Memory-bound kernels: bandwidth")
    fig.add_hline(y=peak, line_dash="dash", line_color="#444444")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1].replace("_", " ")))
    caption = (f"Triton reaches {best.min():.0%} to {best.max():.0%} of the measured {peak:,.0f} GB/s "
               "(dashed: a streaming copy's bandwidth).")
    return fig, caption


def attention_figure(rows: list[dict]):
    """(figure, caption): TFLOP/s of causal flash attention (one KV head per query head) against sequence
    length, per provider; the caption states the finding."""
    import plotly.express as px

    frame = sweep_frame(rows)
    frame = frame[(frame.op == "flash_attention") & (frame.HK == 32)].replace({"provider": PROVIDER_NAMES})
    seq = 4096 if (frame.S == 4096).any() else frame.S.max()  # the issue's yardstick
    at = frame[frame.S == seq].set_index("provider").tflops
    ratio = at[PROVIDER_NAMES["triton"]] / at[PROVIDER_NAMES["torch"]]
    fig = px.line(frame, x="S", y="tflops", color="provider", markers=True, log_x=True, labels=FIGURE_LABELS,
                  title="Flash attention forward")
    return fig, (f"Triton at {ratio:.2f}x SDPA's flash backend at sequence {int(seq):,} (causal, 32 heads, one KV "
                 "head each).")


def peak_bandwidth_gbps(device, size_mb: int = 2048) -> float:
    """The best of a streaming copy (bytes read + written) and a streaming sum (bytes read), in GB/s."""
    from labkit.lab.stats import memory_bandwidth_gbps

    src = torch.empty(size_mb * 2**20 // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src), device)["median_ms"]
    del src, dst
    return max(2 * size_mb * 2**20 / (copy_ms / 1e3) / 1e9, memory_bandwidth_gbps(size_mb, device=device))


def peak_tflops(device, n: int = 8192) -> float:
    """A bf16 matmul of n x n x n: the tensor cores' rate on this GPU, in TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (_time_ms(lambda: a @ b, device)["median_ms"] / 1e3) / 1e12


def _time_ms(fn, device) -> dict:
    """Median and 20th/80th percentile latency of fn on a GPU (CUDA events, L2 flushed between runs)."""
    import triton.testing

    median, low, high = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": median, "p20_ms": low, "p80_ms": high}


def run_kernel_bench(ops=None, dtype: str = "bf16", device: str = "auto", log: Callable[[str], object] | None = None,
                     progress: bool = False) -> list[dict]:
    """The sweep on a GPU, or the correctness check alone on a CPU (under the interpreter); result rows."""
    from tqdm.auto import tqdm

    from labkit.device import pick_dtype
    from labkit.kernels.common import INTERPRETER_HINT, can_run_on

    ops = tuple(dict.fromkeys(ops)) if ops else OPS
    unknown = [op for op in ops if op not in GPU_SWEEP]
    if unknown:
        raise ValueError(f"unknown op {unknown[0]!r}: choose from {', '.join(OPS)}")
    dev = pick_device(device)
    if not can_run_on(dev):
        raise ValueError(f"no CUDA device here: {INTERPRETER_HINT}")
    dt = pick_dtype(dtype)
    timed = dev.type == "cuda"
    if not timed and log:
        log("no CUDA device: checking each kernel against its reference under the Triton interpreter; speed is "
            "measured only on a GPU (the interpreter runs programs one by one in numpy)")
    env = describe_environment(dev)
    sweep = GPU_SWEEP if timed else CPU_SWEEP
    peaks = {}
    if timed:
        peaks = {"peak_bandwidth_gbps": peak_bandwidth_gbps(dev), "peak_tflops": peak_tflops(dev)}
        if log:
            log(f"measured peaks: {peaks['peak_bandwidth_gbps']:.0f} GB/s, {peaks['peak_tflops']:.0f} TFLOP/s bf16")
    rows = []
    cases = [(op, size) for op in ops for size in sweep[op][1]]
    for op, size in tqdm(cases, desc="bench kernels", file=sys.stderr, disable=not progress, dynamic_ncols=True):
        case = sweep[op][0](*size, dtype=dt, device=dev)
        error = case.check()
        params = {"op": op, **case.size, "dtype": dtype_name(dt), "device": str(dev)}
        base = {"max_abs_error": error, "bytes": case.cost.bytes, "flops": case.cost.flops, **peaks}
        if not timed:
            rows.append({"technique": "kernels", "params": {**params, "provider": "triton"},
                         "metrics": {**base, "timed": False}, "env": env})
            continue
        for provider in PROVIDERS:
            t = _time_ms(case.run[provider], dev)
            seconds = t["median_ms"] / 1e3
            metrics = {**base, **t, "timed": True, "bandwidth_gbps": case.cost.bytes / seconds / 1e9,
                       "tflops": case.cost.flops / seconds / 1e12}
            peak = peaks["peak_tflops"] if case.metric == "tflops" else peaks["peak_bandwidth_gbps"]
            metrics["fraction_of_peak"] = metrics[case.metric] / peak
            metrics["headline"] = case.metric
            rows.append({"technique": "kernels", "params": {**params, "provider": provider}, "metrics": metrics,
                         "env": env})
        by = {r["params"]["provider"]: r["metrics"]["median_ms"] for r in rows[-len(PROVIDERS):]}
        for r in rows[-len(PROVIDERS):]:  # ratios measured side by side: > 1 means faster than that provider
            r["metrics"]["speedup_vs_torch"] = by["torch"] / r["metrics"]["median_ms"]
            r["metrics"]["speedup_vs_compile"] = by["compile"] / r["metrics"]["median_ms"]
        del case
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "no rows"
    keep = ("op", "dtype", "device", "provider")
    sizes = lambda p: ",".join(f"{k}={v}" for k, v in p.items() if k not in keep)  # noqa: E731
    if not rows[0]["metrics"]["timed"]:
        lines = [f"{'op':18s} {'size':28s} {'max |error|':>12s}  (correctness only: no GPU)"]
        lines += [f"{r['params']['op']:18s} {sizes(r['params']):28s} {r['metrics']['max_abs_error']:12.2e}"
                  for r in rows]
        return "\n".join(lines)
    head = (f"{'op':18s} {'size':30s} {'provider':8s} {'ms':>9s} {'GB/s':>8s} {'TFLOP/s':>8s} {'% peak':>7s} "
            f"{'× torch':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        p, m = r["params"], r["metrics"]
        lines.append(f"{p['op']:18s} {sizes(p):30s} {p['provider']:8s} {m['median_ms']:9.4f} "
                     f"{m['bandwidth_gbps']:8.0f} {m['tflops']:8.1f} {m['fraction_of_peak']:7.0%} "
                     f"{m['speedup_vs_torch']:7.2f}")
    m = rows[0]["metrics"]
    lines.append(f"hardware: {format_environment(rows[0]['env']).split(' · python')[0]}; measured peaks "
                 f"{m['peak_bandwidth_gbps']:.0f} GB/s, {m['peak_tflops']:.0f} TFLOP/s bf16")
    return "\n".join(lines)


__all__ = ["run_kernel_bench", "format_table", "fusion_traffic", "sweep_frame", "bandwidth_figure", "attention_figure",
           "peak_bandwidth_gbps", "peak_tflops", "GPU_SWEEP", "CPU_SWEEP", "OPS", "PROVIDERS"]
