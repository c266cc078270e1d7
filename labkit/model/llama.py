"""A compact Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2): architecture only.

RMSNorm, RoPE with the config's theta and scaling, grouped-query attention, SwiGLU, tied or untied LM head.
The attention and elementwise-kernel backends are chosen at construction and the paged KV cache is passed
to `forward`, which returns hidden states; `logits` applies the LM head only where a caller needs it (the
sampled positions, or a draft head's). Layout, quantization and tensor parallelism are rewrite functions over
a built model. gpt-fast's model.py and nano-vllm's models/qwen3.py are the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from labkit.model import cpu_attention
from labkit.model.attention import AttentionMetadata, paged_attention
from labkit.model.backends import attention_backend, check_backends, kernel_backend
from labkit.model.kv_cache import KVCache, write_kv

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


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in another dtype (bf16 storage, fp32 activations) or transposed.

    `kn` stores the weight as [in, out] (see `use_kn_layout`).
    """

    kn: bool = False
    packed: torch.Tensor | None = None  # oneDNN's blocked copy of the weight (labkit.model.rewrites.use_packed_gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        xw = x if x.dtype == w.dtype else x.to(w.dtype)  # a no-op .to still costs microseconds per call
        y = torch.matmul(xw, w) if self.kn else F.linear(xw, w)
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def __getstate__(self):
        # oneDNN's packed tensor has no storage: copies and pickles drop it and run the unpacked path
        return {**self.__dict__, "packed": None}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # head counts are this module's own: a tensor-parallel rewrite shrinks them to its shard
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        # q, k and v in one matrix: one weight read per step instead of three.
        self.wqkv = Linear(args.dim, (args.num_heads + 2 * args.num_kv_heads) * args.head_dim, bias=args.qkv_bias)
        self.wo = Linear(args.num_heads * args.head_dim, args.dim, bias=False)
        self.scale = args.head_dim**-0.5

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata, kernels, core):
        N = x.shape[0]
        H, Hkv = self.num_heads, self.num_kv_heads
        qkv = self.wqkv(x).view(N, H + 2 * Hkv, self.head_dim)
        qk = kernels.rope(qkv[:, : H + Hkv], cos, sin)  # [N, H+Hkv, D]
        q, k = qk.split([H, Hkv], dim=1)
        v = qkv[:, H + Hkv:]
        if meta.groups is None and cpu_attention.compiles_attention(q, k_cache):  # a compiled static CPU step
            out = torch.ops.labkit.write_and_attend(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.block_tables,
                                                    meta.context_lens, meta.block_size, self.scale)
        else:
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, core)  # [N, H, D]
        return self.wo(out.reshape(N, H * self.head_dim))


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
    """The model: token ids and attention metadata in, final hidden states out; `logits` applies the LM head.

    attention, kernels: backend names (labkit.model.backends); act_dtype: activations
    and KV cache (weights may be stored narrower).
    """

    def __init__(self, args: ModelArgs, attention: str = "sdpa", kernels: str = "torch",
                 act_dtype: torch.dtype = torch.float32):
        super().__init__()
        check_backends(attention, kernels)
        self.args = args
        self.attention, self.kernel_backend = attention, kernels
        self.core, self.kernels = attention_backend(attention), kernel_backend(kernels)
        self.act_dtype = act_dtype
        self.rewrites: list[str] = []  # what rewrite functions did to this model, in order (for describe())
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = nn.Parameter(torch.ones(args.dim))
        self.lm_head = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        inv_freq = args.inv_freq if args.inv_freq is not None else torch.ones(args.head_dim // 2)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def __getstate__(self):
        # copies and pickles drop oneDNN's packed weights (Linear.__getstate__): drop their rewrite label too
        return {**self.__dict__, "rewrites": [r for r in self.rewrites if r != "gemm:packed"]}

    @property
    def num_kv_heads(self) -> int:
        """KV heads held by this model's attention layers (after any tensor-parallel sharding)."""
        return self.layers[0].attn.num_kv_heads

    def forward(self, tokens: torch.Tensor, meta: AttentionMetadata, cache: KVCache,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [N] (a step's new tokens, rows side by side) -> final hidden states [N, dim].

        embeds [N, dim], when given, replaces the token embeddings (a draft head feeding the layers its own input).
        """
        args, kernels = self.args, self.kernels
        # cos/sin computed like HF (fp32 product, then cos) so fp32 results match token for token.
        freqs = meta.positions[:, None, None].float() * self.inv_freq  # [N, 1, D/2]
        dtype = self.act_dtype
        cos, sin = freqs.cos() * args.rope_scale, freqs.sin() * args.rope_scale
        cos, sin = torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)  # [N, 1, D]
        x = self.embed(tokens) if embeds is None else embeds  # [N, dim]
        x = x if x.dtype == dtype else x.to(dtype)
        h = kernels.rms_norm(x, self.layers[0].attn_norm, args.norm_eps)
        for i, layer in enumerate(self.layers):
            # each sublayer's output joins the residual stream x in the same kernel as the next norm
            a = layer.attn(h, cos, sin, cache.k[i], cache.v[i], meta, kernels, self.core)
            h, x = kernels.add_rms_norm(a, x, layer.mlp_norm, args.norm_eps)
            norm = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.norm
            h, x = kernels.add_rms_norm(layer.mlp(h, kernels), x, norm, args.norm_eps)
        return h

    def logits(self, hidden: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """LM head over hidden [N, dim] at the rows in `index` (all when None) -> [len(index), vocab], in fp32
        (as HF's generate upcasts them: sampling's argmax and softmax over bf16 logits run slow scalar loops on CPU)."""
        return self.lm_head(hidden if index is None else hidden[index]).float()


def from_hf(hf_model, device=None, dtype=None, act_dtype=None, attention: str = "sdpa",
            kernels: str = "torch") -> Transformer:
    """Build a Transformer from an HF Llama-family model, copying (and fusing) its weights.

    dtype: how weights are stored; act_dtype: activations and KV cache (default: the weight dtype, so bf16 runs
    bf16 end to end, with the norms and softmax accumulating in fp32 inside their kernels, as HF runs it).
    """
    args = ModelArgs.from_hf(hf_model.config)
    sd = hf_model.state_dict()
    device = torch.device(device) if device is not None else next(hf_model.parameters()).device
    dtype = dtype or next(hf_model.parameters()).dtype
    act_dtype = act_dtype or dtype
    with torch.device("meta"):
        model = Transformer(args, attention=attention, kernels=kernels, act_dtype=act_dtype)
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
    for name, param in list(model.named_parameters()):
        if name.endswith("norm"):  # norm weights are tiny: keep them in the activations' dtype
            param.data = param.data.to(model.act_dtype)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"weights missing after conversion: {missing[:5]}")
    return model.eval().requires_grad_(False)
