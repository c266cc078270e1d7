"""The fused residual-add + RMSNorm kernel against its float32 reference."""

import pytest
import torch
from tests.kernels.kernel_checks import DTYPES, assert_close, assert_stored_exactly, randn

from labkit.kernels.rms_norm import rms_norm, rms_norm_cost, rms_norm_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 781), (3, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(device, gen, dtype, shape, with_residual):
    x, w = randn(*shape, dtype=dtype, device=device, gen=gen), randn(shape[1], dtype=dtype, device=device, gen=gen)
    r = randn(*shape, dtype=dtype, device=device, gen=gen) if with_residual else None
    out, total = rms_norm(x, w, 1e-5, residual=r)
    ref, ref_total = rms_norm_ref(x, w, 1e-5, residual=r)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, dtype)
    if with_residual:
        assert_stored_exactly(total, x + r)  # the new residual stream is the unfused add
    else:
        assert total is None


def test_non_multiple_of_the_block(device, gen):
    x, r = randn(1823, 781, dtype=torch.float32, device=device, gen=gen), randn(1823, 781, dtype=torch.float32,
                                                                                  device=device, gen=gen)
    w = randn(781, dtype=torch.float32, device=device, gen=gen)
    out, total = rms_norm(x, w, 1e-6, residual=r)
    assert_close(out, rms_norm_ref(x, w, 1e-6, residual=r)[0], torch.float32)
    assert torch.equal(total, x + r)


def test_strided_rows(device, gen):
    x = randn(8, 96, dtype=torch.float32, device=device, gen=gen)[:, :64]  # rows 96 apart
    w = randn(64, dtype=torch.float32, device=device, gen=gen)
    assert_close(rms_norm(x, w)[0], rms_norm_ref(x, w)[0], torch.float32)


def test_launcher_asserts_shapes(device):
    x = torch.ones(4, 8, device=device)
    with pytest.raises(AssertionError, match="weight has shape"):
        rms_norm(x, torch.ones(7, device=device))
    with pytest.raises(AssertionError, match="residual has shape"):
        rms_norm(x, torch.ones(8, device=device), residual=torch.ones(4, 9, device=device))
    with pytest.raises(AssertionError, match="dims"):
        rms_norm(torch.ones(8, device=device), torch.ones(8, device=device))


def test_cost_counts_four_passes():
    cost = rms_norm_cost(2, 8, torch.bfloat16)
    assert cost.bytes == 4 * 2 * 8 * 2 + 8 * 2 and cost.flops == 5 * 16
    assert rms_norm_cost(2, 8, torch.float32, residual=False).bytes == 2 * 2 * 8 * 4 + 8 * 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_size_on_gpu(dtype):
    gen = torch.Generator().manual_seed(1)
    x, r = (torch.randn(4096, 8192, generator=gen).to("cuda", dtype) for _ in range(2))
    w = torch.randn(8192, generator=gen).to("cuda", dtype)
    out, total = rms_norm(x, w, 1e-5, residual=r)
    assert_close(out, rms_norm_ref(x, w, 1e-5, residual=r)[0], dtype)
    assert torch.equal(total, x + r)
