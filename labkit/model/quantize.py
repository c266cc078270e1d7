"""Weight-only quantization: functions that rewrite a built model's linears (gpt-fast's quantize.py pattern).

Schemes (`QUANT_METHODS`), all applied by `quantize(model, method)` to every labkit Linear, the LM head too:
- ``int8``: symmetric, one scale per output channel; torch's `_weight_int8pack_mm` on CPU.
- ``int4-g32`` / ``int4-g64`` / ``int4-g128``: asymmetric 4-bit codes with a scale and a minimum per group of
  32 / 64 / 128 inputs, w ≈ q · scale + minimum (the form of GGUF's Q4_1); torch's `_weight_int4pack_mm_for_cpu`.
  The LM head stays int8, as in llama.cpp's 4-bit files.
- ``gguf``: the embedded GGUF file's own blocks, kept as they are (Q4_1 linears, the Q8_0 LM head: codes and
  float16 scales unchanged, no dequantize-requantize round trip) and multiplied as llama.cpp multiplies them, by
  labkit's C++ kernel (`GGUFLinear`, csrc/gguf_linear.cpp): activations quantized to int8 per block of 32, exact
  integer dot products, each row computed alone whatever the row count.

torch's int8 and int4 CPU kernels take bf16 activations and bf16 scales (their fp32 path is much slower:
docs/quantization.md), so their scales are rounded to bf16 once at load; codes are exact. The int4 kernel runs
every row count; the int8 kernel is a decode kernel, so an int8 call of 64+ rows (a prefill chunk) casts the
weight and runs a dense GEMM instead.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from labkit.model.gguf import gguf_rows, read_gguf_tensors, unpack_q4_1, unpack_q8_0
from labkit.model.llama import Linear

QUANT_METHODS = ("int8", "int4-g32", "int4-g64", "int4-g128", "gguf")
BNB_METHODS = ("bnb-int8", "bnb-nf4")  # bitsandbytes' LLM.int8() and NF4 linears: CUDA only
INT4_GROUP_SIZES = (32, 64, 128)
GGUF_BLOCK = 32  # inputs per GGUF block (Q4_1, Q8_0)
GGUF_CACHE_FORMAT = "blocks-v3"  # the converted modules' layout, in their cache file's name
# rows at or above which the int8 linear casts its weight and runs a dense GEMM instead of the packed kernel
# (the packed int8 kernel falls behind there; the int4 kernel stays ahead of dequantizing: docs/quantization.md)
DENSE_MIN_ROWS = 64
SAVE_FORMAT = "labkit-quantized-v1"


def check_method(method: str) -> str:
    if method not in QUANT_METHODS + BNB_METHODS:
        raise ValueError(f"unknown quantization {method!r}: choose one of {', '.join(QUANT_METHODS + BNB_METHODS)}")
    return method


# ---- references: plain torch, fp32 ----

def quantize_int8_ref(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: weight [N, K] -> (q int8 [N, K], scale fp32 [N])."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def quantize_int4_ref(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of `group_size` inputs: weight [N, K] (K a multiple of the group) ->
    (q uint8 codes 0..15 [N, K], scale fp32 [N, K // g], minimum fp32 [N, K // g]); w ≈ q · scale + minimum."""
    N, K = weight.shape
    if K % group_size:
        raise ValueError(f"in_features={K} is not a multiple of group_size={group_size}")
    w = weight.float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.clamp(torch.round((w - lo[..., None]) / scale[..., None]), 0, 15).to(torch.uint8)
    return q.reshape(N, K), scale, lo


def dequantize_int4_ref(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """(codes [N, K], scale [N, G], minimum [N, G]) -> fp32 weight [N, K]; the group size is K // G."""
    N, K = q.shape
    g = K // scale.shape[1]
    w = q.float().reshape(N, -1, g) * scale.float()[..., None] + minimum.float()[..., None]
    return w.reshape(N, K)


# ---- GGUF blocks dequantized (layouts in labkit.model.gguf; `gguf.quants.dequantize` is the reference) ----

def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    codes, d, m = unpack_q4_1(blocks)
    return dequantize_int4_ref(codes, d, m)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    q, d = unpack_q8_0(blocks)
    N, K = q.shape
    return (q.float().reshape(N, -1, 32) * d[..., None]).reshape(N, K)


# ---- modules ----

class _QuantLinear(nn.Module):
    """Shared parts: bias, the activation round trip, and the dense path for many rows."""

    in_features: int
    out_features: int
    dense_min_rows: int | None = None  # None: the packed kernel at every row count

    def _init_bias(self, bias: torch.Tensor | bool | None, device) -> None:
        if isinstance(bias, torch.Tensor):
            self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        elif bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device), requires_grad=False)
        else:
            self.bias = None

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] this module multiplies by, in fp32."""
        raise NotImplementedError

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        """Dequantize, then a dense GEMM in the activations' dtype."""
        return F.linear(x2, self.dequantize().to(x2.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows = self.dense_min_rows
        if x.device.type != "cpu" or (rows is not None and x2.shape[0] >= rows):
            y = self._dense(x2)  # a long prefill chunk: compute-bound, where the packed int8 kernel is slow
        else:
            y = self._matmul(x2)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightOnlyLinear(_QuantLinear):
    """y = x Wᵀ with W ≈ q · scale (int8, one scale per output channel); bias kept in fp32."""

    dense_min_rows = DENSE_MIN_ROWS

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | bool | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16, device=device))
        self._init_bias(bias, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        weight = _weight_nk(linear)
        q, scale = quantize_int8_ref(weight)
        module = cls(weight.shape[1], weight.shape[0], linear.bias, device=weight.device)
        module.weight_int8.copy_(q)
        module.scales.copy_(scale.to(torch.bfloat16))
        return module

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8, self.scales)

    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        # the scale applies per output column after the GEMM; under torch.compile the cast fuses into its load
        return F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales.to(x2.dtype)


class Int4WeightOnlyLinear(_QuantLinear):
    """y = x Wᵀ with W ≈ q · scale + minimum per group of inputs (4-bit codes), in torch's CPU int4 kernel layout.

    The kernel wants in_features a multiple of the group and out_features of 16 (here 64): other shapes are
    padded with zero weights (inputs padded with zeros), which adds nothing to the product.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int,
                 bias: torch.Tensor | bool | None = None, device=None):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size {group_size} is not one of {INT4_GROUP_SIZES}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = math.ceil(in_features / group_size) * group_size
        self.padded_out = math.ceil(out_features / 64) * 64  # the layout `unpack_int4pack` reads
        groups = self.padded_in // group_size
        self.register_buffer("weight_int4pack", torch.zeros(self.padded_out, self.padded_in // 2, dtype=torch.uint8,
                                                            device=device))
        # [G, N, 2]: (scale, zero) per group and output, the kernel's w = (q - 8) · scale + zero
        self.register_buffer("scales_and_zeros", torch.zeros(groups, self.padded_out, 2, dtype=torch.bfloat16,
                                                             device=device))
        self._init_bias(bias, device)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int,
                   bias: torch.Tensor | bool | None = None) -> "Int4WeightOnlyLinear":
        """From codes [N, K] in 0..15 and per-group scale / minimum [N, K // group_size] (w = q · scale + minimum)."""
        N, K = codes.shape
        if K % group_size or scale.shape != (N, K // group_size) or minimum.shape != scale.shape:
            raise ValueError(f"codes {tuple(codes.shape)} do not fit scales {tuple(scale.shape)} at group {group_size}")
        module = cls(K, N, group_size, bias, device=codes.device)
        Np, Kp = module.padded_out, module.padded_in
        full = torch.zeros(Np, Kp, dtype=torch.int32, device=codes.device)
        full[:N, :K] = codes.to(torch.int32)
        G = Kp // group_size
        s = torch.zeros(Np, G, device=codes.device)
        z = torch.zeros(Np, G, device=codes.device)
        s[:N, : K // group_size], z[:N, : K // group_size] = scale.float(), minimum.float()
        # padded groups keep scale 0 and zero 0: their weights are exactly zero
        zero = z + 8 * s  # q · s + m = (q - 8) · s + (m + 8 s)
        module.weight_int4pack.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(full, 1))
        module.scales_and_zeros.copy_(torch.stack((s.t(), zero.t()), dim=-1).to(torch.bfloat16))
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4WeightOnlyLinear":
        weight = _weight_nk(linear).float()
        N, K = weight.shape
        Kp = math.ceil(K / group_size) * group_size
        if Kp != K:  # quantize the zero-padded weight, then drop the padding: its groups are re-padded with zeros
            weight = F.pad(weight, (0, Kp - K))
        q, scale, minimum = quantize_int4_ref(weight, group_size)
        module = cls.from_codes(q, scale, minimum, group_size, linear.bias)
        if Kp != K:  # the padded columns carry the last group's scale: make the inputs there zero instead
            module.in_features = K
        return module

    def codes(self) -> torch.Tensor:
        """The 4-bit codes [padded_out, padded_in] back out of the kernel's layout (see `unpack_int4pack`)."""
        return unpack_int4pack(self.weight_int4pack, self.padded_out, self.padded_in)

    def dequantize(self) -> torch.Tensor:
        s, z = self.scales_and_zeros.float().unbind(-1)  # [G, Np] each
        q = self.codes().float().reshape(self.padded_out, -1, self.group_size)  # [Np, G, g]
        w = (q - 8) * s.t()[..., None] + z.t()[..., None]
        return w.reshape(self.padded_out, self.padded_in)[: self.out_features, : self.in_features]

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(torch.bfloat16)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4pack, self.group_size,
                                                       self.scales_and_zeros)
        return y if self.padded_out == self.out_features else y[:, : self.out_features]


class GGUFLinear(_QuantLinear):
    """GGUF blocks of 32 inputs as the file holds them, multiplied the way llama.cpp multiplies them.

    Q4_1 (``bits=4``): 4-bit codes q with a scale d and a minimum m per block, w = d · q + m, the codes two to a byte
    in the order the kernel unpacks them (`pack_q4`). Q8_0 (``bits=8``): signed 8-bit codes
    and a scale, w = d · q, kept as u = q + 128 with m = -128 d. d and m stay the file's float16 values.

    The product (csrc/gguf_linear.cpp, `_matmul`) quantizes each block of activations to int8 with its own scale
    (llama.cpp's q8_1), takes the block's integer dot product exactly (AVX512-VNNI where the CPU has it) and
    scales it: y = Σ d · dx · Σ(u · xq) + m · dx · Σ xq. Every row goes through the same operations whatever the
    number of rows, so a token verified beside draft tokens, or prefilled in any chunking, gets the bits it gets
    alone. Without the C++ extension, `gguf_matmul_ref` computes the same sums in torch.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, bias: torch.Tensor | bool | None = None,
                 device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"GGUF blocks of {bits}-bit codes are not supported: Q4_1 (4) or Q8_0 (8)")
        if in_features % GGUF_BLOCK:
            raise ValueError(f"in_features={in_features} is not a multiple of GGUF's block of {GGUF_BLOCK}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        blocks = in_features // GGUF_BLOCK
        self.register_buffer("packed", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("d", torch.zeros(out_features, blocks, dtype=torch.float16, device=device))
        self.register_buffer("m", torch.zeros(out_features, blocks, dtype=torch.float16, device=device))
        self._init_bias(bias, device)

    @classmethod
    def from_q4_1(cls, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                  bias: torch.Tensor | bool | None = None) -> "GGUFLinear":
        """From `gguf.unpack_q4_1`'s codes [N, K] in 0..15 and d, m [N, K // 32] (float16 values)."""
        N, K = codes.shape
        module = cls(K, N, 4, bias, device=codes.device)
        module.packed.copy_(pack_q4(codes.to(torch.uint8)))
        module.d.copy_(d.half())
        module.m.copy_(m.half())
        return module

    @classmethod
    def from_q8_0(cls, blocks: torch.Tensor, bias: torch.Tensor | bool | None = None) -> "GGUFLinear":
        """From Q8_0 rows of blocks [N, K // 32 * 34] uint8 as the file holds them."""
        q, d = unpack_q8_0(blocks)
        N, K = q.shape
        module = cls(K, N, 8, bias, device=blocks.device)
        module.packed.copy_((q.to(torch.int16) + 128).to(torch.uint8))
        module.d.copy_(d.half())
        module.m.copy_(-128 * d.half())  # exact: a power of two times a float16
        return module

    def codes(self) -> torch.Tensor:
        """The codes [out, in] as the file holds them: 0..15 for Q4_1, -128..127 for Q8_0."""
        if self.bits == 8:
            return (self.packed.to(torch.int16) - 128).to(torch.int8)
        return unpack_q4(self.packed)

    def dequantize(self) -> torch.Tensor:
        u = self.codes().float() + (128 if self.bits == 8 else 0)
        w = u.reshape(self.out_features, -1, GGUF_BLOCK) * self.d.float()[..., None] + self.m.float()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # lean on purpose: at batch 1 a decode step makes ~120 of these calls, each a few microseconds of kernel
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]))
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()
        if torch.compiler.is_compiling():  # the extension's operator, which the graph keeps whole
            if gguf_linear_available():
                return torch.ops.labkit.gguf_linear(x2, self.packed, self.d, self.m, self.bits)
        elif (kernel := _gguf_kernel()) is not None:  # eager: the extension's function, without the dispatcher
            return kernel(x2, self.packed, self.d, self.m, self.bits)
        return gguf_matmul_ref(x2, self.packed, self.d, self.m, self.bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {'Q4_1' if self.bits == 4 else 'Q8_0'}"


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (0..15) -> [N, K // 2] bytes as `GGUFLinear` keeps them: each run of four blocks (128
    inputs) as 64 bytes, byte j holding input j in its low nibble and input 64 + j in its high one (one load, a mask
    and a shift give the kernel two vectors of 64 codes in input order); the last G % 4 blocks as GGUF's 16 bytes
    (byte j: inputs j and j + 16)."""
    N, K = codes.shape
    full = K // 128 * 128
    quads = codes[:, :full].reshape(N, -1, 2, 64)
    tail = codes[:, full:].reshape(N, -1, 2, GGUF_BLOCK // 2)
    return torch.cat(((quads[:, :, 0] | (quads[:, :, 1] << 4)).reshape(N, -1),
                      (tail[:, :, 0] | (tail[:, :, 1] << 4)).reshape(N, -1)), dim=1)


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """`pack_q4`'s bytes [N, K // 2] -> codes [N, K]."""
    N, K = packed.shape[0], packed.shape[1] * 2
    full = K // 128 * 128
    quads = packed[:, : full // 2].reshape(N, -1, 64)
    tail = packed[:, full // 2:].reshape(N, -1, GGUF_BLOCK // 2)
    return torch.cat((torch.cat((quads & 0xF, quads >> 4), dim=-1).reshape(N, -1),
                      torch.cat((tail & 0xF, tail >> 4), dim=-1).reshape(N, -1)), dim=1)


def gguf_matmul_ref(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """`GGUFLinear`'s product in torch: x [M, K] -> [M, N] in x's dtype (the C++ kernel sums in another order)."""
    M, K = x.shape
    xb = x.float().reshape(M, -1, GGUF_BLOCK)
    dx = xb.abs().amax(dim=-1) / 127  # [M, G]
    xq = torch.round(xb * torch.where(dx > 0, 1 / dx, 0)[..., None])
    sx = dx * xq.sum(dim=-1)
    u = (packed if bits == 8 else unpack_q4(packed)).float().reshape(packed.shape[0], -1, GGUF_BLOCK)  # [N, G, 32]
    sums = torch.einsum("mgk,ngk->mng", xq, u)  # exact: integers below 2^24
    y = (sums * d.float()[None] * dx[:, None]).sum(-1) + sx @ m.float().t()
    return y.to(x.dtype)


def gguf_linear_available() -> bool:
    """Whether the C++ extension (labkit.model.cpu_attention) with `gguf_linear` is built here (and, for
    torch.compile, registered as the operator `torch.ops.labkit.gguf_linear`)."""
    from labkit.model import cpu_attention

    return cpu_attention.compiled_ops()


@functools.cache
def _gguf_kernel():
    from labkit.model import cpu_attention

    ops = cpu_attention.cpu_ops()
    return None if ops is None else ops.gguf_linear


def unpack_int4pack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Codes [N, K] (N a multiple of 64) from `_convert_weight_to_int4pack_for_cpu`'s layout: per block of 64
    output rows, for each input k, 32 bytes; byte i holds row i in its low nibble and row i + 32 in its high.
    (Read off torch 2.13; the tests pin it down against the kernel itself.)"""
    b = packed.reshape(N // 64, K, 32)
    rows = torch.cat((b & 0xF, b >> 4), dim=-1)  # [N/64, K, 64]
    return rows.transpose(1, 2).reshape(N, K)


class BnbLinear(nn.Module):
    """A bitsandbytes linear on CUDA: LLM.int8() (Dettmers et al. 2022, outliers above 6.0 kept in fp16) or NF4
    (Dettmers et al. 2023, bf16 compute). The weight is quantized when it moves to the GPU."""

    def __init__(self, linear: nn.Linear, method: str):
        super().__init__()
        import bitsandbytes as bnb

        weight = _weight_nk(linear).to(torch.float16)
        out_features, in_features = weight.shape
        self.in_features, self.out_features, self.method = in_features, out_features, method
        bias = linear.bias is not None
        if method == "bnb-int8":
            inner = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=6.0)
            inner.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
            self.compute_dtype = torch.float16
        else:
            inner = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.bfloat16,
                                      quant_type="nf4")
            inner.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
            self.compute_dtype = torch.bfloat16
        if bias:
            inner.bias = nn.Parameter(linear.bias.detach().cpu().to(self.compute_dtype), requires_grad=False)
        self.inner = inner.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.compute_dtype)).to(x.dtype)


QUANT_LINEARS = (Int8WeightOnlyLinear, Int4WeightOnlyLinear, GGUFLinear, BnbLinear)


def _weight_nk(linear: nn.Linear) -> torch.Tensor:
    weight = linear.weight.detach()
    return weight.t() if getattr(linear, "kn", False) else weight  # [in, out] layout back to [out, in]


# ---- the rewrite ----

def quantize(model: nn.Module, method: str = "int8", gguf_path: str | Path | None = None) -> nn.Module:
    """Replace every labkit Linear (the LM head too) with its quantized form, in place; returns the model.

    `gguf` reads the blocks of `gguf_path` (default: the embedded model's file), which must hold this model's
    weights; the other methods quantize the model's own weights.
    """
    check_method(method)
    device = next(model.parameters()).device
    if method in BNB_METHODS:
        if device.type != "cuda":
            raise ValueError(f"quantization {method!r} runs bitsandbytes' CUDA kernels; the model is on {device}")
    elif method != "int8" and device.type != "cpu":
        raise ValueError(f"quantization {method!r} runs on a CPU kernel (torch's int4, or labkit's GGUF blocks); the "
                         f"model is on {device} "
                         "(on a GPU use int8 here, or bitsandbytes)")
    if any(isinstance(m, QUANT_LINEARS) for m in model.modules()):
        raise ValueError("the model is already quantized: quantize a model built from fp32 or bf16 weights")
    if method == "gguf":
        _load_gguf_linears(model, gguf_path)
    else:
        head = getattr(model, "lm_head", None)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear):
                    # int4 keeps the LM head at int8, as llama.cpp's 4-bit files keep it at 6-8 bits: its error
                    # lands on the logits directly (at 4 bits it cost most of int4-g32's logit error here)
                    scheme = "int8" if child is head and method.startswith("int4") else method
                    setattr(parent, name, _quantize_linear(child, scheme))
    if hasattr(model, "rewrites"):
        model.rewrites.append(f"quant:{method}")
    return model


def _quantize_linear(linear: Linear, method: str) -> nn.Module:
    if method in BNB_METHODS:
        return BnbLinear(linear, method)
    if method == "int8":
        return Int8WeightOnlyLinear.from_linear(linear)
    return Int4WeightOnlyLinear.from_linear(linear, int(method.split("-g")[1]))


def _load_gguf_linears(model: nn.Module, gguf_path: str | Path | None) -> None:
    """Swap the model's linears for the GGUF file's blocks. The converted modules are cached next to the
    converted fp32 weights (keyed by the file's name, size and mtime): parsing the file's tokenizer fields alone
    takes seconds, loading the cache a fraction of one."""
    from labkit.model.loader import cache_dir, embedded_gguf_path

    path = Path(gguf_path) if gguf_path is not None else embedded_gguf_path()
    stat = path.stat()
    args = model.args
    shape = f"{args.num_layers}x{args.dim}x{args.hidden_dim}x{args.vocab_size}"
    cached = cache_dir() / "gguf-linears" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-{shape}-{GGUF_CACHE_FORMAT}.pt"
    if cached.exists():
        state = torch.load(cached, weights_only=True)
        for name, tensors in state.items():
            module = _gguf_module_for(model, name)
            module.load_state_dict(tensors)
            _set_submodule(model, name, module)
        return
    converted = _convert_gguf_linears(model, path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    torch.save({name: module.state_dict() for name, module in converted.items()}, tmp)
    tmp.replace(cached)


def _gguf_module_for(model: nn.Module, name: str) -> nn.Module:
    linear = model.get_submodule(name)
    return GGUFLinear(linear.in_features, linear.out_features, 8 if name == "lm_head" else 4,
                      linear.bias is not None)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _convert_gguf_linears(model: nn.Module, path: Path) -> dict[str, nn.Module]:
    tensors = read_gguf_tensors(path)
    args = model.args
    D, H, Hkv, hd = args.dim, args.num_heads, args.num_kv_heads, args.head_dim

    def q4_1(linear: nn.Module, parts: list[tuple[str, int, int | None]]) -> GGUFLinear:
        """One (fused) linear from GGUF tensors (name, rows, heads to un-permute) stacked along the outputs."""
        rows = []
        for name, n, heads in parts:
            t = tensors.get(name)
            if t is None:
                raise ValueError(f"{path.name} has no tensor {name}: it does not hold this model's weights")
            if t.tensor_type.name != "Q4_1":
                raise ValueError(f"GGUF tensor {name} is {t.tensor_type.name}; the gguf scheme reads Q4_1 linears")
            rows.append(gguf_rows(t, (n, linear.in_features), heads))
        codes, d, m = unpack_q4_1(torch.cat(rows))
        return GGUFLinear.from_q4_1(codes, d, m, linear.bias)

    converted = {}
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        attn, mlp = layer.attn, layer.mlp
        converted[f"layers.{i}.attn.wqkv"] = q4_1(attn.wqkv, [
            (p + "attn_q.weight", H * hd, H), (p + "attn_k.weight", Hkv * hd, Hkv), (p + "attn_v.weight", Hkv * hd, None)])
        converted[f"layers.{i}.attn.wo"] = q4_1(attn.wo, [(p + "attn_output.weight", D, None)])
        converted[f"layers.{i}.mlp.w_gate_up"] = q4_1(mlp.w_gate_up, [
            (p + "ffn_gate.weight", args.hidden_dim, None), (p + "ffn_up.weight", args.hidden_dim, None)])
        converted[f"layers.{i}.mlp.w_down"] = q4_1(mlp.w_down, [(p + "ffn_down.weight", D, None)])
    head = tensors.get("output.weight") or tensors["token_embd.weight"]  # tied models store the embedding only
    if head.tensor_type.name != "Q8_0":
        raise ValueError(f"GGUF tensor {head.name} is {head.tensor_type.name}; the gguf scheme reads a Q8_0 head")
    converted["lm_head"] = GGUFLinear.from_q8_0(gguf_rows(head, (args.vocab_size, D)))
    for name, module in converted.items():
        _set_submodule(model, name, module)
    return converted


# ---- saving and loading a quantized model ----

def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write a quantized labkit Transformer (its args, rewrites and every tensor) to one file, atomically."""
    method = next((r.split(":", 1)[1] for r in getattr(model, "rewrites", []) if r.startswith("quant:")), None)
    if method is None:
        raise ValueError("the model is not quantized: apply labkit.model.quantize.quantize first")
    path = Path(path)
    args = {k: v for k, v in vars(model.args).items()}
    payload = {"format": SAVE_FORMAT, "method": method, "args": args, "act_dtype": str(model.act_dtype),
               "rewrites": list(model.rewrites), "state_dict": model.state_dict()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_quantized(path: str | Path, attention: str = "sdpa", kernels: str = "torch", device="cpu") -> nn.Module:
    """Rebuild a model written by `save_quantized`: the same modules, filled with the saved tensors."""
    from labkit.model.llama import ModelArgs, Transformer

    payload = torch.load(Path(path), map_location=device, weights_only=True)
    if payload.get("format") != SAVE_FORMAT:
        raise ValueError(f"{path} is not a labkit quantized model (format {payload.get('format')!r})")
    state = payload["state_dict"]
    method = check_method(payload["method"])
    group_size = 32 if method == "gguf" else int(method.split("-g")[1]) if method.startswith("int4") else None
    args = ModelArgs(**payload["args"])
    act_dtype = getattr(torch, payload["act_dtype"].removeprefix("torch."))
    model = Transformer(args, attention=attention, kernels=kernels, act_dtype=act_dtype)
    for name, child in list(model.named_modules()):  # the saved modules' shapes, empty; load_state_dict fills them
        if isinstance(child, Linear):
            _set_submodule(model, name, _empty_like_saved(child, name, state, group_size))
    model.load_state_dict(state, strict=True)
    model.rewrites = list(payload["rewrites"])
    return model.to(device).eval().requires_grad_(False)


def _empty_like_saved(linear: Linear, prefix: str, state: dict, group_size: int | None) -> nn.Module:
    bias = linear.bias is not None
    if f"{prefix}.weight_int8" in state:
        return Int8WeightOnlyLinear(linear.in_features, linear.out_features, bias)
    if f"{prefix}.packed" in state:
        bits = 8 * state[f"{prefix}.packed"].shape[1] // linear.in_features
        return GGUFLinear(linear.in_features, linear.out_features, bits, bias)
    if f"{prefix}.weight_int4pack" in state and group_size:
        return Int4WeightOnlyLinear(linear.in_features, linear.out_features, group_size, bias)
    raise ValueError(f"the saved model has no quantized weight for {prefix}")
