"""Causal flash-attention forward with grouped-query heads and variable-length rows (Dao 2023,
"FlashAttention-2", Alg. 1; Triton's tutorial 06-fused-attention is the pattern).

Rows of different lengths are packed side by side ([N, H, D], with cumulative offsets, as flash_attn's varlen
functions take them). One program owns BLOCK_M queries of one row and one query head, keeps them in registers,
and streams the keys and values of that head's KV group in tiles of BLOCK_N: scores, an online softmax (running
max and sum, the accumulator rescaled when the max grows) and the weighted values, so the [S, S] score matrix
never reaches memory. Key tiles entirely visible to every query of the block run without a mask; only the tiles
on the causal diagonal and past the row's end are masked. Causality is aligned bottom-right: with Lk keys and
Lq queries, query i sees keys up to Lk - Lq + i, so a prefill chunk attends to its cached context.

`flash_attention_paged` reads the keys and values in place from the paged KV cache through block tables
(Kwon et al. 2023), which is what the engine's prefill uses: no gather of the context.
Compute-bound at long rows: FLOPs = 4 * Lq * Lk * H * D (halved when causal).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from labkit.kernels.common import Cost, check_tensor, dot_options, element_size, is_interpreter, tile_width


def _configs():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4))]


@triton.jit
def _attend(acc, l_i, m_i, q, k_ptr, v_ptr, start, q_idx, kv_off, shift, k_start, k_len, b, tables_ptr,
            stride_kt, stride_vt, stride_tb, qk_scale, D, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
            PAGED: tl.constexpr, PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
            EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One tile of BLOCK_N keys: scores, online-softmax update, weighted values."""
    offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions in the row
    n_ok = offs_n < k_len  # the row's last tile runs past its end
    if PAGED:  # key position -> cache slot through the row's block table
        page = tl.load(tables_ptr + b * stride_tb + offs_n // PAGE, mask=n_ok, other=0)
        rows = page * PAGE + offs_n % PAGE
    else:
        rows = k_start + offs_n
    if MASKED or not EVEN_D:
        kv_mask = n_ok[:, None] & (tl.arange(0, BLOCK_D)[None, :] < D)  # keys past the row, dims past D
        k = tl.load(k_ptr + rows[:, None] * stride_kt + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + rows[:, None] * stride_vt + kv_off, mask=kv_mask, other=0.0)
    else:  # a full tile of a power-of-two head dim: no mask to compute
        k = tl.load(k_ptr + rows[:, None] * stride_kt + kv_off)
        v = tl.load(v_ptr + rows[:, None] * stride_vt + kv_off)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        visible = n_ok[None, :]
        if CAUSAL:  # a query at row position p sees keys <= p (p = shift + its index)
            visible = visible & (offs_n[None, :] <= shift + q_idx[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query with nothing visible yet: no -inf - -inf
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _flash_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_q_ptr, cu_k_ptr, tables_ptr, ctx_ptr,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_ot, stride_oh, stride_tb,
                            qk_scale, D, GROUP, CAUSAL: tl.constexpr, PAGED: tl.constexpr,
                            PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            GROUP_P: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # GROUP_P > 1 packs the query heads of one KV head into the tile's rows (row r: query r // GROUP_P, head
    # r % GROUP_P), so their K and V tiles are loaded once; GROUP_P == 1 is one query head per program.
    BLOCK_Q = BLOCK_M // GROUP_P  # queries per program (a constexpr: both operands are)
    m_block, b = tl.program_id(0), tl.program_id(1)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if m_block * BLOCK_Q < q_len:  # the grid covers the longest row; shorter rows have idle programs
        if PAGED:
            k_start = 0
            k_len = tl.load(ctx_ptr + b)
        else:
            k_start = tl.load(cu_k_ptr + b)
            k_len = tl.load(cu_k_ptr + b + 1) - k_start
        r = tl.arange(0, BLOCK_M)
        q_idx = m_block * BLOCK_Q + r // GROUP_P  # [BLOCK_M] each tile row's query index in the row
        g = r % GROUP_P
        if GROUP_P == 1:
            head = tl.program_id(2) + g  # [BLOCK_M], all the program's head
            kv_h = tl.program_id(2) // GROUP  # GQA: GROUP query heads share one KV head
        else:
            kv_h = tl.program_id(2)
            head = kv_h * GROUP + g
        offs_d = tl.arange(0, BLOCK_D)
        # queries past the row, padding heads past the group, dims past D (BLOCK_D is a power of 2)
        q_mask = ((q_idx < q_len) & (g < GROUP))[:, None] & (offs_d[None, :] < D)
        q_off = (q_start + q_idx)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        kv_off = kv_h * stride_kh + offs_d[None, :]  # K and V share their layout (asserted by the launcher)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        shift = k_len - q_len  # bottom-right causal alignment: query i sits at key position shift + i
        if CAUSAL:
            full_end = tl.minimum(k_len, shift + m_block * BLOCK_Q + 1)  # keys every query of the block sees
            end = tl.minimum(k_len, shift + (m_block + 1) * BLOCK_Q)  # one past what its last query sees
        else:
            full_end = k_len
            end = k_len
        full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
        for start in range(0, full_end, BLOCK_N):  # stage 1: tiles no mask touches
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_ptr, v_ptr, start, q_idx, kv_off, shift, k_start, k_len,
                                    b, tables_ptr, stride_kt, stride_vt, stride_tb, qk_scale, D, CAUSAL, False,
                                    PAGED, PAGE, DOT_PRECISION, UPCAST, EVEN_D, BLOCK_N, BLOCK_D)
        for start in range(full_end, end, BLOCK_N):  # stage 2: the causal diagonal and the row's end
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_ptr, v_ptr, start, q_idx, kv_off, shift, k_start, k_len,
                                    b, tables_ptr, stride_kt, stride_vt, stride_tb, qk_scale, D, CAUSAL, True,
                                    PAGED, PAGE, DOT_PRECISION, UPCAST, EVEN_D, BLOCK_N, BLOCK_D)
        out_off = (q_start + q_idx)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + out_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)


if not is_interpreter():  # on a GPU the tile shape is tuned once per head dim, GQA ratio and mode
    _flash_attention_kernel = triton.autotune(configs=_configs(), key=["D", "GROUP", "CAUSAL", "PAGED"])(
        _flash_attention_kernel)


def _check_qkv(q, k, v):
    check_tensor(q, "q", 3)
    check_tensor(k, "k", 3)
    check_tensor(v, "v", 3)
    H, D, HK = q.shape[1], q.shape[2], k.shape[1]
    assert k.shape[2] == D and v.shape[1:] == k.shape[1:], \
        f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share head dim and KV heads"
    assert HK >= 1 and H % HK == 0, f"query heads ({H}) must be a multiple of KV heads ({HK})"
    assert q.dtype == k.dtype == v.dtype, f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    assert q.device == k.device == v.device, "q, k and v must be on one device"
    assert k.stride()[1:] == v.stride()[1:], f"k and v must share their head layout: {k.stride()}, {v.stride()}"
    return H, HK, D


def _check_offsets(t: torch.Tensor, name: str, device) -> None:
    assert t.dim() == 1 and t.dtype in (torch.int32, torch.int64), f"{name} must be a 1-d integer tensor"
    assert t.numel() <= 1 or t.stride(0) == 1, f"{name} must be contiguous"
    assert t.device == device, f"{name} is on {t.device}, q on {device}"


def _launch(q, k, v, out, cu_q, cu_k, tables, ctx, num_rows, max_seqlen_q, scale, causal, page):
    H, HK, D = q.shape[1], k.shape[1], q.shape[2]
    scale = D**-0.5 if scale is None else scale
    paged = tables is not None
    tiles = {}
    group_p = 1
    if is_interpreter():  # its cost is per program and per operation: pack a KV head's query heads, cover rows
        group_p = tile_width(H // HK)
        max_k = tables.shape[1] * page if paged else int((cu_k[1:] - cu_k[:-1]).max())
        tiles = {"BLOCK_M": min(256, tile_width(max_seqlen_q * group_p, 16)),
                 "BLOCK_N": min(128, tile_width(max_k, 16))}
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"] // group_p), num_rows,  # noqa: E731
                         HK if group_p > 1 else H)
    _flash_attention_kernel[grid](
        q, k, v, out, cu_q, cu_k if cu_k is not None else cu_q, tables if paged else cu_q, ctx if paged else cu_q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), out.stride(0), out.stride(1),
        tables.stride(0) if paged else 0, scale * math.log2(math.e), D, H // HK, CAUSAL=causal, PAGED=paged,
        PAGE=page, GROUP_P=group_p, EVEN_D=D == tile_width(D, 16), BLOCK_D=tile_width(D, 16), **tiles,
        **dot_options(q.dtype))
    return out


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, scale: float | None = None,
                    causal: bool = True) -> torch.Tensor:
    """Attention of packed rows: q [Nq, H, D], k, v [Nk, Hkv, D] -> [Nq, H, D].

    Row b's queries are q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] and its keys k[cu_seqlens_k[b]:...]; each row
    needs at least as many keys as queries. max_seqlen_q (a host int) sizes the grid; scale defaults to D^-1/2.
    """
    _check_qkv(q, k, v)
    _check_offsets(cu_seqlens_q, "cu_seqlens_q", q.device)
    _check_offsets(cu_seqlens_k, "cu_seqlens_k", q.device)
    num_rows = cu_seqlens_q.numel() - 1
    assert num_rows >= 0 and cu_seqlens_k.numel() == num_rows + 1, "cu_seqlens_q and cu_seqlens_k need B + 1 entries"
    assert max_seqlen_q >= 0, f"max_seqlen_q must be >= 0, got {max_seqlen_q}"
    out = torch.empty_like(q)
    if num_rows == 0 or max_seqlen_q == 0 or q.shape[0] == 0:
        return out
    return _launch(q, k, v, out, cu_seqlens_q, cu_seqlens_k, None, None, num_rows, max_seqlen_q, scale, causal, 1)


def flash_attention_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, max_seqlen_q: int, block_size: int,
                          scale: float | None = None) -> torch.Tensor:
    """Causal attention of packed new tokens q [N, H, D] over their rows' contexts in the paged KV cache.

    k_cache, v_cache: [slots, Hkv, D] with slot = block * block_size + offset; block_tables [B, M]; row b's
    queries are q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]], the last of its context_lens[b] positions (their own
    K and V already written to the cache). Returns [N, H, D].
    """
    _check_qkv(q, k_cache, v_cache)
    _check_offsets(cu_seqlens_q, "cu_seqlens_q", q.device)
    _check_offsets(context_lens, "context_lens", q.device)
    assert block_tables.dim() == 2 and block_tables.dtype in (torch.int32, torch.int64), \
        "block_tables must be a 2-d integer tensor"
    assert block_tables.shape[1] <= 1 or block_tables.stride(1) == 1, "block table rows must be contiguous"
    num_rows = block_tables.shape[0]
    assert cu_seqlens_q.numel() == num_rows + 1 and context_lens.numel() == num_rows, \
        f"{num_rows} block tables need {num_rows + 1} query offsets and {num_rows} context lengths"
    assert block_size >= 1 and k_cache.shape[0] % block_size == 0, \
        f"the cache's {k_cache.shape[0]} slots are not whole blocks of {block_size}"
    out = torch.empty_like(q)
    if num_rows == 0 or max_seqlen_q == 0 or q.shape[0] == 0:
        return out
    return _launch(q, k_cache, v_cache, out, cu_seqlens_q, None, block_tables, context_lens, num_rows, max_seqlen_q,
                   scale, True, block_size)


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, scale: float | None = None, causal: bool = True) -> torch.Tensor:
    """The reference in float32: each row's scores, bottom-right causal mask, softmax, weighted values."""
    H, HK, D = q.shape[1], k.shape[1], q.shape[2]
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].float().transpose(0, 1)  # [H, Lq, D]
        kb = k[ck[b]:ck[b + 1]].float().transpose(0, 1).repeat_interleave(H // HK, dim=0)  # [H, Lk, D]
        vb = v[ck[b]:ck[b + 1]].float().transpose(0, 1).repeat_interleave(H // HK, dim=0)
        scores = qb @ kb.transpose(1, 2) * scale  # [H, Lq, Lk]
        if causal:
            Lq, Lk = scores.shape[1], scores.shape[2]
            visible = torch.arange(Lk, device=q.device)[None] <= torch.arange(Lq, device=q.device)[:, None] + Lk - Lq
            scores = scores.masked_fill(~visible, float("-inf"))
        out[cq[b]:cq[b + 1]] = (scores.softmax(-1) @ vb).transpose(0, 1)
    return out


def flash_attention_cost(q_lens, k_lens, H: int, HK: int, D: int, dtype: torch.dtype, causal: bool = True) -> Cost:
    """FLOPs: two matmuls of 2 * Lq * Lk * D per head and row, only the visible part when causal (what
    FlashAttention's benchmarks count); bytes: q, k, v read and the output written once."""
    e = element_size(dtype)
    flops = 0
    for lq, lk in zip(q_lens, k_lens):
        visible = lq * lk - lq * (lq - 1) // 2 if causal else lq * lk  # bottom-right: the last lq rows of a triangle
        flops += 4 * visible * H * D
    return Cost(bytes=(2 * sum(q_lens) * H + 2 * sum(k_lens) * HK) * D * e, flops=flops)


__all__ = ["flash_attention", "flash_attention_paged", "flash_attention_ref", "flash_attention_cost"]
