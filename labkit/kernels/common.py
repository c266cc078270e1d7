"""What every kernel launcher shares: where a kernel may run, argument checks, block sizes, costs, tolerances.

Triton kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, read by
`triton.jit` when a kernel module is imported, so it must be set before Python imports labkit.kernels). The
interpreter runs one program after another in numpy, so launchers give each program larger tiles there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tolerances of a kernel against its float32 reference, per input dtype: a few units in the last place of the
# dtype, scaled for the reductions inside the kernels (sums over a row or a context).
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2),
}
INTERPRETER_HINT = "set TRITON_INTERPRET=1 before Python starts to run the Triton kernels on the CPU"


@dataclass(frozen=True)
class Cost:
    """What one call of a kernel must move and compute: the denominators of GB/s and TFLOP/s."""

    bytes: int
    flops: int


def is_interpreter() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 when triton.jit ran)."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the variable directly
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def can_run_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of this device here."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and is_interpreter())


def check_device(device: torch.device | str) -> None:
    """Raise ValueError naming the device when the kernels cannot run on it."""
    kind = torch.device(device).type
    if kind == "cuda":
        return
    if kind == "cpu":
        if not is_interpreter():
            raise ValueError(f"Triton kernels need a CUDA device, or the interpreter on the CPU: {INTERPRETER_HINT}")
        return
    raise ValueError(f"Triton kernels run on CUDA (or the CPU under TRITON_INTERPRET=1), not on {device}")


def check_tensor(t: torch.Tensor, name: str, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    """Assert what a launcher needs of an argument: a tensor of `ndim` dims, a known dtype, unit last stride."""
    assert isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}"
    assert t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}"
    assert t.dtype in dtypes, f"{name} has dtype {t.dtype}, expected one of {dtypes}"
    assert t.shape[-1] <= 1 or t.stride(-1) == 1, f"{name} must be contiguous in its last dim, strides {t.stride()}"
    check_device(t.device)


def tile_width(n: int, minimum: int = 1) -> int:
    """The power of two that covers n (at least `minimum`): a tile's width for a row of n elements."""
    return max(minimum, triton.next_power_of_2(max(1, n)))


def rows_per_program(width: int, num_rows: int) -> int:
    """Rows one program handles for a row-wise kernel: one on a GPU up to a tile of 4096 elements, and as many
    as fill 64 Ki elements under the interpreter, whose cost is per program, not per element."""
    budget = 2**16 if is_interpreter() else 4096
    return max(1, min(tile_width(num_rows), budget // width))


def dot_options(dtype: torch.dtype) -> dict:
    """The meta-parameters for the kernels' tl.dot on tiles of this dtype: float32 exactly (no TF32 rounding),
    bf16 and fp16 on the tensor cores; under the interpreter, bf16 tiles are cast to float32 first (UPCAST),
    because Triton 3.9's interpreter reads bf16 dot operands with the wrong bit pattern."""
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",  # tf32: the default, unused for bf16
            "UPCAST": is_interpreter() and dtype == torch.bfloat16}


def scatter_to_blocks(k: torch.Tensor, v: torch.Tensor, lens: list[int], block_size: int,
                      generator: torch.Generator | None = None, spare_blocks: int = 2):
    """A paged KV cache holding packed rows k, v [sum(lens), Hkv, D] in shuffled blocks, as the engine's cache
    lays them out (slot = block * block_size + offset; unused slots zero).

    Returns (k_cache, v_cache [slots, Hkv, D], block_tables [B, M] int32, padded with block 0).
    """
    per_row = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_row) + spare_blocks
    order = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(per_row, default=1) or 1
    k_cache = k.new_zeros((num_blocks * block_size, *k.shape[1:]))
    v_cache = v.new_zeros((num_blocks * block_size, *v.shape[1:]))
    tables, first = [], 0
    for n, count in zip(lens, per_row):
        blocks, order = order[:count], order[count:]
        pos = torch.arange(n)
        slots = (torch.tensor(blocks, dtype=torch.long)[pos // block_size] * block_size + pos % block_size).to(k.device)
        k_cache[slots], v_cache[slots] = k[first:first + n], v[first:first + n]
        tables.append(blocks + [0] * (width - count))
        first += n
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32, device=k.device)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = ["Cost", "TOLERANCES", "FLOAT_DTYPES", "is_interpreter", "can_run_on", "check_device", "check_tensor",
           "tile_width", "rows_per_program", "element_size",
           "dot_options", "scatter_to_blocks"]
