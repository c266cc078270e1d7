"""The fused silu(gate) * up kernel against its float32 reference."""

import pytest
import torch
from tests.kernels.kernel_checks import DTYPES, assert_close, randn

from labkit.kernels.swiglu import swiglu, swiglu_cost, swiglu_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 781), (2, 4100)])
def test_matches_reference(device, gen, dtype, shape):
    M, F = shape
    gate_up = randn(M, 2 * F, dtype=dtype, device=device, gen=gen)
    out = swiglu(gate_up)
    assert out.shape == (M, F) and out.dtype == dtype
    assert_close(out, swiglu_ref(gate_up), dtype)


def test_non_multiple_of_the_block(device, gen):
    gate_up = randn(1823, 2 * 781, dtype=torch.float32, device=device, gen=gen)
    assert_close(swiglu(gate_up), swiglu_ref(gate_up), torch.float32)


def test_strided_rows(device, gen):
    wide = randn(5, 3 * 48, dtype=torch.float32, device=device, gen=gen)
    gate_up = wide[:, :96]  # rows 144 apart
    assert_close(swiglu(gate_up), swiglu_ref(gate_up), torch.float32)


def test_launcher_asserts(device):
    with pytest.raises(AssertionError, match="even number"):
        swiglu(torch.ones(2, 7, device=device))
    with pytest.raises(AssertionError, match="dtype"):
        swiglu(torch.ones(2, 8, dtype=torch.int32, device=device))


def test_cost():
    assert swiglu_cost(4, 10, torch.float16).bytes == 3 * 4 * 10 * 2


@pytest.mark.gpu
def test_full_size_on_gpu():
    gen = torch.Generator().manual_seed(1)
    gate_up = torch.randn(4096, 2 * 14336, generator=gen).to("cuda", torch.bfloat16)
    assert_close(swiglu(gate_up), swiglu_ref(gate_up), torch.bfloat16)
