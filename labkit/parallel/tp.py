"""Tensor parallelism as a rewrite of a built model (Shoeybi et al. 2019, "Megatron-LM"; gpt-fast's tp.py shape).

Each block is split in two halves that each end in one all-reduce:
- attention: the fused QKV projection is column-parallel (each rank computes its own query heads and the KV
  heads they read), attention runs on those heads alone, and the output projection is row-parallel (each rank
  multiplies its heads' slice of the input features); the partial outputs are summed by one all-reduce.
- MLP: the fused gate-up projection is column-parallel (each rank a slice of the hidden features, gate and up
  cut alike), the down projection row-parallel, then one all-reduce.
The embedding, the norms and the LM head stay whole on every rank, so every rank computes the same logits and,
with the same seed, samples the same token: the engine runs unchanged on each rank, its paged KV cache sized
from the rank's own `num_kv_heads`.

Heads that do not divide by the world size (the embedded SmolLM2 has 9 query and 3 KV heads): whole KV groups
(a KV head and the query heads that read it) are dealt out as evenly as they go, 2 + 1 at world size 2; exact,
no padding, but the rank with more heads does more attention work. Where the world size exceeds the KV heads,
each KV head is replicated on W / Hkv ranks, which split its query heads (vLLM's rule). Where neither works, or
`allow_uneven=False` and the heads do not divide, the plan is refused with one line naming the sizes that work.

Weights may be [out, in] or [in, out] (`llama.use_kn_layout`), or int8 (`quant.quantize`); quantize before
splitting, so every rank keeps the unsplit per-output-channel scales and TP=2 computes what TP=1 computes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from labkit.checks import check_int
from labkit.device import synchronize
from labkit.parallel.distributed import DistContext
from labkit.model.llama import Linear, ModelArgs, Transformer
from labkit.model.quantize import Int8WeightOnlyLinear


class TensorParallelError(ValueError):
    """The model cannot be split over this many ranks; the message names the world sizes that work."""


@dataclass(frozen=True)
class TPPlan:
    """Which query heads, KV heads and MLP hidden features each rank holds (global indices)."""

    world_size: int
    q_heads: tuple[tuple[int, ...], ...]  # [rank] -> query heads
    kv_heads: tuple[tuple[int, ...], ...]  # [rank] -> KV heads (a replicated head appears on several ranks)
    hidden: tuple[tuple[int, int], ...]  # [rank] -> MLP hidden features [start, stop)
    kv_replicas: int = 1  # ranks that hold each KV head

    @property
    def is_even(self) -> bool:
        """Every rank holds as many heads and hidden features as every other."""
        return len({len(q) for q in self.q_heads}) == 1 and len({b - a for a, b in self.hidden}) == 1

    def describe(self) -> str:
        heads = " + ".join(f"{len(q)}q/{len(k)}kv" for q, k in zip(self.q_heads, self.kv_heads))
        kind = "even" if self.is_even else "uneven"
        extra = f", each KV head on {self.kv_replicas} ranks" if self.kv_replicas > 1 else ""
        return f"{self.world_size} ranks, heads {heads} ({kind}{extra})"


def _balanced(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of `parts` contiguous runs covering range(n), sizes differing by at most one."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for r in range(parts):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _try_plan(num_heads: int, num_kv_heads: int, hidden_dim: int, world_size: int,
              allow_uneven: bool) -> TPPlan | None:
    group = num_heads // num_kv_heads  # query heads per KV head
    if world_size > num_heads or (not allow_uneven and hidden_dim % world_size) or world_size > hidden_dim:
        return None
    hidden = tuple(_balanced(hidden_dim, world_size))
    if num_kv_heads % world_size == 0 or (allow_uneven and world_size <= num_kv_heads):
        kv = [tuple(range(a, b)) for a, b in _balanced(num_kv_heads, world_size)]  # whole KV groups
        q = [tuple(h for k in ks for h in range(k * group, (k + 1) * group)) for ks in kv]
        return TPPlan(world_size, tuple(q), tuple(kv), hidden)
    replicas = world_size // num_kv_heads
    if world_size % num_kv_heads == 0 and group % replicas == 0:  # each KV head on `replicas` ranks
        local = group // replicas
        kv = [(r // replicas,) for r in range(world_size)]
        q = [tuple(range(k * group + (r % replicas) * local, k * group + (r % replicas + 1) * local))
             for r, (k,) in enumerate(kv)]
        return TPPlan(world_size, tuple(q), tuple(kv), hidden, kv_replicas=replicas)
    return None


def plan_tensor_parallel(args: ModelArgs, world_size: int, allow_uneven: bool = True,
                         name: str = "the model") -> TPPlan:
    """The split of a model's heads and MLP over `world_size` ranks; TensorParallelError naming the sizes that
    work when there is none."""
    check_int("world size", world_size, error=TensorParallelError)
    H, Hkv, F = args.num_heads, args.num_kv_heads, args.hidden_dim
    plan = _try_plan(H, Hkv, F, world_size, allow_uneven)
    if plan is not None and (allow_uneven or plan.is_even):
        return plan
    sizes = [w for w in range(1, min(H, 64) + 1) if (p := _try_plan(H, Hkv, F, w, allow_uneven))
             and (allow_uneven or p.is_even)]
    message = (f"{name} cannot be split over {world_size} ranks: its {H} query heads, {Hkv} KV heads and "
               f"{F} MLP features do not divide{'' if allow_uneven else ' evenly'}; world sizes that work: "
               f"{', '.join(map(str, sizes))}")
    if not allow_uneven:
        uneven = [w for w in range(1, min(H, 64) + 1) if _try_plan(H, Hkv, F, w, True)]
        if uneven != sizes:
            message += f" (with an uneven split of whole KV groups: {', '.join(map(str, uneven))})"
    raise TensorParallelError(message)


def shard_shapes(args: ModelArgs, plan: TPPlan) -> list[dict]:
    """Each rank's share of one block, as [in, out] features of its four matrices, and its fraction of the
    block's weights: what `tensor_parallel` keeps on that rank."""
    D, dim = args.head_dim, args.dim
    whole = dim * (args.num_heads + 2 * args.num_kv_heads) * D + args.num_heads * D * dim + 3 * dim * args.hidden_dim
    rows = []
    for rank, (q, kv, (start, stop)) in enumerate(zip(plan.q_heads, plan.kv_heads, plan.hidden)):
        f = stop - start
        qkv_out = (len(q) + 2 * len(kv)) * D
        rows.append({"rank": rank, "query_heads": len(q), "kv_heads": len(kv), "wqkv": [dim, qkv_out],
                     "wo": [len(q) * D, dim], "w_gate_up": [dim, 2 * f], "w_down": [f, dim],
                     "weight_fraction": (dim * qkv_out + len(q) * D * dim + 3 * dim * f) / whole})
    return rows


# -- the communication -----------------------------------------------------------------------------------------
@dataclass
class CommStats:
    """Time spent in the all-reduces of one rank while `enabled` (the device synchronised around each call, so
    it includes waiting for the slowest rank); off, the all-reduces run untimed (and compile)."""

    enabled: bool = False
    num_calls: int = 0
    seconds: float = 0.0
    num_bytes: int = 0
    sizes: dict = field(default_factory=dict)  # message bytes -> calls

    def reset(self) -> None:
        self.num_calls, self.seconds, self.num_bytes, self.sizes = 0, 0.0, 0, {}


class RowParallelLinear(nn.Module):
    """A linear whose input features are split over the ranks: each rank's partial product, summed by one
    all-reduce; the bias (if any) is added once, after the sum."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, group, stats: CommStats, device: torch.device):
        super().__init__()
        self.inner, self.group, self.stats, self.device = inner, group, stats, device
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.stats.enabled:
            synchronize(self.device)  # the product is finished: what follows is communication (and waiting)
            start = time.perf_counter()
            dist.all_reduce(y, group=self.group)
            synchronize(self.device)
            self.stats.seconds += time.perf_counter() - start
            self.stats.num_calls += 1
            self.stats.num_bytes += y.nbytes
            self.stats.sizes[y.nbytes] = self.stats.sizes.get(y.nbytes, 0) + 1
        else:
            dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# -- splitting weights -----------------------------------------------------------------------------------------
def _take_out(linear: nn.Module, index: torch.Tensor) -> nn.Module:
    """Keep only the output features in `index` (column-parallel): a smaller module of the same kind."""
    if isinstance(linear, Int8WeightOnlyLinear):
        linear.weight_int8 = linear.weight_int8.index_select(0, index).contiguous()
        linear.scales = linear.scales.index_select(0, index).contiguous()
        linear.out_features = len(index)
    elif isinstance(linear, Linear):
        w = linear.weight.detach()
        w = w.index_select(1, index) if linear.kn else w.index_select(0, index)  # kn: [in, out]
        linear.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        linear.out_features = len(index)
        linear.packed = None  # a packed copy (use_packed_gemm) holds the whole weight: drop it
    else:
        raise TypeError(f"cannot split a {type(linear).__name__}: expected a labkit Linear or its int8 form")
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).contiguous(), requires_grad=False)
    return linear


def _take_in(linear: nn.Module, index: torch.Tensor, ctx: DistContext, stats: CommStats) -> RowParallelLinear:
    """Keep only the input features in `index` (row-parallel) and sum the ranks' outputs."""
    bias = None if linear.bias is None else linear.bias.detach()
    linear.bias = None
    if isinstance(linear, Int8WeightOnlyLinear):  # per-output-channel scales stay whole: sum of shards is exact
        linear.weight_int8 = linear.weight_int8.index_select(1, index).contiguous()
        linear.in_features = len(index)
    elif isinstance(linear, Linear):
        w = linear.weight.detach()
        w = w.index_select(0, index) if linear.kn else w.index_select(1, index)
        linear.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        linear.in_features = len(index)
        linear.packed = None  # a packed copy (use_packed_gemm) holds the whole weight: drop it
    else:
        raise TypeError(f"cannot split a {type(linear).__name__}: expected a labkit Linear or its int8 form")
    return RowParallelLinear(linear, bias, ctx.group, stats, ctx.device)


def _features(heads, head_dim: int, offset: int = 0) -> list[int]:
    """The feature indices of some heads in a [heads * head_dim] layout starting at `offset`."""
    return [offset + h * head_dim + d for h in heads for d in range(head_dim)]


def tensor_parallel(model: Transformer, ctx: DistContext, allow_uneven: bool = True,
                    plan: TPPlan | None = None) -> Transformer:
    """Rewrite: keep this rank's share of every attention and MLP weight, in place; returns the model.

    Every rank must hold the same whole model before the call (same weights, same earlier rewrites). The
    model then holds `model.tp_plan` and `model.comm_stats` (the all-reduce timer of this rank).
    """
    if getattr(model, "tp_plan", None) is not None:
        raise ValueError("the model is already split for tensor parallelism")
    args = model.args
    plan = plan or plan_tensor_parallel(args, ctx.world_size, allow_uneven)
    if plan.world_size != ctx.world_size:
        raise ValueError(f"the plan is for {plan.world_size} ranks, the process group has {ctx.world_size}")
    stats = CommStats()
    D, H, Hkv, F = args.head_dim, args.num_heads, args.num_kv_heads, args.hidden_dim
    q, kv = plan.q_heads[ctx.rank], plan.kv_heads[ctx.rank]
    start, stop = plan.hidden[ctx.rank]
    dev = model.embed.weight.device
    qkv_index = torch.tensor(_features(q, D) + _features(kv, D, H * D) + _features(kv, D, (H + Hkv) * D), device=dev)
    o_index = torch.tensor(_features(q, D), device=dev)
    gate_up_index = torch.tensor([*range(start, stop), *range(F + start, F + stop)], device=dev)
    down_index = torch.arange(start, stop, device=dev)
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        attn.wqkv = _take_out(attn.wqkv, qkv_index)
        attn.wo = _take_in(attn.wo, o_index, ctx, stats)
        attn.num_heads, attn.num_kv_heads = len(q), len(kv)
        mlp.w_gate_up = _take_out(mlp.w_gate_up, gate_up_index)
        mlp.w_down = _take_in(mlp.w_down, down_index, ctx, stats)
    model.tp_plan, model.comm_stats, model.tp_rank = plan, stats, ctx.rank
    model.rewrites.append(f"tp:{ctx.world_size}")
    return model


def make_engine(model: Transformer, tokenizer, ctx: DistContext, config=None, **engine_kwargs):
    """An Engine on this rank whose KV cache has as many blocks as every other rank's (ranks with more KV
    heads fit fewer blocks in the same memory), so that every rank schedules, and preempts, alike.

    config: an EngineConfig (default: the engine's); engine_kwargs: Engine's other keywords (name, eos_token_ids).
    """
    from labkit.engine.engine import Engine, EngineConfig

    config = config or EngineConfig()
    if config.scheduler.policy == "dynamic":
        raise ValueError("the dynamic policy waits on each rank's clock, so ranks could batch differently: use "
                         "continuous or static under tensor parallelism")
    engine = Engine(model, tokenizer, config=config, **engine_kwargs)
    blocks = torch.tensor([engine.blocks.num_blocks], device=ctx.device)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=ctx.group)
    if int(blocks) != engine.blocks.num_blocks:
        del engine  # its cache goes before the smaller one is allocated
        engine = Engine(model, tokenizer, config=dataclasses.replace(config, num_kv_blocks=int(blocks)),
                        **engine_kwargs)
    return engine


__all__ = ["TPPlan", "TensorParallelError", "plan_tensor_parallel", "shard_shapes", "CommStats", "RowParallelLinear",
           "tensor_parallel", "make_engine"]
