"""Paged decode attention for the CPU that reads the KV cache's blocks in place: a small C++ extension
(csrc/paged_decode.cpp), built by torch on first use and cached (TORCH_EXTENSIONS_DIR).

The torch path (`labkit.model.attention`) gathers every decode row's context into a new tensor before two batched
matmuls: at 48 rows of 300 tokens that gather and the matmuls cost more than the step's linears. The extension
walks each row's block table instead, one (row, KV head) pair per task, scores, softmax and the weighted sum in
float32, as vLLM's CPU paged attention does. It serves one-token rows over a bfloat16 cache; the float32 path
stays torch's (its outputs are what the greedy-identity tests compare with HF). Where no C++ compiler or ninja is
found, `paged_decode_op()` is None and the torch path serves everything.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("labkit.model")
SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
DISABLE_ENV = "LABKIT_CPU_ATTENTION"  # "torch": never build or use the extension


@functools.cache
def paged_decode_op():
    """The extension's `paged_decode(q [B, H, D], k_heads, v_heads [Hkv, slots, D], block_tables [B, M] int64,
    context_lens [B] int64, block_size, scale) -> [B, H, D]`, or None where it cannot be built."""
    if os.environ.get(DISABLE_ENV, "").lower() == "torch":
        return None
    try:
        from torch.utils.cpp_extension import load

        module = load(name="labkit_paged_decode", sources=[str(SOURCE)],
                      extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"], extra_ldflags=["-fopenmp"],
                      verbose=False)
    except Exception as exc:  # no compiler, no ninja, an unsupported platform: the torch path serves
        logger.warning("the CPU paged-attention extension is not available (%s); attention gathers the cache "
                       "instead", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return module.paged_decode


def serves(q: torch.Tensor, k_cache) -> bool:
    """Whether the extension takes these one-token rows: a CPU bfloat16 cache stored heads-major (a KVCache layer)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and isinstance(k_cache, torch.Tensor)
            and k_cache.dtype == torch.bfloat16 and k_cache.transpose(0, 1).is_contiguous()
            and paged_decode_op() is not None)


__all__ = ["paged_decode_op", "serves", "SOURCE", "DISABLE_ENV"]
