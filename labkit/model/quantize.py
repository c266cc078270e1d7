"""Weight-only quantization: functions that rewrite a built model's linears (gpt-fast's quantize.py pattern).

Schemes (`QUANT_METHODS`), all applied by `quantize(model, method)` to every labkit Linear, the LM head too:
- ``int8``: symmetric, one scale per output channel; torch's `_weight_int8pack_mm` on CPU.
- ``int4-g32`` / ``int4-g64`` / ``int4-g128``: asymmetric 4-bit codes with a scale and a minimum per group of
  32 / 64 / 128 inputs, w ≈ q · scale + minimum (the form of GGUF's Q4_1); torch's `_weight_int4pack_mm_for_cpu`.
  The LM head stays int8, as in llama.cpp's 4-bit files.
- ``gguf``: the embedded GGUF file's own blocks, kept as they are (Q4_1 linears, the Q8_0 LM head: codes and
  float16 scales unchanged, no dequantize-requantize round trip) and multiplied as llama.cpp multiplies them, by
  labkit's C++ kernel (`labkit.model.gguf_linear.GGUFLinear`, csrc/gguf_linear.cpp): activations quantized to int8 per block of 32, exact
  integer dot products, each row computed alone whatever the row count.

torch's int8 and int4 CPU kernels take bf16 activations and bf16 scales (their fp32 path is much slower:
docs/quantization.md), so their scales are rounded to bf16 once at load; codes are exact. The int4 kernel runs
every row count; the int8 kernel is a decode kernel, so an int8 call of 64+ rows (a prefill chunk) casts the
weight and runs a dense GEMM instead.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from labkit.model.gguf import unpack_q4_1, unpack_q8_0
from labkit.model.gguf_linear import GGUFLinear, load_gguf_linears
from labkit.model.quant_linear import QuantLinear
from labkit.model.llama import Linear

QUANT_METHODS = ("int8", "int4-g32", "int4-g64", "int4-g128", "gguf")
BNB_METHODS = ("bnb-int8", "bnb-nf4")  # bitsandbytes' LLM.int8() and NF4 linears: CUDA only
INT4_GROUP_SIZES = (32, 64, 128)
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

class Int8WeightOnlyLinear(QuantLinear):
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


class Int4WeightOnlyLinear(QuantLinear):
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


QUANT_LINEARS = (QuantLinear, BnbLinear)


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
        load_gguf_linears(model, gguf_path)
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
            model.set_submodule(name, _empty_like_saved(child, name, state, group_size))
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
