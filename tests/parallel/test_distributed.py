"""Process groups in one process: launch configuration checks, torchrun's environment, and a 1-rank gloo group
(all-gather, all-reduce timing, subgroups), the pieces `labkit tp` builds on."""

import socket

import pytest
import torch

from labkit.parallel.distributed import (TORCHRUN_ENV, LaunchConfig, all_gather_objects, fit_alpha_beta,
                                         init_distributed, is_torchrun, measure_all_reduce)


@pytest.mark.parametrize("kwargs, message", [
    ({"nproc": 0}, "nproc must be an integer >= 1, got 0"),
    ({"nproc": True}, "nproc must be an integer >= 1, got True"),
    ({"nnodes": 1.5}, "nnodes must be an integer >= 1, got 1.5"),
    ({"nproc": 2, "nnodes": 2}, "nnodes=2 needs a rendezvous"),
    ({"nnodes": 2, "master_addr": "n0"}, "--master-addr with several nodes needs --node-rank"),
    ({"nnodes": 2, "master_addr": "n0", "node_rank": 2}, r"node_rank must be in 0\.\.1, got 2"),
    ({"threads_per_rank": 0}, "threads_per_rank must be an integer >= 1, got 0"),
])
def test_launch_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LaunchConfig(**kwargs)


def test_world_size_and_threads_per_rank():
    config = LaunchConfig(nproc=4, nnodes=2, rdzv_endpoint="node0:29400")
    assert config.world_size == 8 and config.threads() >= 1
    assert LaunchConfig(nproc=2, threads_per_rank=3).threads() == 3


def test_outside_torchrun_init_names_what_is_missing(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not is_torchrun()
    with pytest.raises(ValueError, match=r"not started by torchrun \(RANK, WORLD_SIZE.*labkit tp --nproc N"):
        init_distributed("cpu")


def test_alpha_beta_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="at least two message sizes"):
        fit_alpha_beta([])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_one_rank_gloo_group(monkeypatch):
    """torchrun's environment for one rank: init joins gloo on the CPU; the collectives run over one rank."""
    import torch.distributed as dist

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_torchrun()
    ctx = init_distributed("cpu", timeout_s=60)
    try:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device.type) == (0, 1, "gloo", "cpu") and ctx.is_main
        assert all_gather_objects({"rank": 0, "x": [1, 2]}, ctx) == [{"rank": 0, "x": [1, 2]}]
        assert ctx.subgroup(1) is ctx
        with pytest.raises(ValueError, match="a subgroup needs 1 to 1 ranks, got 2"):
            ctx.subgroup(2)
        timings = measure_all_reduce(ctx, (1024, 4096), dtype=torch.float32, repeats=5, warmup=1, max_time_s=0.5)
        assert [t.num_bytes for t in timings] == [1024, 4096]
        assert all(t.latency_us > 0 and t.world_size == 1 and 1 <= t.num_repeats <= 5 for t in timings)
    finally:
        dist.destroy_process_group()
