"""Kernel tests run on a GPU when there is one, else on the CPU under Triton's interpreter (TRITON_INTERPRET=1,
as `make test` sets it); without either they are skipped with the reason."""

import pytest
import torch

from labkit.kernels.common import INTERPRETER_HINT, can_run_on


@pytest.fixture(scope="session")
def device():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not can_run_on(dev):
        pytest.skip(f"no CUDA device and no interpreter: {INTERPRETER_HINT}")
    return dev


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
