"""The C++ bfloat16 row ops (labkit/model/csrc/cpu_ops.cpp) against torch's own ops: the KV write and RoPE exactly, the
norms and SiLU-and-multiply rounded where torch rounds (equal in nearly every element, the rest at most two
bfloat16 steps apart), and the model's kernels use them for bf16 rows on a CPU."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from labkit.model import cpu_attention
from labkit.model.backends import TorchKernels
from labkit.model.kv_cache import KVCache, write_kv

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler to build the extension")


@pytest.fixture(scope="module")
def ops():
    ops = cpu_attention.cpu_ops()
    assert ops is not None, "the extension did not build"
    return ops


def _close_to_torch(got, want):
    """Equal in nearly every element; where not, at most two bfloat16 steps apart (a float32 sum taken in another
    order, or a vectorised exp one float32 step off, moved a value across a rounding boundary)."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    differ = got != want
    assert differ.float().mean() < 0.01
    two_steps = want.float().abs() * 2**-6  # one bf16 step is at most |x| * 2^-7
    assert ((got.float() - want.float()).abs() <= two_steps + 1e-30)[differ].all()


@pytest.mark.parametrize("N, dim", [(1, 576), (37, 576), (300, 64), (5, 100)])
def test_add_rms_norm_and_rms_norm_round_as_torch_does(ops, N, dim):
    torch.manual_seed(N)
    x, residual = torch.randn(N, dim).bfloat16(), (4 * torch.randn(N, dim)).bfloat16()
    weight = (1 + 0.1 * torch.randn(dim)).bfloat16()
    total = residual + x
    normed, got_total = ops.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(got_total, total)  # one rounding of an exact float32 sum
    _close_to_torch(normed, F.rms_norm(total, (dim,), weight, 1e-5))
    _close_to_torch(ops.rms_norm(x, weight, 1e-5), F.rms_norm(x, (dim,), weight, 1e-5))


@pytest.mark.parametrize("N, inner", [(1, 1536), (64, 1536), (3, 40)])
def test_silu_mul_rounds_as_torch_does(ops, N, inner):
    torch.manual_seed(inner)
    gate_up = (3 * torch.randn(N, 2 * inner)).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    _close_to_torch(ops.silu_mul(gate_up), F.silu(gate) * up)


def test_write_kv_stores_what_index_copy_stores():
    torch.manual_seed(0)
    Hkv, D, N = 3, 64, 11
    fast, slow = (KVCache(1, 8, 4, Hkv, D, "cpu", torch.bfloat16) for _ in range(2))
    qkv = torch.randn(N, 9 + 2 * Hkv, D).bfloat16()
    k, v = qkv[:, 9:9 + Hkv], qkv[:, 9 + Hkv:]  # views with the row stride of the fused projection, as the model has
    slots = torch.randperm(32)[:N]
    write_kv(fast.k[0], fast.v[0], k, v, slots)
    slow.k[0].index_copy_(0, slots, k)
    slow.v[0].index_copy_(0, slots, v)
    assert torch.equal(fast.k[0], slow.k[0]) and torch.equal(fast.v[0], slow.v[0])


def test_write_kv_refuses_a_slot_outside_the_cache(ops):
    cache = KVCache(1, 2, 4, 2, 16, "cpu", torch.bfloat16)
    k, past_the_end = torch.zeros(1, 2, 16).bfloat16(), cache.k[0].shape[0]
    with pytest.raises(RuntimeError, match=f"slot {past_the_end} is outside the cache"):
        ops.write_kv(cache.k[0].transpose(0, 1), cache.v[0].transpose(0, 1), k, k, torch.tensor([past_the_end]))


def test_the_kernels_take_bf16_rows_through_the_extension_and_others_through_torch(monkeypatch):
    calls = []
    real = cpu_attention.cpu_ops()

    class Spy:
        def __getattr__(self, name):
            return lambda *a: calls.append(name) or getattr(real, name)(*a)

    monkeypatch.setattr(cpu_attention, "cpu_ops", lambda: Spy())
    x = torch.randn(4, 64)
    w = torch.ones(64)
    TorchKernels.add_rms_norm(x, x, w, 1e-5)
    TorchKernels.silu_mul(x)
    assert calls == []  # float32 stays torch's (the HF-identity path)
    TorchKernels.add_rms_norm(x.bfloat16(), x.bfloat16(), w, 1e-5)
    TorchKernels.rms_norm(x.bfloat16(), w.bfloat16(), 1e-5)
    TorchKernels.silu_mul(x.bfloat16())
    TorchKernels.silu_mul(x.bfloat16().t())  # not contiguous rows: torch
    cos = torch.ones(4, 1, 64)
    TorchKernels.rope(x.view(4, 1, 64), cos, cos)
    TorchKernels.rope(x.bfloat16().view(4, 1, 64), cos.bfloat16(), cos.bfloat16())
    assert calls == ["add_rms_norm", "rms_norm", "silu_mul", "rope"]


@pytest.mark.parametrize("N, H, D", [(1, 12, 64), (37, 12, 64), (5, 4, 128), (3, 2, 6)])
def test_rope_rounds_as_torch_does(ops, N, H, D):
    torch.manual_seed(N * D)
    qkv = (3 * torch.randn(N, H + 3, D)).bfloat16()
    x = qkv[:, :H]  # q and k heads of the fused projection: rows strided past v
    angles = torch.randn(N, 1, D // 2)
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).bfloat16()
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1).bfloat16()
    want = x * cos + torch.roll(x, D // 2, dims=-1) * sin
    got = ops.rope(x, cos, sin)
    assert got.is_contiguous() and torch.equal(got, want)  # the same three roundings, element by element
    assert torch.equal(TorchKernels.rope(x, cos, sin), want)
    assert torch.equal(TorchKernels.rope(x.float(), cos.float(), sin.float()),
                       x.float() * cos.float() + torch.roll(x.float(), D // 2, dims=-1) * sin.float())
