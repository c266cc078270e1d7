"""Decode attention over the paged KV cache, split along the context (flash-decoding: Dao, Haziza, Massa and
Sizov 2023, "Flash-Decoding for long-context inference"; paged blocks as in Kwon et al. 2023).

At decode each row has one new query per head, so a program per (row, head) leaves most of a GPU idle when the
batch is small and the context long. Here a program owns one row, one KV head with all GROUP query heads that
share it (the K and V tiles are loaded once for the group), and one split of the context; it walks the split's
keys through the row's block table (cache slot = block * block_size + offset), and keeps an online softmax. With
several splits each writes its partial output and log-sum-exp, and a second kernel combines them, weighting
each split by exp(lse - max lse). Memory-bound: every cached K and V of the context is read once.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from labkit.kernels.common import Cost, check_tensor, dot_options, element_size, is_interpreter, tile_width

MIN_SPLIT_TOKENS = 256  # a split shorter than this spends more on its partial result than it saves


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_lse_ptr, tables_ptr, ctx_ptr,
                             stride_qb, stride_qh, stride_kt, stride_kh, stride_ob, stride_oh, stride_tb, stride_ctx,
                             qk_scale,
                             H, D, GROUP, split_len, NUM_SPLITS: tl.constexpr, PAGE: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, kv_h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_ptr + b * stride_ctx)  # a column of the static step's input tensor: strided
    start = split * split_len
    end = tl.minimum(ctx, start + split_len)  # a split past the row's context is empty
    g = tl.arange(0, BLOCK_G)  # [BLOCK_G] the query heads of this KV head (padded to a tile)
    heads = kv_h * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    # padding heads past the group, dims past D (BLOCK_D is a power of 2)
    head_mask = (g < GROUP)[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=head_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kv_off = kv_h * stride_kh + offs_d[None, :]  # K and V caches share one layout (asserted by the launcher)
    table = tables_ptr + b * stride_tb
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        n_ok = offs_n < end  # the split's last tile runs past its end
        slots = tl.load(table + offs_n // PAGE, mask=n_ok, other=0) * PAGE + offs_n % PAGE  # via the block table
        kv_mask = n_ok[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_kt + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + slots[:, None] * stride_kt + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))  # [BLOCK_G, BLOCK_N] in log2 units
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])  # the first tile of a non-empty split has a finite max
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=head_mask)
    else:
        is_empty = l_i == 0.0  # a split past the context: weight zero in the combine
        part = (b * H + heads) * NUM_SPLITS + split  # [BLOCK_G] row of the partial results
        o = tl.where(is_empty[:, None], 0.0, acc / tl.where(is_empty, 1.0, l_i)[:, None])
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :], o, mask=head_mask)
        lse = tl.where(is_empty, float("-inf"), m_i + tl.log2(tl.where(is_empty, 1.0, l_i)))
        tl.store(part_lse_ptr + part, lse, mask=g < GROUP)


@triton.jit
def _combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, H, D, stride_ob, stride_oh, NUM_SPLITS: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = s < NUM_SPLITS  # BLOCK_S is NUM_SPLITS rounded up to a power of 2
    part = (b * H + h) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    w = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 is never empty, so the max is finite
    o = tl.load(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_rows: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits of the context so that rows x KV heads x splits fill about two waves of the GPU's SMs, each split
    at least MIN_SPLIT_TOKENS long; one under the interpreter. Depends on shapes only, never on tensor values,
    so a CUDA graph captured with it stays valid."""
    if device.type != "cuda":
        return 1
    wanted = triton.cdiv(2 * _num_sms(device.index or 0), max(1, num_rows * num_kv_heads))
    return max(1, min(wanted, triton.cdiv(max_context, MIN_SPLIT_TOKENS)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, block_size: int, scale: float | None = None,
                     num_splits: int | None = None) -> torch.Tensor:
    """One new query per row: q [B, H, D] over the rows' cached contexts -> [B, H, D].

    k_cache, v_cache: [slots, Hkv, D], slot = block * block_size + offset; block_tables [B, M] (the
    context capacity is M * block_size); context_lens [B], each >= 1. num_splits: how many parts of
    the context run in parallel (default: `choose_num_splits`).
    """
    check_tensor(q, "q", 3)
    check_tensor(k_cache, "k_cache", 3)
    check_tensor(v_cache, "v_cache", 3)
    B, H, D = q.shape
    HK = k_cache.shape[1]
    assert k_cache.shape[2] == D and v_cache.shape == k_cache.shape, \
        f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)} disagree"
    assert HK >= 1 and H % HK == 0, f"query heads ({H}) must be a multiple of KV heads ({HK})"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and the cache must share a dtype"
    assert k_cache.stride() == v_cache.stride(), f"k and v caches must share a layout: {k_cache.stride()}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B and block_tables.dtype in (torch.int32, torch.int64)
    assert block_tables.shape[1] <= 1 or block_tables.stride(1) == 1, "block table rows must be contiguous"
    assert context_lens.shape == (B,) and context_lens.dtype in (torch.int32, torch.int64)
    assert block_tables.device == context_lens.device == q.device == k_cache.device, "all tensors on one device"
    assert block_size >= 1 and k_cache.shape[0] % block_size == 0, \
        f"the cache's {k_cache.shape[0]} slots are not whole blocks of {block_size}"
    out = torch.empty_like(q)
    if B == 0:
        return out
    max_context = block_tables.shape[1] * block_size
    splits = num_splits or choose_num_splits(B, HK, max_context, q.device)
    assert splits >= 1, f"num_splits must be >= 1, got {splits}"
    interp = is_interpreter()
    BLOCK_N = min(tile_width(max_context, 16), 128 if interp else 64)
    split_len = triton.cdiv(triton.cdiv(max_context, splits), BLOCK_N) * BLOCK_N  # whole tiles per split
    splits = triton.cdiv(max_context, split_len)
    BLOCK_D = tile_width(D, 16)
    BLOCK_G = tile_width(H // HK, 1 if interp else 16)  # tl.dot on a GPU needs 16 rows
    if splits > 1:
        part_out = torch.empty((B * H * splits, BLOCK_D), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((B * H * splits,), device=q.device, dtype=torch.float32)
    else:
        part_out = part_lse = out  # not read with one split
    scale = D**-0.5 if scale is None else scale
    _decode_attention_kernel[(B, HK, splits)](
        q, k_cache, v_cache, out, part_out, part_lse, block_tables, context_lens, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        context_lens.stride(0), scale * math.log2(math.e), H, D, H // HK, split_len, NUM_SPLITS=splits,
        PAGE=block_size, BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4, num_stages=2,
        **dot_options(q.dtype))
    if splits > 1:
        _combine_kernel[(B, H)](part_out, part_lse, out, H, D, out.stride(0), out.stride(1), NUM_SPLITS=splits,
                                BLOCK_S=tile_width(splits), BLOCK_D=BLOCK_D, num_warps=1)
    return out


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, block_size: int, scale: float | None = None) -> torch.Tensor:
    """The reference in float32: gather each row's context slots, then softmax(q k^T) v per head."""
    B, H, D = q.shape
    HK = k_cache.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, n in enumerate(context_lens.tolist()):
        pos = torch.arange(n, device=q.device)
        slots = block_tables[b, pos // block_size] * block_size + pos % block_size
        keys = k_cache[slots].float().transpose(0, 1).repeat_interleave(H // HK, dim=0)  # [H, n, D]
        values = v_cache[slots].float().transpose(0, 1).repeat_interleave(H // HK, dim=0)
        weights = (keys @ q[b].float()[:, :, None] * scale).squeeze(-1).softmax(-1)  # [H, n]
        out[b] = (weights[:, None, :] @ values).squeeze(1)
    return out


def decode_attention_cost(context_lens, H: int, HK: int, D: int, dtype: torch.dtype) -> Cost:
    """Bytes: every cached K and V of every row's context read once, q read and the output written; FLOPs:
    2 * D per query head and key for the scores, the same again for the weighted values."""
    e, total = element_size(dtype), sum(context_lens)
    return Cost(bytes=2 * total * HK * D * e + 2 * len(context_lens) * H * D * e, flops=4 * total * H * D)


__all__ = ["decode_attention", "decode_attention_ref", "decode_attention_cost", "choose_num_splits"]
