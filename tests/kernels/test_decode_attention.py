"""Split-K decode attention over the paged cache against its float32 reference: GQA ratios 1, 3 and 8, contexts
of 1 and 257 tokens, one split and several, blocks of 16 and of 5 tokens."""

import pytest
import torch
from tests.kernels.kernel_checks import assert_close, randn

from labkit.kernels.common import scatter_to_blocks
from labkit.kernels.decode_attention import (choose_num_splits, decode_attention, decode_attention_cost,
                                             decode_attention_ref)


def _paged(lens, H, HK, D, block_size, dtype, device, gen):
    k = randn(sum(lens), HK, D, dtype=dtype, device=device, gen=gen)
    v = randn(sum(lens), HK, D, dtype=dtype, device=device, gen=gen)
    k_cache, v_cache, tables = scatter_to_blocks(k, v, lens, block_size, generator=gen)
    q = randn(len(lens), H, D, dtype=dtype, device=device, gen=gen)
    return q, k_cache, v_cache, tables, torch.tensor(lens, device=device)


@pytest.mark.parametrize("dtype,num_splits", [(torch.float32, 1), (torch.float32, 3), (torch.float16, 3),
                                              (torch.bfloat16, 1), (torch.bfloat16, 3)])
@pytest.mark.parametrize("lens,H,HK,D,block_size", [
    ([1], 1, 1, 16, 16),
    ([257, 1, 30], 3, 1, 32, 16),
    ([9, 64], 8, 1, 16, 5),
    ([100], 6, 2, 24, 16),
])
def test_matches_reference(device, gen, dtype, lens, H, HK, D, block_size, num_splits):
    q, k_cache, v_cache, tables, ctx = _paged(lens, H, HK, D, block_size, dtype, device, gen)
    out = decode_attention(q, k_cache, v_cache, tables, ctx, block_size, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, decode_attention_ref(q, k_cache, v_cache, tables, ctx, block_size), dtype)


def test_more_splits_than_a_short_row_fills(device, gen):
    """Rows whose context ends before the last splits: empty splits weigh nothing in the combine."""
    q, k_cache, v_cache, tables, ctx = _paged([3, 70], 4, 2, 16, 8, torch.float32, device, gen)
    out = decode_attention(q, k_cache, v_cache, tables, ctx, 8, num_splits=9)
    assert_close(out, decode_attention_ref(q, k_cache, v_cache, tables, ctx, 8), torch.float32)


def test_strided_queries_from_fused_qkv(device, gen):
    qkv = randn(2, 4 + 2 * 2, 16, dtype=torch.float32, device=device, gen=gen)
    _, k_cache, v_cache, tables, ctx = _paged([20, 33], 4, 2, 16, 16, torch.float32, device, gen)
    q = qkv[:, :4]  # heads 16 apart, rows 128 apart
    out = decode_attention(q, k_cache, v_cache, tables, ctx, 16)
    assert_close(out, decode_attention_ref(q, k_cache, v_cache, tables, ctx, 16), torch.float32)


def test_splits_depend_on_shapes_only():
    assert choose_num_splits(1, 8, 8192, torch.device("cpu")) == 1


def test_cost():
    cost = decode_attention_cost([10, 20], H=4, HK=2, D=8, dtype=torch.bfloat16)
    assert cost.bytes == 2 * 30 * 2 * 8 * 2 + 2 * 2 * 4 * 8 * 2 and cost.flops == 4 * 30 * 4 * 8


@pytest.mark.gpu
def test_long_context_on_gpu():
    gen = torch.Generator().manual_seed(1)
    lens = [8192, 5000, 1, 300]
    q, k_cache, v_cache, tables, ctx = _paged(lens, 32, 8, 128, 16, torch.bfloat16, "cuda", gen)
    assert choose_num_splits(len(lens), 8, tables.shape[1] * 16, q.device) > 1
    out = decode_attention(q, k_cache, v_cache, tables, ctx, 16)
    assert_close(out, decode_attention_ref(q, k_cache, v_cache, tables, ctx, 16), torch.bfloat16)


def test_metadata_as_columns_of_the_static_steps_input(device, gen):
    """The graph-captured step passes context lengths and block tables as views into one [B, 4 + M] tensor."""
    q, k_cache, v_cache, tables, ctx = _paged([17, 40, 3], 4, 2, 16, 8, torch.float32, device, gen)
    inputs = torch.zeros(3, 4 + tables.shape[1], dtype=torch.long, device=device)
    inputs[:, 3], inputs[:, 4:] = ctx, tables
    out = decode_attention(q, k_cache, v_cache, inputs[:, 4:], inputs[:, 3], 8)
    assert_close(out, decode_attention_ref(q, k_cache, v_cache, tables, ctx, 8), torch.float32)
