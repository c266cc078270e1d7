"""torch.distributed for the lab: one process group per torchrun launch, gloo on CPU and NCCL on CUDA.

`init_distributed` reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
picks the backend from the device, so the same code runs two CPU processes over loopback and eight GPUs over
NVLink. `measure_all_reduce` times the collective tensor parallelism depends on, by message size, and
`fit_alpha_beta` turns those timings into the latency and bandwidth of the alpha-beta model (Hockney 1994).
`torchrun_command` builds the launch line (single node, or several through torchrun's rendezvous options).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from labkit.checks import check_ints, check_optional_int, is_int
from labkit.device import pick_device, synchronize

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_ALL_REDUCE_BYTES = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: global rank and world size, rank on its node, backend, device."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    group: object = None  # the process group of these ranks; None is the default (whole) group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def subgroup(self, size: int) -> "DistContext | None":
        """The first `size` ranks as a group of their own (every rank must call this); None on the others."""
        if not 1 <= size <= self.world_size:
            raise ValueError(f"a subgroup needs 1 to {self.world_size} ranks, got {size}")
        if size == self.world_size:
            return self
        group = dist.new_group(list(range(size)))
        if self.rank >= size:
            return None
        return dataclasses.replace(self, world_size=size, group=group)


def backend_for(device: torch.device) -> str:
    """gloo for CPU tensors, NCCL for CUDA ones: the one switch between the laptop and the cluster."""
    if device.type not in BACKENDS:
        raise ValueError(f"tensor parallelism runs on cpu or cuda, not {device.type!r}")
    return BACKENDS[device.type]


def is_torchrun() -> bool:
    """Whether this process was started by torchrun (or anything that sets its environment)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 120.0) -> DistContext:
    """Join the process group torchrun set up; on CUDA each local rank takes its own GPU.

    The device is resolved per rank: "auto" or "cuda" becomes cuda:LOCAL_RANK on a GPU node, cpu elsewhere.
    """
    if not is_torchrun():
        missing = [name for name in TORCHRUN_ENV if name not in os.environ]
        raise ValueError(f"not started by torchrun ({', '.join(missing)} unset): launch with `labkit tp --nproc N`")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    return join_group(rank, world, local, device, timeout_s)


def join_group(rank: int, world_size: int, local_rank: int, device: str | torch.device = "auto",
               timeout_s: float = 120.0, store=None) -> DistContext:
    """Join the default process group as `rank` of `world_size`: through torchrun's environment, or through
    `store` (a torch.distributed.TCPStore, for ranks a program starts itself). On CUDA the rank takes
    cuda:local_rank unless the device names one."""
    from datetime import timedelta

    dev = pick_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = backend_for(dev)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, device=dev)


def all_gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's `obj`, in rank order, on every rank (small picklable objects only)."""
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.group)
    return out


@dataclass
class AllReduceTiming:
    """Median time of one all-reduce of `num_bytes` over the world, and what it moved."""

    num_bytes: int
    world_size: int
    latency_us: float
    p10_us: float
    p90_us: float
    num_repeats: int

    @property
    def algbw_gbps(self) -> float:
        """Bytes of the message over the time (nccl-tests' "algorithm bandwidth")."""
        return self.num_bytes / (self.latency_us * 1e-6) / 1e9

    @property
    def busbw_gbps(self) -> float:
        """What each link carried: a ring all-reduce sends 2(W-1)/W of the message (nccl-tests' "bus bandwidth")."""
        w = self.world_size
        return self.algbw_gbps * 2 * (w - 1) / w if w > 1 else float("nan")


def measure_all_reduce(ctx: DistContext, sizes_bytes: Sequence[int] = DEFAULT_ALL_REDUCE_BYTES,
                       dtype: torch.dtype = torch.float32, repeats: int = 50, warmup: int = 5,
                       max_time_s: float = 2.0) -> list[AllReduceTiming]:
    """Time all-reduce (sum) of each message size on every rank; a barrier before each call so that a late rank's
    compute is not counted as communication. Returns the slowest rank's median per size (what a step waits for)."""
    from labkit.lab.stats import percentile

    element = torch.empty((), dtype=dtype).element_size()
    timings = []
    for size in sizes_bytes:
        x = torch.ones(max(1, size // element), dtype=dtype, device=ctx.device)
        for _ in range(warmup):
            dist.all_reduce(x, group=ctx.group)
        samples = []
        deadline = time.perf_counter() + max_time_s
        for _ in range(repeats):
            dist.barrier(group=ctx.group)
            synchronize(ctx.device)
            start = time.perf_counter()
            dist.all_reduce(x, group=ctx.group)
            synchronize(ctx.device)
            samples.append((time.perf_counter() - start) * 1e6)
            # every rank must run the same number of calls: stop on rank 0's clock, agreed by all
            stop = torch.tensor([float(time.perf_counter() > deadline and len(samples) >= 5)], device=ctx.device)
            dist.broadcast(stop, dist.get_global_rank(ctx.group, 0) if ctx.group is not None else 0,
                           group=ctx.group)
            if stop.item():
                break
        medians = all_gather_objects(statistics.median(samples), ctx)
        slowest = max(range(ctx.world_size), key=lambda r: medians[r])
        mine = (statistics.median(samples), percentile(samples, 10), percentile(samples, 90))
        stats = all_gather_objects(mine, ctx)[slowest]
        timings.append(AllReduceTiming(num_bytes=x.numel() * element, world_size=ctx.world_size,
                                       latency_us=stats[0], p10_us=stats[1], p90_us=stats[2],
                                       num_repeats=len(samples)))
    return timings


def fit_alpha_beta(timings: Sequence[AllReduceTiming]) -> tuple[float, float]:
    """Least-squares fit of latency = a + n / b over the measured sizes: (a in µs, b in GB/s).

    `a` is the fixed cost of one all-reduce and `b` its effective bandwidth for the whole message (the ring's
    2(W-1)/W factor included); the scaling model splits them into per-step alpha and link beta.
    """
    if len(timings) < 2:
        raise ValueError("fitting latency and bandwidth needs at least two message sizes")
    xs = [t.num_bytes for t in timings]
    ys = [t.latency_us for t in timings]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)  # µs per byte
    intercept = my - slope * mx
    return max(intercept, 0.0), (1e-3 / slope if slope > 0 else float("inf"))


@dataclass(frozen=True)
class LaunchConfig:
    """How torchrun starts the ranks: processes per node and, for several nodes, the rendezvous."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int | None = None  # with --master-addr (static rendezvous); None with c10d rendezvous
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous (any node)
    rdzv_id: str | None = None
    threads_per_rank: int | None = None  # torch threads in each rank (default: this node's cores / nproc)

    def __post_init__(self):
        check_ints(self, ("nproc", "nnodes"))
        if self.nnodes > 1 and not (self.rdzv_endpoint or self.master_addr):
            raise ValueError(f"nnodes={self.nnodes} needs a rendezvous: --rdzv-endpoint HOST:PORT (or --master-addr "
                             "with --node-rank)")
        if self.master_addr and self.nnodes > 1 and self.node_rank is None:
            raise ValueError("--master-addr with several nodes needs --node-rank")
        if self.node_rank is not None and not (is_int(self.node_rank) and 0 <= self.node_rank < self.nnodes):
            raise ValueError(f"node_rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        check_optional_int("threads_per_rank", self.threads_per_rank)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def threads(self) -> int:
        return self.threads_per_rank or max(1, (os.cpu_count() or 1) // self.nproc)


def torchrun_command(launch: LaunchConfig, program: str, args: Sequence[str]) -> list[str]:
    """The torchrun command line that starts `program args...` on every rank of this node: a module
    (`python -m program`), or a script when program ends in .py."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(launch.nproc)]
    if launch.nnodes == 1 and not (launch.rdzv_endpoint or launch.master_addr):
        cmd.append("--standalone")  # a free port on localhost
    else:
        cmd += ["--nnodes", str(launch.nnodes)]
        if launch.rdzv_endpoint:
            cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", launch.rdzv_endpoint,
                    "--rdzv-id", launch.rdzv_id or "labkit-tp"]
        else:
            cmd += ["--node-rank", str(launch.node_rank or 0), "--master-addr", launch.master_addr,
                    "--master-port", str(launch.master_port or 29500)]
    return [*cmd, *([program] if program.endswith(".py") else ["-m", program]), *args]


__all__ = ["DistContext", "BACKENDS", "backend_for", "is_torchrun", "init_distributed", "join_group",
           "all_gather_objects", "AllReduceTiming", "measure_all_reduce", "fit_alpha_beta", "LaunchConfig",
           "torchrun_command", "DEFAULT_ALL_REDUCE_BYTES"]
