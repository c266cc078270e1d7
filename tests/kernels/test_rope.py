"""In-place rotary embedding of q and k against its float32 reference."""

import pytest
import torch
from tests.kernels.kernel_checks import DTYPES, assert_close, randn

from labkit.kernels.rope import rope, rope_cost, rope_ref


def _angles(T, D, device, gen, base=10000.0):
    pos = torch.randint(0, 4096, (T,), generator=gen).float()
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2).float() / D)
    freqs = pos[:, None] * inv_freq  # [T, D/2]
    return freqs.cos().to(device), freqs.sin().to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,HK,D", [(1, 1, 1, 2), (257, 4, 2, 32), (5, 8, 1, 130)])
def test_in_place_on_fused_qkv(device, gen, dtype, T, H, HK, D):
    qkv = randn(T, H + 2 * HK, D, dtype=dtype, device=device, gen=gen)
    before = qkv.clone()
    q, k = qkv[:, :H], qkv[:, H:H + HK]  # strided views into one tensor, as the model passes them
    cos, sin = _angles(T, D, device, gen)
    ref_q, ref_k = rope_ref(q, k, cos, sin)
    out_q, out_k = rope(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    assert_close(qkv[:, :H], ref_q, dtype)
    assert_close(qkv[:, H:H + HK], ref_k, dtype)
    assert torch.equal(qkv[:, H + HK:], before[:, H + HK:])  # v untouched


def test_q_alone(device, gen):
    q = randn(3, 4, 16, dtype=torch.float32, device=device, gen=gen)
    cos, sin = _angles(3, 16, device, gen)
    ref, _ = rope_ref(q, None, cos, sin)
    assert rope(q, None, cos, sin)[1] is None
    assert_close(q, ref, torch.float32)


def test_launcher_asserts(device):
    q, k = torch.ones(2, 4, 8, device=device), torch.ones(2, 2, 8, device=device)
    with pytest.raises(AssertionError, match="cos and sin"):
        rope(q, k, torch.ones(2, 8, device=device), torch.ones(2, 8, device=device))
    with pytest.raises(AssertionError, match="even"):
        rope(torch.ones(2, 4, 7, device=device), None, torch.ones(2, 3, device=device), torch.ones(2, 3, device=device))


def test_cost():
    assert rope_cost(2, 4, 2, 8, torch.float16).bytes == 2 * 2 * 6 * 8 * 2 + 2 * 2 * 4 * 4


@pytest.mark.gpu
def test_full_size_on_gpu():
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(4096, 48, 128, generator=gen).to("cuda", torch.bfloat16)
    q, k = qkv[:, :32], qkv[:, 32:40]
    cos, sin = _angles(4096, 128, "cuda", gen)
    ref_q, ref_k = rope_ref(q, k, cos, sin)
    rope(q, k, cos, sin)
    assert_close(q, ref_q, torch.bfloat16)
    assert_close(k, ref_k, torch.bfloat16)
