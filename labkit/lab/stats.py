"""Micro-benchmark helpers: warm-up excluded, repeats, synchronised clocks, robust statistics, bandwidth."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from labkit.device import peak_memory_mb, reset_peak_memory, synchronize


@dataclass
class Timing:
    """Statistics of repeated measurements, in milliseconds."""

    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    stdev_ms: float
    ci95_low_ms: float  # bootstrap-free 95% interval of the median (order statistics)
    ci95_high_ms: float
    num_repeats: int
    num_warmup: int
    samples_ms: list[float] = field(default_factory=list, repr=False)  # in the order they were taken
    peak_memory_mb: float | None = None  # CUDA max allocated, or the process's peak RSS on CPU

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method)."""
    if not values:
        return float("nan")
    data = sorted(values)
    k = (len(data) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median from order statistics (normal approximation)."""
    data = sorted(values)
    n = len(data)
    if n < 3:
        return data[0], data[-1]
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half))
    return data[lo], data[hi]


def summarize(samples_ms: Sequence[float], num_warmup: int = 0) -> Timing:
    samples = list(samples_ms)
    if not samples:
        raise ValueError("no samples to summarize")
    lo, hi = median_ci(samples)
    return Timing(
        median_ms=statistics.median(samples), mean_ms=statistics.fmean(samples),
        p10_ms=percentile(samples, 10), p90_ms=percentile(samples, 90), min_ms=min(samples), max_ms=max(samples),
        stdev_ms=statistics.stdev(samples) if len(samples) > 1 else 0.0, ci95_low_ms=lo, ci95_high_ms=hi,
        num_repeats=len(samples), num_warmup=num_warmup, samples_ms=samples)


def measure(fn: Callable[[], object], repeats: int = 10, warmup: int = 2, device=None,
            max_time_s: float | None = None) -> Timing:
    """Time fn() `repeats` times after `warmup` untimed calls, synchronising the device around each call.

    Also records the peak memory over the timed calls (CUDA max allocated; peak RSS of the process on CPU).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    for _ in range(warmup):
        fn()
    reset_peak_memory(dev)
    samples = []
    deadline = time.perf_counter() + max_time_s if max_time_s else None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
        if deadline and time.perf_counter() > deadline and len(samples) >= 3:
            break
    timing = summarize(samples, warmup)
    timing.peak_memory_mb = peak_memory_mb(dev)
    return timing


def memory_bandwidth_gbps(size_mb: int = 256, repeats: int = 5, device="cpu") -> float:
    """Measured streaming read bandwidth: the best of a few full reductions over a buffer larger than caches."""
    buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32, device=device)
    timing = measure(lambda: buf.sum(), repeats=repeats, warmup=1, device=device)
    return buf.numel() * 4 / (timing.min_ms / 1e3) / 1e9


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights read per decode step: every matrix once, the embedding row only (tied heads read it)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed" in name and not _is_tied(model, p):
            total += p.shape[-1] * p.element_size()  # one row looked up
        else:
            total += p.numel() * p.element_size()
    for name, b in model.named_buffers():  # quantized weights live in buffers
        if b.dtype in (torch.int8, torch.uint8, torch.int32) and b.numel() > 1024:
            total += b.numel() * b.element_size()
    return total


def _is_tied(model, p) -> bool:
    head = getattr(model, "lm_head", None)
    return head is not None and getattr(head, "weight", None) is p
