"""Attention over a paged KV cache: the per-step metadata, the cache tensors, and the torch backends.

The tokens of one step are flattened into one run of N tokens (nano-vllm's and vLLM's layout), so prefill
chunks, decode rows and (later) rows that verify several draft tokens share one forward. Each new token's K
and V go to a cache slot named by `slot_mapping`; attention reads a row's context back through its block
table (Kwon et al. 2023, "PagedAttention"). The torch path here gathers a row's blocks into a contiguous
tensor and runs SDPA (or matmul-softmax-matmul); a Triton kernel can read the blocks in place instead, and so does
a C++ extension over a bfloat16 cache on a CPU (`labkit.model.cpu_attention`), which takes every token of a step,
prompt and decode alike, in one call. An int8 cache (`Int8KV`) is quantized as it is written and dequantized as
the torch path gathers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from labkit.model import cpu_attention
from labkit.model.kv_cache import Int8KV, dequantize_kv


@dataclass(frozen=True)
class RowGroup:
    """Consecutive rows with the same number of new tokens, attended in one call."""

    rows: slice  # batch rows [start, stop)
    tokens: slice  # their new tokens in the flattened run
    query_len: int  # new tokens per row
    max_context: int  # the longest row's context (cached + new tokens)
    num_keys: int  # keys attended per row: max_context, or whole blocks' worth when gathered by blocks
    is_fresh: bool  # every row's context is only its new tokens: attend to them without reading the cache
    is_causal: bool  # plain causal (SDPA's is_causal) is exact for every row
    mask: torch.Tensor | None  # [G, 1, T, S] True = visible; None when is_causal or every key is visible
    # where the rows' contexts are (S = max_context); None when fresh. A slice of slots when one row's blocks lie
    # side by side in the cache (then no copy is made), else [G * M] cache blocks, M = ceil(S / block_size): whole
    # blocks are gathered and attended, num_keys = M * block_size, the mask hiding the slots past each context
    slots: torch.Tensor | slice | None


@dataclass
class AttentionMetadata:
    """Where a step's new tokens go and what each may see; built once per forward, shared by all layers."""

    positions: torch.Tensor  # [N] position of each new token in its sequence
    slot_mapping: torch.Tensor  # [N] cache slot (block * block_size + offset) each new token is written to
    block_tables: torch.Tensor  # [B, M] cache blocks of each row, padded with block 0
    context_lens: torch.Tensor  # [B] tokens each row attends over after this step (cached + new)
    query_start: torch.Tensor | None  # [B + 1] row b's new tokens are [query_start[b], query_start[b + 1])
    block_size: int
    # Host-side plan for the torch path. None in a static decode step (compiled or graph-captured): every row
    # then has one new token and attends over its whole block table, masked by context_lens.
    groups: tuple[RowGroup, ...] | None = None
    # per group, its blocks as one flat index over a heads-major layer's (head, block) pairs: made by the first
    # layer, read by the others (`_gather`)
    flat_blocks: dict = field(default_factory=dict, repr=False)
    # for the C++ kernel, which takes every token of the step in one call: each token's row of block_tables and
    # the slots it attends over (position + 1); None when every row has one new token (block_tables and
    # context_lens say it already)
    token_rows: torch.Tensor | None = None
    token_context: torch.Tensor | None = None


def build_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                   slot_mapping: list[int], block_size: int, device) -> AttentionMetadata:
    """Metadata for rows with `query_lens[b]` new tokens ending at `context_lens[b]`; groups planned here once.

    Row b's new tokens sit at positions [context_lens[b] - query_lens[b], context_lens[b]). A group is a run of
    consecutive rows with one query length whose contexts stay within twice the first one's: every row is
    padded to the group's longest context, so rows sorted by context waste at most half of what they read.
    """
    positions: list[int] = []
    starts = [0]
    for q, c in zip(query_lens, context_lens):
        positions.extend(range(c - q, c))
        starts.append(starts[-1] + q)
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long, device=device)
    context = torch.tensor(context_lens, dtype=torch.long, device=device)
    meta = AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        block_tables=tables, context_lens=context,
        query_start=torch.tensor(starts, dtype=torch.long, device=device), block_size=block_size)
    if starts[-1] != len(query_lens):
        meta.token_rows = torch.tensor([b for b, q in enumerate(query_lens) for _ in range(q)], dtype=torch.long,
                                       device=device)
        meta.token_context = meta.positions + 1
    groups = []
    b = 0
    while b < len(query_lens):
        end = b + 1
        while end < len(query_lens) and query_lens[end] == query_lens[b] \
                and context_lens[end] <= 2 * context_lens[b]:
            end += 1
        contiguous = None
        if end == b + 1:  # one row whose blocks are consecutive (a lone sequence usually gets them in order)
            t = block_tables[b]
            if t[-1] - t[0] == len(t) - 1 and all(y == x + 1 for x, y in zip(t, t[1:])):
                contiguous = slice(t[0] * block_size, t[0] * block_size + context_lens[b])
        groups.append(_plan_group(b, end, starts, query_lens[b], context_lens[b:end], tables, block_size, device,
                                  contiguous))
        b = end
    meta.groups = tuple(groups)
    return meta


def _plan_group(first: int, stop: int, starts: list[int], T: int, contexts: list[int], tables: torch.Tensor,
                block_size: int, device, contiguous: slice | None) -> RowGroup:
    S = max(contexts)
    same = all(c == S for c in contexts)
    is_fresh = same and S == T  # prompts starting at position 0 with nothing cached
    is_causal = is_fresh and T > 1
    num_blocks = -(-S // block_size)
    by_blocks = not is_fresh and contiguous is None
    num_keys = num_blocks * block_size if by_blocks else S
    mask = None
    if not is_fresh and not (same and T == 1 and num_keys == S):  # otherwise every key is visible to every query
        ctx = torch.tensor(contexts, device=device)
        pos = ctx[:, None] - T + torch.arange(T, device=device)  # [G, T] position of each query
        mask = (torch.arange(num_keys, device=device) <= pos[:, :, None])[:, None]  # [G, 1, T, num_keys]
    # keys past a row's context (the rest of its last block, or what a shorter row's table pads with) hold
    # whatever was there: the mask hides them
    slots = tables[first:stop, :num_blocks].reshape(-1) if by_blocks else None if is_fresh else contiguous
    return RowGroup(rows=slice(first, stop), tokens=slice(starts[first], starts[stop]), query_len=T,
                    max_context=S, num_keys=num_keys, is_fresh=is_fresh, is_causal=is_causal, mask=mask,
                    slots=slots)


def sdpa_core(q, k, v, mask, is_causal: bool, scale: float) -> torch.Tensor:
    """torch SDPA: q [G, H, T, D], k, v [G, Hkv, S, D] -> [G, H, T, D].

    One-token queries in a reduced precision on a CPU go to `math_core`: CPU SDPA's bf16 path for them is several
    times slower than two batched matmuls (its fp32 path, and every path with longer queries, stays SDPA's)."""
    if q.shape[2] == 1 and q.dtype != torch.float32 and q.device.type == "cpu":
        return math_core(q, k, v, mask, is_causal, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def math_core(q, k, v, mask, is_causal: bool, scale: float) -> torch.Tensor:
    """Matmul, masked softmax, matmul: under torch.compile it fuses into a few small loops.

    The products are batched over (KV head, row): keys and values gathered from the heads-major cache
    (`paged_attention`) are [G, Hkv, S, D] views of contiguous [Hkv, G, S, D] tensors and go to the matmuls as
    they are; only the queries (one token's worth per row) are rearranged."""
    G, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = H // Hkv
    # query heads of one KV head side by side: [Hkv, G, group*T, D]
    qh = q.reshape(G, Hkv, group * T, D).transpose(0, 1)
    kh, vh = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, G, S, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [Hkv, G, group*T, S]
    if mask is None and is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    if mask is not None:  # [G or 1, 1, T, S] -> [G or 1, group*T, S], broadcast over the KV heads
        mask = mask[:, 0] if T == 1 else mask[:, 0].repeat(1, group, 1)
        scores = scores.masked_fill(~mask, float("-inf"))
    # softmax accumulates in fp32 whatever the scores' dtype (as HF's eager attention upcasts)
    out = torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), vh)  # [Hkv, G, group*T, D]
    return out.transpose(0, 1).reshape(G, H, T, D)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | Int8KV,
                    v_cache: torch.Tensor | Int8KV, meta: AttentionMetadata, scale: float,
                    core=sdpa_core) -> torch.Tensor:
    """Attention of the new tokens q [N, H, D] over their rows' contexts; k, v [N, Hkv, D] are already cached.

    Returns [N, H, D]. The cache holds each layer's slots as [slots, Hkv, D] (an Int8KV is dequantized as it is
    gathered; a fresh prompt attends to its own exact k, v). `core` is dense attention over the gathered context
    (sdpa_core, math_core), or an object whose `paged_attention` method, with this signature less `core`, reads
    the blocks in place.
    """
    if hasattr(core, "paged_attention"):  # a backend that reads the blocks in place (labkit.model.backends)
        return core.paged_attention(q, k, v, k_cache, v_cache, meta, scale)
    H, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[1]
    if meta.groups is None:  # static decode step: one token per row, keys over the whole block table
        B = meta.block_tables.shape[0]
        # [Hkv, B, M*bs, D] -> [B, Hkv, M*bs, D] views
        keys = _gather(k_cache, meta.block_tables, q.dtype, meta.block_size).view(Hkv, B, -1, D).transpose(0, 1)
        values = _gather(v_cache, meta.block_tables, q.dtype, meta.block_size).view(Hkv, B, -1, D).transpose(0, 1)
        visible = torch.arange(keys.shape[2], device=q.device) < meta.context_lens[:, None]  # [B, S]
        out = core(q[:, :, None], keys, values, visible[:, None, None], False, scale)  # [B, H, 1, D]
        return out[:, :, 0]
    bs = meta.block_size
    if cpu_attention.serves(q, k_cache):  # every token of the step in one call, reading the blocks in place (C++)
        rows, context = (None, meta.context_lens) if meta.token_rows is None else (meta.token_rows, meta.token_context)
        return cpu_attention.paged_decode_op()(q, k_cache.transpose(0, 1), v_cache.transpose(0, 1), meta.block_tables,
                                               context, bs, scale, rows)
    outs = []
    for i, g in enumerate(meta.groups):
        G, T = g.rows.stop - g.rows.start, g.query_len
        qg = q[g.tokens].view(G, T, H, D).transpose(1, 2)  # [G, H, T, D]
        if g.is_fresh:  # nothing cached before these tokens: their own k, v are the whole context
            kg = k[g.tokens].view(G, T, *k.shape[1:]).transpose(1, 2)  # [G, Hkv, T, D]
            vg = v[g.tokens].view(G, T, *v.shape[1:]).transpose(1, 2)
        elif isinstance(g.slots, slice):  # one row's blocks side by side: [1, Hkv, S, D], a view of the cache
            kg = _gather(k_cache, g.slots, q.dtype)[None]
            vg = _gather(v_cache, g.slots, q.dtype)[None]
        else:  # [Hkv, G * M * bs, D] heads-major -> [G, Hkv, S, D] views (no copy)
            index = meta.flat_blocks.get(i)
            if index is None:
                index = meta.flat_blocks[i] = flat_blocks(g.slots, Hkv, k_cache.shape[0] // bs)
            kg = _gather(k_cache, index, q.dtype, bs).view(Hkv, G, -1, D).transpose(0, 1)
            vg = _gather(v_cache, index, q.dtype, bs).view(Hkv, G, -1, D).transpose(0, 1)
        out = core(qg, kg, vg, g.mask, g.is_causal, scale)  # [G, H, T, D]
        outs.append(out.transpose(1, 2).reshape(G * T, H, D))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _gather(cache: torch.Tensor | Int8KV, index, dtype: torch.dtype, block_size: int | None = None) -> torch.Tensor:
    """Slots of one layer's cache [slots, Hkv, ...], heads first. index: a slice of slots (-> a view [Hkv, n, ...]);
    with block_size, block ids of any shape [...] (-> a copy [Hkv, ..., block_size, ...], flattened over the last
    index dim and the block: [B, M] tables give [Hkv, B, M * block_size, ...]), or a FlatBlocks (-> [Hkv, n *
    block_size, ...]). An Int8KV comes back dequantized to dtype. A heads-major cache (KVCache's) is read one
    contiguous block per head; any other [slots, Hkv, ...] tensor gives the same values."""
    if isinstance(cache, Int8KV):
        return dequantize_kv(_gather(cache.codes, index, dtype, block_size),
                             _gather(cache.scale, index, dtype, block_size), dtype)
    heads = cache.transpose(0, 1)  # [Hkv, slots, ...]
    if isinstance(index, slice):
        return heads[:, index]
    blocks = heads.unflatten(1, (-1, block_size))  # [Hkv, num_blocks, block_size, ...]
    if isinstance(index, FlatBlocks):
        if blocks.is_contiguous():  # index_select's fast path: along dim 0, one block per index
            out = blocks.flatten(0, 1).index_select(0, index.flat)
        else:
            out = blocks.index_select(1, index.blocks)
        return out.reshape(heads.shape[0], -1, *heads.shape[2:])
    return blocks[:, index].flatten(index.dim(), index.dim() + 1)  # the last index dim with the block's slots


@dataclass(frozen=True)
class FlatBlocks:
    """Block ids, and the same as one flat index over a heads-major layer's (head, block) pairs (`flat_blocks`)."""

    blocks: torch.Tensor  # [n]
    flat: torch.Tensor  # [num_heads * n]: head h's blocks offset by h * num_blocks


def flat_blocks(blocks: torch.Tensor, num_heads: int, num_blocks: int) -> FlatBlocks:
    heads = torch.arange(num_heads, device=blocks.device)[:, None]
    return FlatBlocks(blocks, (heads * num_blocks + blocks).flatten())


__all__ = ["AttentionMetadata", "RowGroup", "build_metadata", "paged_attention", "sdpa_core", "math_core"]
