"""A compact Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2): architecture only.

RMSNorm, RoPE with the config's theta and scaling, grouped-query attention, SwiGLU, tied or untied LM head.
The KV cache, the attention backend and the elementwise kernels are passed in, so speculative decoding,
batching, Triton kernels, tensor parallelism and quantization plug in without a second model (gpt-fast's
model.py and nano-vllm's models/qwen3.py are the pattern).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class UnsupportedArchitecture(ValueError):
    """The labkit engine cannot run this model; the HF engine can."""


@dataclass
class ModelArgs:
    """The shape of a Llama-family model, read from an HF config."""

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    max_seq_len: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    inv_freq: torch.Tensor | None = field(default=None, repr=False)  # [head_dim // 2]
    rope_scale: float = 1.0  # the "attention factor" some RoPE scalings apply to cos/sin

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_hf(cls, config) -> "ModelArgs":
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"the labkit engine does not support model_type {model_type!r} (supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}); use the HF engine instead (--engine hf)")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"hidden_act {config.hidden_act!r} is not SwiGLU; use --engine hf")
        if getattr(config, "mlp_bias", False):
            raise UnsupportedArchitecture("mlp_bias=True is not supported; use --engine hf")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq, rope_scale = rope_frequencies(config, head_dim)
        window = getattr(config, "sliding_window", None)
        if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            hidden_dim=config.intermediate_size,
            norm_eps=config.rms_norm_eps,
            max_seq_len=config.max_position_embeddings,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            sliding_window=window,
            inv_freq=inv_freq,
            rope_scale=rope_scale,
        )


def rope_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies and attention factor for the config's rope type (Su et al. 2021)."""
    params = getattr(config, "rope_parameters", None)
    if not params:  # transformers < 5 keeps theta and scaling apart
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = float(params["rope_theta"])
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":
        raise UnsupportedArchitecture("dynamic RoPE scaling changes with length; use --engine hf")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedArchitecture(f"rope_type {rope_type!r} is not supported; use --engine hf")
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(factor)


@dataclass
class AttentionMetadata:
    """Where the new tokens go and what they may see; built once per forward, shared by all layers."""

    rows: torch.Tensor  # [B] cache row of each batch row
    positions: torch.Tensor  # [B, T] position of each new token
    kv_len: int  # attend over cache positions [0, kv_len)
    mask: torch.Tensor | None = None  # [B, 1, T, kv_len] bool, True = visible; None = see all kv_len
    is_causal: bool = False  # plain causal prefill from position 0 (T == kv_len)
    row_slice: slice | None = None  # the same rows as a slice when contiguous: reads need no gather
    write_start: int | None = None  # every row writes positions [write_start, write_start + T): a plain copy


def visible_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, 1, T, kv_len] bool: a token at position p sees cache positions 0..p (causal, per row)."""
    keys = torch.arange(kv_len, device=positions.device)
    return keys[None, None, None, :] <= positions[:, None, :, None]


class KVCache:
    """A static, preallocated key/value cache: [layers, rows, kv_heads, max_seq_len, head_dim]."""

    def __init__(self, args: ModelArgs, max_batch_size: int, max_seq_len: int, device, dtype):
        if max_seq_len > args.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context of {args.max_seq_len}")
        shape = (args.num_layers, max_batch_size, args.num_kv_heads, max_seq_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """Write k, v [B, T, Hkv, D] at their positions; return this layer's cache views [R, Hkv, S, D]."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        if meta.write_start is not None and meta.row_slice is not None:
            span = slice(meta.write_start, meta.write_start + k.shape[1])
            k_cache[meta.row_slice, :, span] = k.transpose(1, 2)  # [B, Hkv, T, D]
            v_cache[meta.row_slice, :, span] = v.transpose(1, 2)
            return k_cache, v_cache
        rows = meta.rows[:, None]  # [B, 1] broadcasts against positions [B, T]
        k_cache[rows, :, meta.positions] = k  # advanced indices around a slice: value is [B, T, Hkv, D]
        v_cache[rows, :, meta.positions] = v
        return k_cache, v_cache


class TorchKernels:
    """The elementwise kernels in plain torch; a Triton backend provides the same three methods."""

    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # one fused op; in fp32 bit-identical to HF's LlamaRMSNorm formula
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on x [B, T, H, D]; cos [B, T, 1, D], sin [B, T, 1, D] with its first half negated.

        rotate_half(x) * sin == roll(x, D/2) * [-sin1, sin2], bit for bit, in one op fewer.
        """
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def sdpa_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """torch SDPA over the first kv_len cache positions; q [B, H, T, D] -> [B, H, T, D]."""
    rows = meta.row_slice if meta.row_slice is not None else meta.rows
    k = k_cache[rows, :, : meta.kv_len]  # [B, Hkv, S, D]
    v = v_cache[rows, :, : meta.kv_len]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=meta.mask, is_causal=meta.is_causal,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def math_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention as matmul, masked softmax, matmul: under torch.compile it fuses into a few small loops."""
    rows = meta.row_slice if meta.row_slice is not None else meta.rows
    k = k_cache[rows, :, : meta.kv_len]  # [B, Hkv, S, D]
    v = v_cache[rows, :, : meta.kv_len]
    B, H, T, D = q.shape
    group = H // k.shape[1]
    qg = q.reshape(B, k.shape[1], group * T, D)  # query heads of one KV head side by side: [B, Hkv, G*T, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, Hkv, G*T, S]
    mask = meta.mask
    if mask is None and meta.is_causal:
        mask = torch.ones(T, meta.kv_len, dtype=torch.bool, device=q.device).tril(meta.kv_len - T)
    if mask is not None:  # [B, 1, T, S] -> the grouped layout [B, 1, G*T, S]
        mask = mask.expand(B, 1, T, meta.kv_len).repeat(1, 1, group, 1) if mask.dim() == 4 else mask.repeat(group, 1)
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), v)  # [B, Hkv, G*T, D]
    return out.reshape(B, H, T, D)


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "math": math_attention}
KERNEL_BACKENDS = {"torch": TorchKernels}


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in another dtype (bf16 storage, fp32 activations) or transposed.

    `kn` stores the weight as [in, out]: on CPUs where MKL's matrix-vector path for [out, in] is slow
    (AVX2 EPYC here), `x @ W_kn` streams the weight about 1.3x faster.
    """

    kn: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        xw = x.to(w.dtype)
        y = torch.matmul(xw, w) if self.kn else F.linear(xw, w)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def to_kn(self) -> None:
        if not self.kn:
            self.weight = nn.Parameter(self.weight.detach().t().contiguous(), requires_grad=False)
            self.kn = True


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        # q, k and v in one matrix: one weight read per step instead of three.
        self.wqkv = Linear(args.dim, (args.num_heads + 2 * args.num_kv_heads) * args.head_dim, bias=args.qkv_bias)
        self.wo = Linear(args.num_heads * args.head_dim, args.dim, bias=False)
        self.scale = args.head_dim**-0.5

    def forward(self, x, cos, sin, layer, cache: KVCache, meta: AttentionMetadata, kernels, attend):
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk = kernels.rope(qkv[:, :, : self.num_heads + self.num_kv_heads], cos, sin)  # [B, T, H+Hkv, D]
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=2)
        v = qkv[:, :, self.num_heads + self.num_kv_heads :]
        k_cache, v_cache = cache.update(layer, k, v, meta)
        out = attend(q.transpose(1, 2), k_cache, v_cache, meta, self.scale)  # [B, H, T, D]
        return self.wo(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w_gate_up = Linear(args.dim, 2 * args.hidden_dim, bias=False)  # gate and up fused
        self.w_down = Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x, kernels):
        return self.w_down(kernels.silu_mul(self.w_gate_up(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = nn.Parameter(torch.ones(args.dim))
        self.attn = Attention(args)
        self.mlp_norm = nn.Parameter(torch.ones(args.dim))
        self.mlp = FeedForward(args)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = nn.Parameter(torch.ones(args.dim))
        self.lm_head = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        inv_freq = args.inv_freq if args.inv_freq is not None else torch.ones(args.head_dim // 2)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.kernels = TorchKernels
        self.attend = sdpa_attention
        self.act_dtype = torch.float32  # activations and KV cache; weights may be stored narrower

    def forward(self, tokens: torch.Tensor, meta: AttentionMetadata, cache: KVCache,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (or [B, len(logits_index), V] for the chosen positions)."""
        args, kernels = self.args, self.kernels
        # cos/sin computed like HF (fp32 product, then cos) so fp32 results match token for token.
        freqs = meta.positions[..., None, None].float() * self.inv_freq  # [B, T, 1, D/2]
        dtype = self.act_dtype
        cos, sin = freqs.cos() * args.rope_scale, freqs.sin() * args.rope_scale
        cos, sin = torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)  # [B, T, 1, D]
        x = self.embed(tokens).to(dtype)
        for i, layer in enumerate(self.layers):
            h = kernels.rms_norm(x, layer.attn_norm, args.norm_eps)
            x = x + layer.attn(h, cos, sin, i, cache, meta, kernels, self.attend)
            x = x + layer.mlp(kernels.rms_norm(x, layer.mlp_norm, args.norm_eps), kernels)
        if logits_index is not None:
            x = x[:, logits_index]
        return self.lm_head(kernels.rms_norm(x, self.norm, args.norm_eps))


def from_hf(hf_model, device=None, dtype=None, act_dtype=None) -> Transformer:
    """Build a Transformer from an HF Llama-family model, copying (and fusing) its weights.

    dtype: how weights are stored; act_dtype: activations and KV cache (default: fp32 on CPU, where bf16
    arithmetic is emulated on many chips, else the weight dtype).
    """
    args = ModelArgs.from_hf(hf_model.config)
    sd = hf_model.state_dict()
    device = torch.device(device) if device is not None else next(hf_model.parameters()).device
    dtype = dtype or next(hf_model.parameters()).dtype
    with torch.device("meta"):
        model = Transformer(args)
    new = {"embed.weight": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"]}
    if not args.tie_embeddings:
        new["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        new[f"layers.{i}.attn_norm"] = sd[p + "input_layernorm.weight"]
        new[f"layers.{i}.mlp_norm"] = sd[p + "post_attention_layernorm.weight"]
        new[f"layers.{i}.attn.wqkv.weight"] = torch.cat(
            [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        if args.qkv_bias:
            new[f"layers.{i}.attn.wqkv.bias"] = torch.cat([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        new[f"layers.{i}.attn.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        new[f"layers.{i}.mlp.w_gate_up.weight"] = torch.cat(
            [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        new[f"layers.{i}.mlp.w_down.weight"] = sd[p + "mlp.down_proj.weight"]
    new = {k: v.to(device=device, dtype=dtype) for k, v in new.items()}
    model.load_state_dict(new, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = args.inv_freq.to(device) if args.inv_freq is not None else None
    model.act_dtype = act_dtype or (torch.float32 if device.type == "cpu" else dtype)
    for name, param in list(model.named_parameters()):
        if name.endswith("norm"):  # norm weights are tiny: keep them in the activations' dtype
            param.data = param.data.to(model.act_dtype)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"weights missing after conversion: {missing[:5]}")
    return model.eval().requires_grad_(False)
