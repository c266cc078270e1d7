"""Rewrites: functions over a built model, applied in order and recorded in `model.rewrites` (gpt-fast's
quantize.py and tp.py pattern). The CPU GEMM rewrites live here: the [in, out] weight layout and oneDNN's
prepacked weights for products of a few rows; quantization is `labkit.model.quantize`, tensor parallelism
`labkit.parallel.tp`. `apply_rewrites` is the policy the engine's loaders follow. Why each one pays, with the
measurements, is in docs/engine.md and data/bench_decode.json.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from labkit.model.backends import attention_backend, check_backends, kernel_backend
from labkit.model.llama import Linear, Transformer

LINEAR_LAYOUTS = ("auto", "nk", "kn")
GEMMS = ("auto", "packed", "plain")  # how fp32 and bf16 CPU linears run their products (see use_packed_gemm)
PACKED_DTYPES = (torch.float32, torch.bfloat16)  # the weight dtypes oneDNN prepacks
# fp32 products of more rows than this (long prefill chunks) run MKL's GEMM: beyond it the packed GEMM's lead over
# MKL shrinks to nothing on some CPUs (data/bench_decode.json, docs/engine.md). bf16 products of any size take the
# packed weight: torch's bf16 GEMM is oneDNN's too, reordering the weight on every call (2048 rows of SmolLM2's
# four linears: 16.3 against 17.4 ms on an AVX512-BF16 EPYC).
PACKED_MAX_ROWS = 1024


class PackedLinear(Linear):
    """A Linear that runs products of packed_min_rows to packed_max_rows rows on its oneDNN-prepacked weight (when
    it has one: copies and pickles drop the packed tensor, and then it runs as a plain Linear)."""

    packed_min_rows: int = 2  # fp32: one row stays on MKL's matrix-vector path; bf16: 1 (use_packed_gemm)
    packed_max_rows: float = PACKED_MAX_ROWS  # fp32; bf16: no limit (use_packed_gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.packed is not None and x.dim() == 2 and self.packed_min_rows <= x.shape[0] <= self.packed_max_rows \
                and not torch.compiler.is_compiling():
            xw = x if x.dtype == w.dtype else x.to(w.dtype)
            y = torch.ops.mkldnn._linear_pointwise(xw, self.packed, self.bias, "none", [], "")
            return y if y.dtype == x.dtype else y.to(x.dtype)
        return super().forward(x)


def packed_gemm_available() -> bool:
    """Whether this torch has oneDNN's prepacked fp32 linear (x86 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def use_kn_layout(model: nn.Module) -> nn.Module:
    """Rewrite: store every Linear's weight as [in, out]; returns the model.

    On CPUs where MKL's fp32 matrix-vector path for [out, in] is slow, `x @ W_kn` streams the weight faster
    (`labkit bench decode`, data/bench_decode.json). bf16 and GPU kernels want [out, in].
    """
    for module in model.modules():
        if isinstance(module, Linear) and not module.kn:
            module.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
            module.kn = True  # a tied head gets its own transposed copy; the embedding keeps [vocab, dim]
    model.rewrites.append("layout:kn")
    return model


def use_packed_gemm(model: Transformer, rows_hint: int = 64) -> Transformer:
    """Rewrite: give every fp32 or bf16 CPU Linear a oneDNN-prepacked copy of its weight for products of 2 to
    PACKED_MAX_ROWS rows (bf16: of any number of rows). Apply it after the rewrites that change weights (a
    tensor-parallel split drops it).

    MKL runs a one-row product as a matrix-vector product that streams the weight at memory speed, but a
    product of a few rows as a GEMM that repacks the weight on every call. oneDNN's prepacked GEMM grows much
    more slowly with the rows and beats MKL from 2 rows on (docs/engine.md), so one-row fp32 decode keeps MKL, and
    products of 2 to PACKED_MAX_ROWS rows (speculative verification, batched decode, prefill chunks) read the
    packed copy. In bf16 the packed product wins at one row too (vLLM's CPU build runs every bf16 linear this
    way). Costs a second copy of the linear weights. Compiled steps keep the plain path (inductor cannot lower
    the packed op).
    """
    if not packed_gemm_available():
        raise ValueError("use_packed_gemm needs a torch built with oneDNN (mkldnn) on an x86 CPU")
    if "gemm:packed" in model.rewrites:
        return model
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.device.type == "cpu" and module.weight.dtype in PACKED_DTYPES:
            w = module.weight.detach()
            module.packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous() if module.kn else w,
                                                                    rows_hint)
            module.__class__ = PackedLinear
            bf16 = w.dtype == torch.bfloat16
            module.packed_min_rows, module.packed_max_rows = (1, float("inf")) if bf16 else (2, PACKED_MAX_ROWS)
    model.rewrites.append("gemm:packed")
    return model


def with_backends(model: Transformer, attention: str | None = None, kernels: str | None = None) -> Transformer:
    """The same model with other attention and kernel backends, sharing its weights (no copy): engines that
    compare backends side by side then hold one set of weights (llama-8b in bf16 is 16 GB)."""
    attention, kernels = attention or model.attention, kernels or model.kernel_backend
    check_backends(attention, kernels)
    other = copy.copy(model)  # a new module object over the same parameter and submodule dicts
    other.attention, other.kernel_backend = attention, kernels
    other.core, other.kernels = attention_backend(attention), kernel_backend(kernels)
    other.rewrites = list(model.rewrites)
    return other


def apply_rewrites(model: Transformer, linear_layout: str = "auto", quantize: str | None = None,
                   gemm: str = "auto") -> Transformer:
    """Apply the model rewrites in order: quantization, or else the weight layout ("auto" picks [in, out] for
    fp32 weights on a CPU, where it measured faster, and [out, in] elsewhere) and then the GEMM of few-row
    products ("auto": oneDNN's prepacked copy of fp32 or bf16 CPU weights where torch has it and the copy fits in
    half the free memory, which speeds up batched decode (docs/engine.md); "plain": MKL only)."""
    if linear_layout not in LINEAR_LAYOUTS:
        raise ValueError(f"unknown linear layout {linear_layout!r}: choose auto, nk ([out, in]) or kn ([in, out])")
    if gemm not in GEMMS:
        raise ValueError(f"unknown gemm {gemm!r}: choose {', '.join(GEMMS)}")
    if quantize:
        from labkit.model.quantize import quantize as quantize_model

        return quantize_model(model, quantize)
    weight = model.embed.weight
    cpu = weight.device.type == "cpu"
    if linear_layout == "kn" or (linear_layout == "auto" and cpu and weight.dtype == torch.float32):
        model = use_kn_layout(model)
    packable = cpu and weight.dtype in PACKED_DTYPES
    if gemm == "packed" or (gemm == "auto" and packable and packed_gemm_available() and _packed_copy_fits(model)):
        model = use_packed_gemm(model)
    return model


def _packed_copy_fits(model: Transformer) -> bool:
    """Whether a second copy of the fp32 linear weights takes at most half of the memory available now."""
    try:
        import psutil
    except ImportError:  # (the GPU machine's bare python) without it, do not risk the copy
        return False
    size = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, Linear))
    return size <= psutil.virtual_memory().available // 2


__all__ = ["apply_rewrites", "use_kn_layout", "use_packed_gemm", "packed_gemm_available", "with_backends",
           "PackedLinear", "PACKED_MAX_ROWS", "PACKED_DTYPES", "LINEAR_LAYOUTS", "GEMMS"]
