import os
import subprocess
import sys

import pytest
import torch

from labkit.device import (auto_dtype, cpu_flags, describe_environment, format_environment, pick_device, pick_dtype,
                           seed_everything)


def test_auto_picks_an_available_device():
    dev = pick_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                        else "cpu")


def test_explicit_device_wins():
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["tpu", "gpu0", ""])
def test_unknown_device_names_the_value(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        pick_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")


def test_dtypes():
    assert pick_dtype("bf16") is torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) is auto_dtype("cpu", cpu_flags())
    assert pick_dtype("auto") is pick_dtype("auto", "cpu")  # no device: the CPU
    with pytest.raises(ValueError, match="'int3'"):
        pick_dtype("int3")


def test_auto_dtype_is_bf16_only_where_the_hardware_has_bf16_arithmetic():
    avx2 = {"sse4_2", "avx", "avx2", "fma"}
    assert auto_dtype("cpu", avx2) is torch.float32  # bf16 would be emulated
    assert auto_dtype("cpu", avx2 | {"avx512f", "avx512bw", "avx512_vnni"}) is torch.float32  # AVX-512 without BF16
    assert auto_dtype("cpu", avx2 | {"avx512f", "avx512_bf16"}) is torch.bfloat16  # Zen 4, Cooper Lake
    assert auto_dtype("cpu", avx2 | {"amx_tile", "amx_bf16"}) is torch.bfloat16  # Sapphire Rapids
    assert auto_dtype("cpu") is torch.float32  # no flags known (not Linux)
    assert auto_dtype("cuda", cuda_bf16=True) is torch.bfloat16
    assert auto_dtype("cuda", cuda_bf16=False) is torch.float16  # pre-Ampere GPUs
    assert auto_dtype("mps") is torch.float32
    assert cpu_flags() == cpu_flags() and all(isinstance(f, str) for f in cpu_flags())


def test_seeding_repeats_random_draws():
    seed_everything(7)
    a = torch.rand(4)
    g = seed_everything(7)
    assert torch.equal(a, torch.rand(4))
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(7)))


def test_environment_stamp_names_hardware_and_versions():
    env = describe_environment()
    for key in ("cpu", "num_cpus", "gpu", "python", "torch", "transformers", "triton", "git_sha", "torch_threads"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert "torch" in format_environment(env)


@pytest.mark.gpu
def test_cuda_device_and_sync():
    from labkit.device import synchronize

    dev = pick_device("auto")
    assert dev.type == "cuda"
    x = torch.ones(1024, device=dev)
    synchronize(dev)
    env = describe_environment(dev)
    assert env["gpu"] and env["gpu_memory_gb"] > 0 and env["cuda"] and env["device"] == str(dev)
    assert env["nvidia_driver"] and env["cudnn"]
    assert float(x.sum()) == 1024


def test_the_stamp_names_the_device_the_run_used():
    env = describe_environment(torch.device("cpu"))
    assert env["device"] == "cpu" and "device cpu" in format_environment(env)
    assert describe_environment()["device"] is None


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two pretend GPUs, so the stamp's GPU fields are tested on a CPU-only machine."""
    from types import SimpleNamespace

    from labkit import device

    gpus = [SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=85_520_809_984, major=9, minor=0),
            SimpleNamespace(name="NVIDIA A10", total_memory=23_836_033_024, major=8, minor=6)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpus[i])
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setattr(device, "_nvidia_driver", lambda: "570.124.06")
    device._static_environment.cache_clear()
    yield
    device._static_environment.cache_clear()


def test_the_stamp_names_gpu_memory_driver_cuda_and_cudnn(fake_cuda):
    env = describe_environment("cuda:1")
    assert (env["gpu"], env["gpu_memory_gb"], env["gpu_capability"]) == ("NVIDIA A10", 23.8, "8.6")
    assert (env["nvidia_driver"], env["cuda"], env["cudnn"], env["num_gpus"]) == ("570.124.06", "12.8", "9.10.2", 2)
    assert env["device"] == "cuda:1"
    assert describe_environment("cuda")["gpu"] == "NVIDIA H100 80GB HBM3"
    line = format_environment(env)
    assert "NVIDIA A10 (23.8 GB, driver 570.124.06, CUDA 12.8, cuDNN 9.10.2) · device cuda:1" in line


def test_driver_version_from_the_kernel_module(monkeypatch, tmp_path):
    from labkit import device

    real_path = device.Path
    text = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build  "
            "(dvs-builder@U16-I3-B03-4-3)  Wed Feb 26 2025\n")
    (tmp_path / "version").write_text(text)
    monkeypatch.setattr(device, "Path", lambda p: tmp_path / "version" if p == "/proc/driver/nvidia/version"
                        else real_path(p))
    assert device._nvidia_driver() == "570.124.06"


def test_release_openmp_workers_frees_this_threads_pool_and_torch_runs_on():
    # run in a child: the pool freed is the test process's own, and the count of threads is the proof
    code = """
import os, torch
from labkit.device import release_openmp_workers
torch.set_num_threads(2)
x = torch.randn(2048, 2048)
(x @ x).sum()  # a parallel region: this thread's OpenMP pool now holds a worker
before = len(os.listdir('/proc/self/task'))
assert release_openmp_workers()
after = len(os.listdir('/proc/self/task'))
assert after < before, (before, after)
assert torch.allclose(x @ x, (x.double() @ x.double()).float(), rtol=1e-3, atol=1e-2)  # a new pool serves
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
