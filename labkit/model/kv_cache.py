"""The paged KV cache: per-layer K/V slot tensors, the int8 form, and the write of a step's new K/V.

Each new token's K and V go to a cache slot named by the step's slot mapping (block * block_size + offset);
attention (`labkit.model.attention`) reads a row's context back through its block table (Kwon et al. 2023,
"PagedAttention"). An int8 cache (`Int8KV`) is quantized as it is written and dequantized as it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labkit.model import cpu_attention


@dataclass(eq=False)
class Int8KV:
    """One layer's K or V cache in int8: x[slot, head] ~= codes[slot, head] * scale[slot, head].

    Symmetric absmax quantization over head_dim, one float32 scale per (slot, KV head): per-token quantization,
    the simple scheme that fits a paged cache written one token at a time (KIVI, Liu et al. 2024, quantizes keys
    per channel instead, for their outlier channels, at 2 bits). Dequantized on read by the torch attention path;
    a float cache's layers stay plain tensors, so its path does not change.
    """

    codes: torch.Tensor  # [slots, Hkv, D] int8
    scale: torch.Tensor  # [slots, Hkv, 1] float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes [..., D], float32 scale [..., 1]); each element is off by at most absmax / 254."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127  # an all-zero head stays zero
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D] int8 and scale [..., 1] float32 -> [..., D] in dtype (the product taken in float32)."""
    out = codes.float() * scale
    return out if out.dtype == dtype else out.to(dtype)


class KVCache:
    """Paged K/V storage: per layer, k[i] and v[i] are [(num_blocks + 1) * block_size, num_kv_heads, head_dim].

    Slot `b * block_size + j` is offset j of block b. Each layer is stored heads-major, [Hkv, slots, D] in memory
    (vLLM's CPU cache keeps a head's slots together too), and k[i] is that storage seen as [slots, Hkv, D]: one
    block of one head is one contiguous run, which the C++ decode kernel reads in place and the torch path gathers
    whole, batching its products over (KV head, row) with no further copy (a [slots, Hkv, D] layout cost a
    transposing copy of every gathered key and value). The last block is scratch: padding rows of a static
    decode step write there, and no block table points at it. Each layer's tensors are separate and never move:
    inductor then updates them in place (a view of one big tensor would be copied whole at every step), and a
    captured CUDA graph can keep their addresses. dtype torch.int8 stores each layer as an `Int8KV` (int8
    codes and a float32 scale per slot and KV head) instead of a tensor.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device, dtype: torch.dtype):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        slots = (num_blocks + 1) * block_size

        def heads_major(last: int, dtype: torch.dtype) -> torch.Tensor:  # [slots, Hkv, last] over [Hkv, slots, last]
            return torch.zeros((num_kv_heads, slots, last), device=device, dtype=dtype).transpose(0, 1)

        if dtype == torch.int8:
            def layer():
                return Int8KV(heads_major(head_dim, torch.int8), heads_major(1, torch.float32))
        else:
            def layer():
                return heads_major(head_dim, dtype)
        self.k = [layer() for _ in range(num_layers)]
        self.v = [layer() for _ in range(num_layers)]
        if torch.device(device).type == "cuda":  # CUDA graph trees may then capture steps that write them
            for t in self._tensors():
                torch._dynamo.mark_static_address(t)
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers, K and V; for int8, the codes and the float32 scales."""
        per_head = head_dim * torch.empty((), dtype=dtype).element_size() + (4 if dtype == torch.int8 else 0)
        return 2 * num_layers * block_size * num_kv_heads * per_head

    @property
    def scratch_slot(self) -> int:
        return self.num_blocks * self.block_size

    def _tensors(self) -> list[torch.Tensor]:
        layers = (*self.k, *self.v)
        return [t for x in layers for t in ((x.codes, x.scale) if isinstance(x, Int8KV) else (x,))]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors())


def write_kv(k_cache: torch.Tensor | Int8KV, v_cache: torch.Tensor | Int8KV, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k, v [N, Hkv, D] into one layer's cache [slots, Hkv, D] (index_copy_: in place, graph-safe); an
    Int8KV cache gets their int8 codes and scales."""
    if isinstance(k_cache, Int8KV):
        for cache, x in ((k_cache, k), (v_cache, v)):
            codes, scale = quantize_kv(x)
            cache.codes.index_copy_(0, slot_mapping, codes)
            cache.scale.index_copy_(0, slot_mapping, scale)
        return
    if cpu_attention.writes_kv(k, k_cache, slot_mapping):
        # a heads-major bf16 cache on a CPU: one C++ pass writes both (index_copy_ on the transposed view is slow)
        cpu_attention.cpu_ops().write_kv(k_cache.transpose(0, 1), v_cache.transpose(0, 1), k, v, slot_mapping)
        return
    k_cache.index_copy_(0, slot_mapping, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v if v.dtype == v_cache.dtype else v.to(v_cache.dtype))


__all__ = ["KVCache", "Int8KV", "quantize_kv", "dequantize_kv", "write_kv"]
