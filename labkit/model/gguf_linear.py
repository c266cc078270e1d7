"""The `gguf` quantization scheme: the embedded GGUF file's blocks as linears (`GGUFLinear`), multiplied by
labkit's C++ kernel (csrc/gguf_linear.cpp) the way llama.cpp multiplies them, and the rewrite that loads them
into a model (`load_gguf_linears`, called by `labkit.model.quantize.quantize(model, "gguf")`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from labkit.model.gguf import gguf_rows, read_gguf_tensors, unpack_q4_1, unpack_q8_0
from labkit.model.quant_linear import QuantLinear

GGUF_BLOCK = 32  # inputs per GGUF block (Q4_1, Q8_0)
GGUF_CACHE_FORMAT = "blocks-v3"  # the converted modules' layout, in their cache file's name


class GGUFLinear(QuantLinear):
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


def load_gguf_linears(model: nn.Module, gguf_path: str | Path | None) -> None:
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
            model.set_submodule(name, module)
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
        model.set_submodule(name, module)
    return converted


__all__ = ["GGUFLinear", "load_gguf_linears", "pack_q4", "unpack_q4", "gguf_matmul_ref", "gguf_linear_available",
           "GGUF_BLOCK", "GGUF_CACHE_FORMAT"]
