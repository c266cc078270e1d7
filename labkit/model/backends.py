"""The model's pluggable backends, chosen by name at construction: attention ("sdpa", "math", "triton") and
elementwise kernels ("torch", "triton").

The torch ones live here and in `labkit.model.attention`; the Triton ones in `labkit.kernels.backend`, imported
the first time a model asks for them (Triton is heavy to import). The kernels package sits below the model and
imports nothing from it: the model reaches down, never the other way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labkit.checks import check_choice
from labkit.model import cpu_attention
from labkit.model.attention import math_core, sdpa_core

ATTENTION_BACKENDS = ("sdpa", "math", "triton")
KERNEL_BACKENDS = ("torch", "triton")


def _like(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A norm's weight in the activations' dtype (a no-op .to still costs microseconds per call)."""
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)


class TorchKernels:
    """The elementwise kernels in plain torch; the Triton backend (labkit.kernels.backend) has the same methods."""

    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # one fused op; in fp32 bit-identical to HF's LlamaRMSNorm formula
        weight = _like(weight, x)
        if cpu_attention.takes_rows(x):  # bf16 rows on a CPU: one C++ pass (labkit.model.cpu_attention)
            return cpu_attention.cpu_ops().rms_norm(x, weight, eps)
        if cpu_attention.compiles_rows(x):  # the same pass inside a compiled step
            return torch.ops.labkit.rms_norm(x, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + x), residual + x): a sublayer's output joins the residual stream, then the norm."""
        if cpu_attention.takes_rows(x) and cpu_attention.takes_rows(residual):
            return cpu_attention.cpu_ops().add_rms_norm(x, residual, _like(weight, x), eps)
        if cpu_attention.compiles_rows(x) and cpu_attention.compiles_rows(residual):
            return torch.ops.labkit.add_rms_norm(x, residual, _like(weight, x), eps)
        total = residual + x
        return TorchKernels.rms_norm(total, weight, eps), total

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on x [N, H, D]; cos [N, 1, D], sin [N, 1, D] with its first half negated.

        rotate_half(x) * sin == roll(x, D/2) * [-sin1, sin2], bit for bit, in one op fewer. bfloat16 on a CPU: one
        C++ pass with the same three roundings (four torch ops and a copy took ~1 % of a 2048-token prefill).
        """
        if cpu_attention.takes_rope(x, cos, sin):
            return cpu_attention.cpu_ops().rope(x, cos, sin)
        if cpu_attention.compiles_rope(x, cos, sin):
            return torch.ops.labkit.rope(x, cos, sin)
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        if cpu_attention.takes_rows(gate_up):
            return cpu_attention.cpu_ops().silu_mul(gate_up)
        if cpu_attention.compiles_rows(gate_up):
            return torch.ops.labkit.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def check_backends(attention: str, kernels: str) -> None:
    """One-line errors for backend names the model does not know."""
    check_choice("attention backend", attention, ATTENTION_BACKENDS)
    check_choice("kernel backend", kernels, KERNEL_BACKENDS)


def attention_backend(name: str):
    """The attention core of a backend name: a dense core (sdpa_core, math_core) or an object whose
    `paged_attention` reads the cache blocks in place (see `labkit.model.attention.paged_attention`)."""
    check_choice("attention backend", name, ATTENTION_BACKENDS)
    if name == "triton":
        from labkit.kernels.backend import TRITON_ATTENTION

        return TRITON_ATTENTION
    return sdpa_core if name == "sdpa" else math_core


def kernel_backend(name: str):
    """The elementwise kernels (rms_norm, add_rms_norm, rope, silu_mul) of a backend name."""
    check_choice("kernel backend", name, KERNEL_BACKENDS)
    if name == "triton":
        from labkit.kernels.backend import TritonKernels

        return TritonKernels
    return TorchKernels


__all__ = ["ATTENTION_BACKENDS", "KERNEL_BACKENDS", "TorchKernels", "attention_backend", "kernel_backend",
           "check_backends"]
