"""Pick a device and dtype, seed, synchronise, and describe the environment that stamps every result."""

from __future__ import annotations

import functools
import os
import platform
import random
import subprocess
from pathlib import Path

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve "auto" to CUDA, then MPS, then CPU; an explicit device must exist."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    kind = name.split(":")[0]
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device {device!r}: choose one of {', '.join(DEVICE_KINDS)} (e.g. cuda:1)")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available on this machine")
    return torch.device(name)


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """Resolve a dtype name; "auto" is bf16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower()
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of auto, fp32, bf16, fp16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, torch (all devices) and numpy; return a CPU generator for sampling."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for the core
        pass
    return torch.Generator().manual_seed(seed)


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued work on the device, so a clock read after it means something."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated, else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _git_sha() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    sha = out.stdout.strip()
    # outputs the lab itself writes (results, figures, executed notebooks) do not make the code dirty
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!data",
                            ":!figures", ":!runs"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict:
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "num_gpus": torch.cuda.device_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "labkit": _version("labkit"),
        "git_sha": _git_sha(),
    }


def describe_environment() -> dict:
    """The environment stamp: hardware, versions, git SHA, torch threads."""
    return {**_static_environment(), "torch_threads": torch.get_num_threads()}


def format_environment(env: dict | None = None) -> str:
    """One line for a notebook's setup cell or a CLI table."""
    env = env or describe_environment()
    hw = env["gpu"] or f"{env['cpu']} ({env['num_cpus']} cpus, {env['cpu_capability']})"
    return (f"{hw} · python {env['python']} · torch {env['torch']} · transformers {env['transformers']} · "
            f"triton {env['triton']} · git {env['git_sha']}")
