"""Reading a GGUF file (llama.cpp's format) and ggml's block layouts, as the `gguf` quantization scheme reads them.

`read_gguf_tensors(path)` gives the file's tensors by name; `gguf_rows(tensor, (N, K))` one tensor's block rows
as uint8 [N, bytes]; `unpack_q4_1` and `unpack_q8_0` split those rows into codes and scales, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch


def read_gguf_tensors(path: str | Path) -> dict:
    """A GGUF file's tensors by name (gguf's ReaderTensor: name, shape, tensor_type, data)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}


def gguf_rows(tensor, expected: tuple[int, int], permute_heads: int | None = None) -> torch.Tensor:
    """A GGUF tensor's block rows as uint8 [N, bytes]; q and k rows back from llama.cpp's RoPE permutation."""
    N, K = expected
    if tuple(int(n) for n in tensor.shape) != (K, N):  # ggml lists the input dimension first
        raise ValueError(f"GGUF tensor {tensor.name} has shape {list(tensor.shape)}; the model expects [{K}, {N}]")
    rows = torch.from_numpy(tensor.data.copy()).reshape(N, -1)
    if permute_heads:  # undo convert_hf_to_gguf's permute (rows only: each row's blocks stay whole)
        half = N // permute_heads // 2
        rows = rows.reshape(permute_heads, half, 2, -1).transpose(1, 2).reshape(N, -1)
    return rows


def unpack_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 rows of blocks [N, K // 32 * 20] uint8 -> (codes uint8 [N, K], d fp32 [N, K // 32], m fp32 [N, K // 32]).

    A block is d (fp16), m (fp16), then 16 bytes: byte j holds element j in its low nibble and j + 16 in its high.
    """
    b = blocks.reshape(blocks.shape[0], -1, 20)  # [N, G, 20]
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    m = b[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    qs = b[..., 4:]
    codes = torch.cat((qs & 0xF, qs >> 4), dim=-1)  # [N, G, 32]
    return codes.reshape(b.shape[0], -1), d, m


def unpack_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows of blocks [N, K // 32 * 34] uint8 -> (codes int8 [N, K], d fp32 [N, K // 32]): w = d · q."""
    b = blocks.reshape(blocks.shape[0], -1, 34)
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    q = b[..., 2:].contiguous().view(torch.int8)
    return q.reshape(b.shape[0], -1), d


__all__ = ["read_gguf_tensors", "gguf_rows", "unpack_q4_1", "unpack_q8_0"]
