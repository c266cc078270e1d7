"""Helpers of the kernel tests: seeded inputs and comparisons with the per-dtype tolerance table."""

import torch

from labkit.kernels.common import TOLERANCES, is_interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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
