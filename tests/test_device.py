import pytest
import torch

from labkit.device import (describe_environment, format_environment, pick_device, pick_dtype,
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
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_dtype("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ValueError, match="'int3'"):
        pick_dtype("int3")


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
    assert describe_environment()["gpu"]
    assert float(x.sum()) == 1024
