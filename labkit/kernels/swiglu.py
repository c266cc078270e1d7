"""SwiGLU's elementwise half: silu(gate) * up (Shazeer 2020, "GLU Variants Improve Transformer").

The MLP's first matmul writes gate and up side by side, [M, 2F]. Unfused, silu reads gate and writes its
result, then the product reads that and up and writes again: five passes over [M, F]. Fused it is three (read
gate, read up, write the product), with silu computed in float32 registers. Memory-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from labkit.kernels.common import Cost, tile_width, check_tensor, element_size, is_interpreter


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr, M, F, stride_gu, stride_out, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F] a slice of the F outputs
    mask = (rows[:, None] < M) & (cols[None, :] < F)  # the last row tile and the last column tile run over
    gate = tl.load(gu_ptr + rows[:, None] * stride_gu + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + rows[:, None] * stride_gu + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [M, 2F] holding gate in its first F columns and up in the last F -> [M, F]."""
    check_tensor(gate_up, "gate_up", 2)
    M, two_f = gate_up.shape
    assert two_f % 2 == 0, f"gate_up must have an even number of columns (gate, then up), got {two_f}"
    F = two_f // 2
    out = torch.empty((M, F), device=gate_up.device, dtype=gate_up.dtype)
    if M == 0 or F == 0:
        return out
    if is_interpreter():  # one program per 64 Ki elements: the interpreter's cost is per program
        BLOCK_F = min(tile_width(F), 4096)
        BLOCK_M = max(1, min(tile_width(M), 2**16 // BLOCK_F))
    else:  # 1024-wide row slices: enough programs to fill the GPU even for one decode row
        BLOCK_F, BLOCK_M = min(tile_width(F), 1024), 1
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(F, BLOCK_F))
    _swiglu_kernel[grid](gate_up, out, M, F, gate_up.stride(0), out.stride(0), BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F,
                         num_warps=4)
    return out


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """The reference in float32."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu_cost(M: int, F: int, dtype: torch.dtype) -> Cost:
    """Bytes: read gate and up, write the product; FLOPs: about 4 per output (sigmoid's exp counted as one)."""
    return Cost(bytes=3 * M * F * element_size(dtype), flops=4 * M * F)


__all__ = ["swiglu", "swiglu_ref", "swiglu_cost"]
