"""Causal flash attention (dense varlen and paged) against its float32 reference: GQA ratios 1, 3 and 8,
rows of 1 and 257 tokens, prefill chunks that attend to a cached context."""

import pytest
import torch
from tests.kernels.kernel_checks import DTYPES, assert_close, randn

from labkit.kernels.common import scatter_to_blocks
from labkit.kernels.flash_attention import (flash_attention, flash_attention_cost, flash_attention_paged,
                                            flash_attention_ref)


def _rows(q_lens, k_lens, H, HK, D, dtype, device, gen):
    q = randn(sum(q_lens), H, D, dtype=dtype, device=device, gen=gen)
    k = randn(sum(k_lens), HK, D, dtype=dtype, device=device, gen=gen)
    v = randn(sum(k_lens), HK, D, dtype=dtype, device=device, gen=gen)
    cu = lambda lens: torch.tensor([0, *lens], device=device).cumsum(0)  # noqa: E731
    return q, k, v, cu(q_lens), cu(k_lens)


ONE = ([1], [1], 1, 1, 16)  # (query lengths, key lengths, H, Hkv, D)
LONG = ([257], [257], 3, 1, 16)  # GQA 3, a row past two tiles of 128
RAGGED = ([5, 1, 40], [5, 1, 40], 8, 1, 16)  # GQA 8, three prompts side by side
CHUNKS = ([7, 1], [100, 9], 6, 2, 24)  # prefill chunks over a cached context; D not a power of two
CASES = [ONE, LONG, RAGGED, CHUNKS]
# every case in fp32; the half-precision dtypes on the cheaper cases (the interpreter is slow)
DENSE = [(torch.float32, c) for c in CASES] + [(d, c) for d in DTYPES[1:] for c in (ONE, RAGGED)] + \
    [(torch.bfloat16, LONG)]


@pytest.mark.parametrize("dtype,case", DENSE, ids=lambda x: str(x).replace("torch.", "") if
                         isinstance(x, torch.dtype) else None)
def test_dense_varlen_matches_reference(device, gen, dtype, case):
    q_lens, k_lens, H, HK, D = case
    q, k, v, cq, ck = _rows(q_lens, k_lens, H, HK, D, dtype, device, gen)
    out = flash_attention(q, k, v, cq, ck, max(q_lens))
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, flash_attention_ref(q, k, v, cq, ck), dtype)


@pytest.mark.parametrize("q_lens,k_lens,H,HK,D", [LONG, CHUNKS])
def test_paged_matches_dense(device, gen, q_lens, k_lens, H, HK, D):
    dtype = torch.float32
    q, k, v, cq, ck = _rows(q_lens, k_lens, H, HK, D, dtype, device, gen)
    k_cache, v_cache, tables = scatter_to_blocks(k, v, k_lens, block_size=16, generator=gen)
    ctx = torch.tensor(k_lens, device=device)
    out = flash_attention_paged(q, k_cache, v_cache, tables, cq, ctx, max(q_lens), block_size=16)
    assert_close(out, flash_attention_ref(q, k, v, cq, ck), dtype)


def test_non_causal_and_custom_scale(device, gen):
    q, k, v, cq, ck = _rows([3, 20], [50, 20], 4, 4, 16, torch.float32, device, gen)
    out = flash_attention(q, k, v, cq, ck, 20, scale=0.3, causal=False)
    assert_close(out, flash_attention_ref(q, k, v, cq, ck, scale=0.3, causal=False), torch.float32)


def test_launcher_asserts(device):
    q, k = torch.ones(4, 6, 16, device=device), torch.ones(4, 4, 16, device=device)
    cu = torch.tensor([0, 4], device=device)
    with pytest.raises(AssertionError, match="multiple of KV heads"):
        flash_attention(q, k, k, cu, cu, 4)
    with pytest.raises(AssertionError, match="B \\+ 1"):
        flash_attention(q, k[:, :2], k[:, :2], cu, torch.tensor([0, 2, 4], device=device), 4)


def test_cost_counts_the_visible_triangle():
    cost = flash_attention_cost([4], [4], H=1, HK=1, D=1, dtype=torch.float32)
    assert cost.flops == 4 * (1 + 2 + 3 + 4)
    assert flash_attention_cost([1], [10], 2, 1, 8, torch.float32).flops == 4 * 10 * 2 * 8


@pytest.mark.gpu
def test_full_size_against_sdpa():
    """Sequence 4096, head dim 128, GQA 4, bf16: the benchmark's shape, against torch SDPA."""
    B, S, H, HK, D = 2, 4096, 32, 8, 128
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B * S, H, D, generator=gen).to("cuda", torch.bfloat16)
    k, v = (torch.randn(B * S, HK, D, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    cu = torch.arange(0, (B + 1) * S, S, device="cuda")
    out = flash_attention(q, k, v, cu, cu, S)
    to_bhsd = lambda t: t.view(B, S, -1, D).transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(to_bhsd(q).float(), to_bhsd(k).float(),
                                                           to_bhsd(v).float(), is_causal=True, enable_gqa=True)
    assert_close(out, ref.transpose(1, 2).reshape(B * S, H, D), torch.bfloat16)
