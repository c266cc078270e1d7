"""Rotary position embedding applied in place to q and k (Su et al. 2021, "RoFormer"), rotate-half layout.

For each token and head, the first and second halves (x1, x2) of the head dim rotate by the token's angles:
(x1 cos - x2 sin, x2 cos + x1 sin). One launch rotates q and k of a block of tokens (program axis 1 picks
which), reading the [T, D/2] cos and sin tables once per token instead of once per head, and writes back where
it read, so no new tensor is allocated. Memory-bound: q and k read and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from labkit.kernels.common import Cost, tile_width, check_tensor, element_size, is_interpreter


@triton.jit
def _rotate(x_ptr, cos, sin, tokens, t_ok, num_heads, stride_t, stride_h, HALF, BLOCK_H: tl.constexpr,
            BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)  # [BLOCK_H] every head of the tensor at once
    dims = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF] the first half of the head dim; the second is HALF further
    offs = tokens[:, None, None] * stride_t + heads[None, :, None] * stride_h + dims[None, None, :]
    # tokens past T, heads past this tensor's count (k has fewer), dims past HALF (not a power of two)
    mask = t_ok[:, None, None] & (heads[None, :, None] < num_heads) & (dims[None, None, :] < HALF)
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + offs + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, T, HQ, HK, HALF, stride_qt, stride_qh, stride_kt, stride_kh,
                 stride_ct, stride_st, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    dims = tl.arange(0, BLOCK_HALF)
    t_ok = tokens < T  # the last block of tokens runs past T
    cs_mask = t_ok[:, None] & (dims[None, :] < HALF)
    cos = tl.load(cos_ptr + tokens[:, None] * stride_ct + dims[None, :], mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + tokens[:, None] * stride_st + dims[None, :], mask=cs_mask, other=0.0).to(tl.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]  # [BLOCK_T, 1, BLOCK_HALF]: the same angles for every head
    if tl.program_id(1) == 0:  # axis 1 picks q or k
        _rotate(q_ptr, cos, sin, tokens, t_ok, HQ, stride_qt, stride_qh, HALF, BLOCK_H, BLOCK_HALF)
    else:
        _rotate(k_ptr, cos, sin, tokens, t_ok, HK, stride_kt, stride_kh, HALF, BLOCK_H, BLOCK_HALF)


def rope(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] (or only q, when k is None) in place by cos, sin [T, D/2], the angle
    of each token and frequency. q and k may be views into one fused qkv tensor (strided tokens and heads).

    Returns (q, k).
    """
    check_tensor(q, "q", 3)
    check_tensor(cos, "cos", 2)
    check_tensor(sin, "sin", 2)
    T, HQ, D = q.shape
    if k is not None:
        check_tensor(k, "k", 3)
        assert k.shape[0] == T and k.shape[2] == D, f"k has shape {tuple(k.shape)}, q {tuple(q.shape)}"
        assert q.dtype == k.dtype and q.device == k.device, f"k ({k.dtype}, {k.device}) differs from q"
    assert D % 2 == 0, f"head dim must be even, got {D}"
    assert cos.shape == (T, D // 2) and sin.shape == (T, D // 2), \
        f"cos and sin must be [{T}, {D // 2}], got {tuple(cos.shape)} and {tuple(sin.shape)}"
    assert cos.device == sin.device == q.device, "q, cos and sin must be on one device"
    if T == 0:
        return q, k
    HK = k.shape[1] if k is not None else 0
    BLOCK_H, BLOCK_HALF = tile_width(max(HQ, HK)), tile_width(D // 2)
    budget = 2**16 if is_interpreter() else 4096  # elements of one half-tile
    BLOCK_T = max(1, min(tile_width(T), budget // (BLOCK_H * BLOCK_HALF)))
    grid = (triton.cdiv(T, BLOCK_T), 1 if k is None else 2)  # axis 1: q, then k
    kk = q if k is None else k  # not touched without k
    _rope_kernel[grid](q, kk, cos, sin, T, HQ, HK, D // 2, q.stride(0), q.stride(1), kk.stride(0), kk.stride(1),
                       cos.stride(0), sin.stride(0), BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF,
                       num_warps=4)
    return q, k


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference in float32, out of place: (rotated q, rotated k or None)."""
    c, s = cos.float()[:, None], sin.float()[:, None]  # [T, 1, D/2]

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rotate(q), (None if k is None else rotate(k))


def rope_cost(T: int, HQ: int, HK: int, D: int, dtype: torch.dtype) -> Cost:
    """Bytes: q and k read and written, the cos and sin tables (float32) read; FLOPs: 3 per element."""
    return Cost(bytes=2 * T * (HQ + HK) * D * element_size(dtype) + 2 * T * (D // 2) * 4, flops=3 * T * (HQ + HK) * D)


__all__ = ["rope", "rope_ref", "rope_cost"]
