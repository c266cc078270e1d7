"""Row softmax in two passes with the online normaliser (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax"), for rows of any width.

The first pass streams the row in tiles, keeping a running maximum m and a running sum d of exp(x - m) that
is rescaled by exp(m_old - m_new) whenever the maximum grows; the second pass writes exp(x - m) / d. Two reads
and one write of [M, N] however wide the row (Triton's tutorial keeps a whole row in registers instead, which
caps its width). Memory-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from labkit.kernels.common import Cost, tile_width, check_tensor, element_size, is_interpreter


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, M, N, stride_x, stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < M  # the last tile of rows runs past M
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running maximum
    d = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp(x - m)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols[None, :] < N)  # the last tile of columns runs past N
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=float("-inf"))
        x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: no NaN from -inf - -inf
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    # padding rows past M: finite stand-ins keep them free of NaN; a real row of -inf still gives 0 / 0 = NaN
    m = tl.where(row_ok & (m != float("-inf")), m, 0.0)
    d = tl.where(row_ok, d, 1.0)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols[None, :] < N)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=float("-inf"))
        y = tl.exp(x.to(tl.float32) - m[:, None]) / d[:, None]
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of x [M, N], any N; a row of all -inf gives NaN, as torch.softmax does."""
    check_tensor(x, "x", 2)
    M, N = x.shape
    out = torch.empty_like(x)
    if M == 0 or N == 0:
        return out
    if is_interpreter():
        BLOCK_N = min(tile_width(N), 4096)
        BLOCK_M = max(1, min(tile_width(M), 2**16 // BLOCK_N))
    else:  # one row per program; tiles of up to 4096 columns, streamed for wider rows
        BLOCK_N, BLOCK_M = min(tile_width(N), 4096), 1
    grid = (triton.cdiv(M, BLOCK_M),)
    _softmax_kernel[grid](x, out, M, N, x.stride(0), out.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                          num_warps=min(16, max(1, BLOCK_N // 256)))
    return out


def softmax_ref(x: torch.Tensor) -> torch.Tensor:
    """The reference in float32."""
    return torch.softmax(x.float(), dim=-1)


def softmax_cost(M: int, N: int, dtype: torch.dtype) -> Cost:
    """Bytes: the two-pass kernel reads x twice and writes once, but the minimum a softmax must move is one read
    and one write, which is what GB/s is reported against; FLOPs: about 5 per element."""
    return Cost(bytes=2 * M * N * element_size(dtype), flops=5 * M * N)


__all__ = ["softmax", "softmax_ref", "softmax_cost"]
