"""Micro-benchmark helpers: warm-up excluded, repeats, synchronised clocks, robust statistics, bandwidth."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from labkit.device import peak_memory_mb, reset_peak_memory, synchronize


@dataclass(frozen=True)
class MedianInterval:
    """An interval of the median [low, high] between two order statistics, with what it is and its exact
    coverage: the probability that it holds the population median, for samples of any continuous distribution.
    Unpacks as (low, high)."""

    low: float
    high: float
    coverage: float
    method: str  # "order statistics" (x_(l), x_(n+1-l) with l > 1) or "min-max" (the whole sample)
    num_samples: int

    def __iter__(self):
        return iter((self.low, self.high))

    @property
    def label(self) -> str:
        """What the interval is, e.g. "min-max of 3 runs (75 % coverage of the median)"."""
        what = f"min-max of {self.num_samples} runs" if self.method == "min-max" else \
            f"order-statistic interval of {self.num_samples} runs"
        return f"{what} ({format_coverage(self.coverage)} coverage of the median)"


def format_coverage(coverage: float) -> str:
    """A coverage as a percentage that does not round up to a level it misses: 0.9688 -> "96.8 %"."""
    return f"{math.floor(coverage * 1000) / 10:g} %"


def order_statistic_coverage(n: int, lower: int) -> float:
    """Exact coverage of [x_(lower), x_(n + 1 - lower)] (1-based order statistics) for the median of a continuous
    distribution: P(lower <= B <= n - lower) for B ~ Binomial(n, 1/2), the number of samples below the median."""
    if not 1 <= lower <= (n + 1) // 2:
        raise ValueError(f"lower must be in 1..{(n + 1) // 2} for n={n}, got {lower}")
    return sum(math.comb(n, k) for k in range(lower, n - lower + 1)) / 2**n


def median_ci(values: Sequence[float], confidence: float = 0.95) -> MedianInterval:
    """The narrowest symmetric order-statistic interval of the median whose exact (binomial) coverage is at least
    `confidence`; with too few samples for that (n <= 5 at 95 %) the whole sample, labelled "min-max" with the
    coverage it has (75 % for 3 samples, 1 - 2^(1 - n) in general). Distribution-free (Hahn & Meeker 1991, 5.2)."""
    if not values:
        raise ValueError("no samples for an interval of the median")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    data, n = sorted(values), len(values)
    lower = 1
    while lower < (n + 1) // 2 and order_statistic_coverage(n, lower + 1) >= confidence:
        lower += 1
    method = "min-max" if lower == 1 else "order statistics"
    return MedianInterval(data[lower - 1], data[n - lower], order_statistic_coverage(n, lower), method, n)


@dataclass
class Timing:
    """Statistics of repeated measurements, in milliseconds. The median's interval is `median_ci`'s: its exact
    coverage and method are fields; `ci95_low_ms`/`ci95_high_ms` give it only where it covers >= 95 % (NaN else)."""

    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    stdev_ms: float
    ci_low_ms: float  # median_ci: an order-statistic interval of the median...
    ci_high_ms: float
    ci_coverage: float  # ...its exact coverage (0.75 for three runs)...
    ci_method: str  # ..."order statistics" or "min-max"
    num_repeats: int
    num_warmup: int
    samples_ms: list[float] = field(default_factory=list, repr=False)  # in the order they were taken
    peak_memory_mb: float | None = None  # CUDA max allocated, or the process's peak RSS on CPU

    @property
    def ci95_low_ms(self) -> float:
        """The interval's low end where it is a 95 % interval of the median, else NaN."""
        return self.ci_low_ms if self.ci_coverage >= 0.95 else math.nan

    @property
    def ci95_high_ms(self) -> float:
        return self.ci_high_ms if self.ci_coverage >= 0.95 else math.nan

    @property
    def ci_label(self) -> str:
        """What [ci_low_ms, ci_high_ms] is, e.g. "min-max of 3 runs (75 % coverage of the median)"."""
        return MedianInterval(self.ci_low_ms, self.ci_high_ms, self.ci_coverage, self.ci_method,
                              self.num_repeats).label

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


def summarize(samples_ms: Sequence[float], num_warmup: int = 0) -> Timing:
    samples = list(samples_ms)
    if not samples:
        raise ValueError("no samples to summarize")
    ci = median_ci(samples)
    return Timing(
        median_ms=statistics.median(samples), mean_ms=statistics.fmean(samples),
        p10_ms=percentile(samples, 10), p90_ms=percentile(samples, 90), min_ms=min(samples), max_ms=max(samples),
        stdev_ms=statistics.stdev(samples) if len(samples) > 1 else 0.0, ci_low_ms=ci.low, ci_high_ms=ci.high,
        ci_coverage=ci.coverage, ci_method=ci.method, num_repeats=len(samples), num_warmup=num_warmup,
        samples_ms=samples)


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
