"""Weight-only quantization: functions that rewrite a built model's linears (gpt-fast's quantize.py pattern).

int8, symmetric, one scale per output channel: decode reads a quarter of the fp32 weight bytes. Activations
stay in the model's activation dtype; on CPU the matmul runs in torch's `_weight_int8pack_mm` kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit.llama import Linear

QUANT_METHODS = ("int8",)


def quantize_int8_ref(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: weight [N, K] -> (q int8 [N, K], scale fp32 [N])."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


class Int8WeightOnlyLinear(nn.Module):
    """y = x Wᵀ with W ≈ q · scale (int8 per output channel); bias kept in float."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        if getattr(linear, "kn", False):  # stored [in, out]: back to [out, in]
            weight = weight.t()
        q, scale = quantize_int8_ref(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_int8", q.contiguous())
        # the CPU kernel wants bf16 activations and scales; elsewhere the scales follow the activations
        self.register_buffer("scales", scale.to(torch.bfloat16 if q.device.type == "cpu" else weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8, self.scales)
        else:  # dequantize in the matmul's dtype; under torch.compile this fuses into the GEMM's load
            y = F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales.to(x2.dtype)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)


def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every labkit Linear (the LM head too) with its quantized form, in place; returns the model."""
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization {method!r}: choose one of {', '.join(QUANT_METHODS)}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, Int8WeightOnlyLinear(child))
    if hasattr(model, "rewrites"):
        model.rewrites.append(f"quant:{method}")
    return model
