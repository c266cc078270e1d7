"""Pick a device and dtype, seed, synchronise, and describe the environment that stamps every result."""

from __future__ import annotations

import functools
import os
import platform
import random
import re
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
    "float": torch.float32,  # vLLM's other names
    "half": torch.float16,
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


# CPU flags (/proc/cpuinfo) that give bf16 matrix arithmetic in hardware; without them bf16 is emulated and slow
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def auto_dtype(device_type: str, flags: frozenset[str] | set[str] = frozenset(), cuda_bf16: bool = False) -> torch.dtype:
    """What dtype="auto" means, as a pure function of the hardware: bf16 on a CPU whose flags include AVX-512 BF16
    or AMX (vLLM's CPU build picks bf16 there too), or on a GPU with bf16 support; fp32 otherwise (AVX2-only CPUs
    emulate bf16, MPS, old GPUs)."""
    if device_type == "cpu":
        return torch.bfloat16 if CPU_BF16_FLAGS & set(flags) else torch.float32
    if device_type == "cuda":
        return torch.bfloat16 if cuda_bf16 else torch.float16
    return torch.float32


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """Resolve a dtype name; "auto" (see `auto_dtype`) asks this machine's hardware, on `device` (None: CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower()
    if name == "auto":
        kind = torch.device(device).type if device is not None else "cpu"
        cuda_bf16 = kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return auto_dtype(kind, cpu_flags() if kind == "cpu" else frozenset(), cuda_bf16)
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


def release_openmp_workers() -> bool:
    """Free the OpenMP worker threads this thread started (`omp_pause_resource_all(omp_pause_hard)` on the
    OpenMP runtime torch loaded); True when the runtime did it.

    Call it on the thread that loaded a model before another thread takes over the torch work (the server's
    engine thread). GNU OpenMP keeps one pool of workers per thread that ever ran a parallel region, and once
    it manages more threads than there are CPUs it stops spinning between regions and sleeps on a futex
    instead: on a 2-core CPU the engine's thread then ran a one-row decode step at half speed (27 vs 14 ms,
    oneDNN's bf16 linear 90 vs 40 us), the main thread's idle pool being the one too many. A pool comes back
    if this thread runs a parallel torch op again.
    """
    import ctypes

    lib_dir = Path(torch.__file__).parent / "lib"
    for name in (lib_dir / "libgomp.so.1", lib_dir / "libiomp5.so", "libgomp.so.1"):
        try:
            pause = ctypes.CDLL(str(name)).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause(2) == 0  # omp_pause_hard
    return False


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


def repo_root() -> Path:
    """The folder that holds labkit/, notebooks/, data/ and figures/ (a checkout, or an editable install)."""
    return Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def _git_sha() -> str | None:
    root = repo_root()
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


def _cudnn_version() -> str | None:
    if not torch.backends.cudnn.is_available():
        return None
    v = torch.backends.cudnn.version()  # 90100 for 9.1.0 (cuDNN 9 on), 8902 for 8.9.2 (cuDNN 8)
    if v is None:
        return None
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 90000 else f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version: from the kernel module, else nvidia-smi; None when neither answers."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module(?: for \w+)?\s+([\d.]+)", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _gpu(index: int) -> dict:
    props = torch.cuda.get_device_properties(index)
    return {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 1e9, 1),
            "gpu_capability": f"{props.major}.{props.minor}"}


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict:
    has_cuda = torch.cuda.is_available()
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_cpus": os.cpu_count(),
        # the first GPU; a run on another one names it in describe_environment(device)
        **(_gpu(0) if has_cuda else {"gpu": None, "gpu_memory_gb": None, "gpu_capability": None}),
        "num_gpus": torch.cuda.device_count() if has_cuda else 0,
        "nvidia_driver": _nvidia_driver() if has_cuda else None,
        "cuda": torch.version.cuda if has_cuda else None,  # the CUDA runtime torch was built with
        "cudnn": _cudnn_version() if has_cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "labkit": _version("labkit"),
        "git_sha": _git_sha(),
    }


def describe_environment(device: torch.device | str | None = None) -> dict:
    """The environment stamp: hardware, versions, git SHA, torch threads, and `device`, the one the run used
    (None when the caller did not say); on a GPU, the GPU fields name that GPU, its memory, the NVIDIA
    driver, and the CUDA and cuDNN versions."""
    env = {**_static_environment(), "torch_threads": torch.get_num_threads(),
           "device": str(device) if device is not None else None}
    if device is not None and torch.device(device).type == "cuda":
        env.update(_gpu(torch.device(device).index or 0))
    return env


def format_environment(env: dict | None = None) -> str:
    """One line for a notebook's setup cell or a CLI table."""
    env = env or describe_environment()
    if env.get("gpu"):
        versions = ", ".join(f"{name} {env[key]}" for name, key in (("driver", "nvidia_driver"), ("CUDA", "cuda"),
                                                                    ("cuDNN", "cudnn")) if env.get(key))
        memory = f"{env['gpu_memory_gb']:g} GB" if env.get("gpu_memory_gb") else None
        hw = f"{env['gpu']} ({', '.join(x for x in (memory, versions) if x)})"
    else:
        hw = f"{env['cpu']} ({env['num_cpus']} cpus, {env['cpu_capability']})"
    used = f" · device {env['device']}" if env.get("device") else ""
    return (f"{hw}{used} · python {env['python']} · torch {env['torch']} · transformers {env['transformers']} · "
            f"triton {env['triton']} · git {env['git_sha']}")
