"""The online row softmax against its float32 reference, on rows narrower and far wider than one tile."""

import warnings

import pytest
import torch
from tests.kernels.kernel_checks import DTYPES, assert_close, randn

from labkit.kernels.softmax import softmax, softmax_cost, softmax_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 781), (2, 9000)])
def test_matches_reference(device, gen, dtype, shape):
    x = 4 * randn(*shape, dtype=dtype, device=device, gen=gen)
    out = softmax(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, softmax_ref(x), dtype)


def test_non_multiple_of_the_block(device, gen):
    x = randn(1823, 781, dtype=torch.float32, device=device, gen=gen)
    assert_close(softmax(x), softmax_ref(x), torch.float32)


def test_rows_wider_than_a_tile_sum_to_one(device, gen):
    x = 10 * randn(3, 20000, dtype=torch.float32, device=device, gen=gen)  # 5 tiles of 4096
    x[1, -1] = 1e4  # the maximum in the last tile: every earlier tile's sum is rescaled
    out = softmax(x)
    assert_close(out, softmax_ref(x), torch.float32)
    torch.testing.assert_close(out.sum(-1), torch.ones(3, device=device))


def test_masked_entries_and_empty_rows(device):
    x = torch.tensor([[0.0, float("-inf"), 0.0], [float("-inf")] * 3], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy says -inf - -inf is invalid
        out = softmax(x)
    assert out[0].tolist() == [0.5, 0.0, 0.5]
    assert torch.isnan(out[1]).all() and torch.isnan(torch.softmax(x, -1)[1]).all()  # as torch does


def test_cost():
    assert softmax_cost(3, 5, torch.float32).bytes == 2 * 3 * 5 * 4


@pytest.mark.gpu
def test_full_size_on_gpu():
    x = torch.randn(4096, 32768, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    assert_close(softmax(x), softmax_ref(x), torch.bfloat16)
