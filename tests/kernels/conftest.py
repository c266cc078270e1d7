"""Kernel tests run on a GPU when there is one, else on the CPU under Triton's interpreter (TRITON_INTERPRET=1,
as `make test` sets it); without either they are skipped with the reason."""

import pytest
import torch

from labkit.kernels.common import INTERPRETER_HINT, TOLERANCES, can_run_on, is_interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def device():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not can_run_on(dev):
        pytest.skip(f"no CUDA device and no interpreter: {INTERPRETER_HINT}")
    return dev


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def randn(*shape, dtype, device, gen):
    """Seeded normal values drawn on the CPU (the same on every machine), then moved."""
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def assert_close(actual, expected, dtype):
    """The kernel's output against its float32 reference, within the dtype's tolerance."""
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype])


def assert_stored_exactly(actual, expected):
    """A value the kernel only adds and stores must equal torch's bit for bit; except bf16 under the interpreter,
    which rounds float32 to bf16 by truncation (Triton 3.9) where torch and GPUs round to nearest: one ulp."""
    if actual.dtype == torch.bfloat16 and is_interpreter():
        torch.testing.assert_close(actual.float(), expected.float(), atol=0, rtol=2**-7)
    else:
        assert torch.equal(actual, expected)
