"""The Triton kernels as the model's backends: kernel backend "triton" (norms, RoPE, SwiGLU) and attention
backend "triton" (flash attention for prefill, split-K decode attention), both reading the engine's paged cache
in place. Chosen by name: `from_hf(..., kernels="triton", attention="triton")` (see docs/engine.md). The model
imports this module when it first asks for a "triton" backend (`labkit.model.backends`); nothing here imports
the model.
"""

from __future__ import annotations

import torch

from labkit.kernels.decode_attention import decode_attention
from labkit.kernels.flash_attention import flash_attention_paged
from labkit.kernels.rms_norm import rms_norm
from labkit.kernels.rope import rope
from labkit.kernels.swiglu import swiglu


class TritonKernels:
    """The elementwise kernels of labkit.model.backends.TorchKernels, each one Triton launch."""

    name = "triton"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)[0]

    @staticmethod
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, total = rms_norm(x, weight, eps, residual=residual)
        return out, total

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """In place on x [N, H, D] (q and k heads of the fused qkv); cos [N, 1, D], sin [N, 1, D] with its first
        half negated, as the model builds them for the torch path: the kernel takes their halves as views."""
        half = x.shape[-1] // 2
        rope(x, None, cos[:, 0, :half], sin[:, 0, half:])
        return x

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate_up)


class TritonAttention:
    """Attention over the paged cache with the blocks read in place: a step whose rows all have one new token
    runs the split-K decode kernel, any other (prefill, chunks, mixed) the paged flash-attention kernel."""

    name = "triton"

    @staticmethod
    def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
        """q [N, H, D] of the step's new tokens (their k, v already in the cache) -> [N, H, D]. meta: the model's
        AttentionMetadata (block_tables, context_lens, query_start, block_size, groups), passed in by the model."""
        if meta.groups is None or all(g.query_len == 1 for g in meta.groups):  # one new token per row
            return decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.block_size, scale)
        max_query = max(g.query_len for g in meta.groups)
        return flash_attention_paged(q, k_cache, v_cache, meta.block_tables, meta.query_start, meta.context_lens,
                                     max_query, meta.block_size, scale)


TRITON_ATTENTION = TritonAttention()

__all__ = ["TritonKernels", "TritonAttention", "TRITON_ATTENTION"]
