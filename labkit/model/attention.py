"""Attention over a paged KV cache: the per-step metadata, the cache tensors, and the torch backends.

The tokens of one step are flattened into one run of N tokens (nano-vllm's and vLLM's layout), so prefill
chunks, decode rows and (later) rows that verify several draft tokens share one forward. Each new token's K
and V go to a cache slot named by `slot_mapping`; attention reads a row's context back through its block
table (Kwon et al. 2023, "PagedAttention"). The torch path here gathers a row's blocks into a contiguous
tensor and runs SDPA (or matmul-softmax-matmul); a Triton kernel can read the blocks in place instead. An int8
cache (`Int8KV`) is quantized as it is written and dequantized as the torch path gathers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labkit.model.kv_cache import Int8KV, dequantize_kv


@dataclass(frozen=True)
class RowGroup:
    """Consecutive rows with the same number of new tokens, attended in one call."""

    rows: slice  # batch rows [start, stop)
    tokens: slice  # their new tokens in the flattened run
    query_len: int  # new tokens per row
    max_context: int  # the longest row's context (cached + new tokens)
    is_fresh: bool  # every row's context is only its new tokens: attend to them without reading the cache
    is_causal: bool  # plain causal (SDPA's is_causal) is exact for every row
    mask: torch.Tensor | None  # [G, 1, T, S] True = visible; None when is_causal or every key is visible
    slots: torch.Tensor | slice | None  # [G * S] cache slots of the rows' contexts (S = max_context); a slice
    # when one row's blocks lie side by side in the cache (then no copy is made); None when fresh


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
    # every slot of every table, [B, width * block_size]: the groups' context slots are slices of it
    table_slots = (tables[:, :, None] * block_size + torch.arange(block_size, device=device)).flatten(1)
    context = torch.tensor(context_lens, dtype=torch.long, device=device)
    meta = AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        block_tables=tables, context_lens=context,
        query_start=torch.tensor(starts, dtype=torch.long, device=device), block_size=block_size)
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
        groups.append(_plan_group(b, end, starts, query_lens[b], context_lens[b:end], table_slots, device,
                                  contiguous))
        b = end
    meta.groups = tuple(groups)
    return meta


def _plan_group(first: int, stop: int, starts: list[int], T: int, contexts: list[int], table_slots: torch.Tensor,
                device, contiguous: slice | None) -> RowGroup:
    S = max(contexts)
    same = all(c == S for c in contexts)
    is_fresh = same and S == T  # prompts starting at position 0 with nothing cached
    is_causal = is_fresh and T > 1
    mask = None
    if not is_fresh and not (same and T == 1):  # otherwise every key is visible to every query
        ctx = torch.tensor(contexts, device=device)
        pos = ctx[:, None] - T + torch.arange(T, device=device)  # [G, T] position of each query
        mask = (torch.arange(S, device=device) <= pos[:, :, None])[:, None]  # [G, 1, T, S]
    # keys past a shorter row's context read whatever its table pads with: the mask hides them
    slots = None if is_fresh else contiguous or table_slots[first:stop, :S].reshape(-1)
    return RowGroup(rows=slice(first, stop), tokens=slice(starts[first], starts[stop]), query_len=T,
                    max_context=S, is_fresh=is_fresh, is_causal=is_causal, mask=mask, slots=slots)


def sdpa_core(q, k, v, mask, is_causal: bool, scale: float) -> torch.Tensor:
    """torch SDPA: q [G, H, T, D], k, v [G, Hkv, S, D] -> [G, H, T, D].

    One-token queries in a reduced precision on a CPU go to `math_core`: CPU SDPA's bf16 path for them is several
    times slower than two batched matmuls (its fp32 path, and every path with longer queries, stays SDPA's)."""
    if q.shape[2] == 1 and q.dtype != torch.float32 and q.device.type == "cpu":
        return math_core(q, k, v, mask, is_causal, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def math_core(q, k, v, mask, is_causal: bool, scale: float) -> torch.Tensor:
    """Matmul, masked softmax, matmul: under torch.compile it fuses into a few small loops."""
    G, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = H // Hkv
    qg = q.reshape(G, Hkv, group * T, D)  # query heads of one KV head side by side: [G, Hkv, group*T, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [G, Hkv, group*T, S]
    if mask is None and is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    if mask is not None:  # [G or 1, 1, T, S] -> the grouped layout [G or 1, 1, group*T, S]
        scores = scores.masked_fill(~(mask if T == 1 else mask.repeat(1, 1, group, 1)), float("-inf"))
    # softmax accumulates in fp32 whatever the scores' dtype (as HF's eager attention upcasts)
    out = torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)  # [G, Hkv, group*T, D]
    return out.reshape(G, H, T, D)


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
    if meta.groups is None:  # static decode step: one token per row, keys over the whole block table
        keys = _gather(k_cache, meta.block_tables, q.dtype, meta.block_size).transpose(1, 2)  # [B, Hkv, M*bs, D]
        values = _gather(v_cache, meta.block_tables, q.dtype, meta.block_size).transpose(1, 2)
        visible = torch.arange(keys.shape[2], device=q.device) < meta.context_lens[:, None]  # [B, S]
        out = core(q[:, :, None], keys, values, visible[:, None, None], False, scale)  # [B, H, 1, D]
        return out[:, :, 0]
    outs = []
    for g in meta.groups:
        G, T, S = g.rows.stop - g.rows.start, g.query_len, g.max_context
        qg = q[g.tokens].view(G, T, H, D).transpose(1, 2)  # [G, H, T, D]
        if g.is_fresh:  # nothing cached before these tokens: their own k, v are the whole context
            kg = k[g.tokens].view(G, T, *k.shape[1:]).transpose(1, 2)  # [G, Hkv, T, D]
            vg = v[g.tokens].view(G, T, *v.shape[1:]).transpose(1, 2)
        elif isinstance(g.slots, slice):  # one row, its blocks side by side: a view of the cache
            kg = _gather(k_cache, g.slots, q.dtype).transpose(0, 1)[None]  # [1, Hkv, S, D]
            vg = _gather(v_cache, g.slots, q.dtype).transpose(0, 1)[None]
        else:
            kg = _gather(k_cache, g.slots, q.dtype).view(G, S, *k.shape[1:]).transpose(1, 2)  # [G, Hkv, S, D]
            vg = _gather(v_cache, g.slots, q.dtype).view(G, S, *v.shape[1:]).transpose(1, 2)
        out = core(qg, kg, vg, g.mask, g.is_causal, scale)  # [G, H, T, D]
        outs.append(out.transpose(1, 2).reshape(G * T, H, D))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _gather(cache: torch.Tensor | Int8KV, index, dtype: torch.dtype, block_size: int | None = None) -> torch.Tensor:
    """Slots of one layer's cache [slots, Hkv, ...] at index: a slice (a view), [n] slots (a copy), or with
    block_size [B, M] block tables (-> [B, M * block_size, Hkv, ...]). An Int8KV comes back dequantized to dtype."""
    if isinstance(cache, Int8KV):
        return dequantize_kv(_gather(cache.codes, index, dtype, block_size),
                             _gather(cache.scale, index, dtype, block_size), dtype)
    if block_size is not None:
        return cache.view(-1, block_size, *cache.shape[1:])[index].flatten(1, 2)
    return cache[index] if isinstance(index, slice) else cache.index_select(0, index)


__all__ = ["AttentionMetadata", "RowGroup", "build_metadata", "paged_attention", "sdpa_core", "math_core"]
