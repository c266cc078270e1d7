"""The base of the quantized linears (labkit.model.quantize, labkit.model.gguf_linear): bias, the activation round
trip, and the dense path for many rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantLinear(nn.Module):
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


__all__ = ["QuantLinear"]
