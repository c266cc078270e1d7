"""RMSNorm fused with the residual add before it (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization").

A pre-norm decoder computes `x = x + sublayer(h); h = rms_norm(x)` twice per layer. Unfused that is three passes
over the activations (read both, write the sum; read the sum, write the norm); fused it is one: each program
loads a tile of rows of the sublayer output and the residual, stores their sum (the new residual stream) and
its normalised, weighted copy. Memory-bound: bytes = 2 reads + 2 writes of [M, N], plus the weight once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from labkit.kernels.common import Cost, tile_width, check_tensor, element_size, rows_per_program


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, M, N, stride_x, stride_res, stride_out,
                     stride_res_out, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] this program's rows
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N] the whole row: a norm needs all of it at once
    mask = (rows[:, None] < M) & (cols[None, :] < N)  # rows past M and columns past N (BLOCK_N is a power of 2)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)  # rounded as an unfused add would store it
        tl.store(res_out_ptr + rows[:, None] * stride_res_out + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)  # [BLOCK_M]; masked columns add zeros
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)  # [BLOCK_N]
    y = x * inv_rms[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of x [M, N] (of x + residual when given) times weight [N].

    Returns (normalised [M, N], the sum x + residual [M, N] or None), both in x's dtype.
    """
    check_tensor(x, "x", 2)
    check_tensor(weight, "weight", 1)
    M, N = x.shape
    assert weight.shape == (N,), f"weight has shape {tuple(weight.shape)}, expected ({N},)"
    assert weight.device == x.device, f"weight is on {weight.device}, x on {x.device}"
    assert eps > 0, f"eps must be > 0, got {eps}"
    res_out = None
    if residual is not None:
        check_tensor(residual, "residual", 2)
        assert residual.shape == x.shape, f"residual has shape {tuple(residual.shape)}, x {tuple(x.shape)}"
        assert residual.dtype == x.dtype, f"residual has dtype {residual.dtype}, x {x.dtype}"
        res_out = torch.empty_like(x)
    out = torch.empty_like(x)
    if M == 0:
        return out, res_out
    BLOCK_N = tile_width(N)
    assert BLOCK_N <= 2**16, f"rows of {N} elements do not fit one tile; split the norm"
    BLOCK_M = rows_per_program(BLOCK_N, M)
    grid = (triton.cdiv(M, BLOCK_M),)
    res = residual if residual is not None else x  # not read without a residual
    _rms_norm_kernel[grid](x, res, weight, out, res_out if res_out is not None else out, M, N, x.stride(0),
                           res.stride(0), out.stride(0), (res_out if res_out is not None else out).stride(0), eps,
                           HAS_RESIDUAL=residual is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                           num_warps=min(16, max(1, BLOCK_N // 256)))
    return out, res_out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference in float32 (the sum rounded to x's dtype first, as the model stores its residual stream)."""
    s = x if residual is None else (x + residual)  # in x's dtype, as the unfused model adds
    s32 = s.float()
    y = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y, (None if residual is None else s32)


def rms_norm_cost(M: int, N: int, dtype: torch.dtype, residual: bool = True) -> Cost:
    """Bytes: read x (and the residual), write the norm (and the sum), read the weight; FLOPs per element:
    square, sum, scale, weight (and the add)."""
    e = element_size(dtype)
    tensors = 4 if residual else 2
    return Cost(bytes=tensors * M * N * e + N * e, flops=(5 if residual else 4) * M * N)


__all__ = ["rms_norm", "rms_norm_ref", "rms_norm_cost"]
