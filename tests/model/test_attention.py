"""Paged attention against dense causal attention on scattered blocks, mixed query lengths, both backends."""

import random

import pytest
import torch

from labkit.model.attention import AttentionMetadata, build_metadata, paged_attention
from labkit.model.backends import ATTENTION_BACKENDS, attention_backend
from labkit.model.kv_cache import KVCache, write_kv

H, HKV, D, BS = 6, 2, 8, 4


def backend_core(name):
    """The backend's core; the Triton one only where its kernels can run (a GPU, or the interpreter)."""
    if name == "triton":
        from labkit.kernels.common import INTERPRETER_HINT, can_run_on

        if not can_run_on("cpu"):
            pytest.skip(f"the triton backend on the CPU: {INTERPRETER_HINT}")
    return attention_backend(name)


def dense_reference(q, k, v):
    """Causal attention of one row's queries q [T, H, D] over its whole context k, v [S, HKV, D], in float64."""
    T, S = q.shape[0], k.shape[0]
    k = k.double().repeat_interleave(H // HKV, dim=1)
    v = v.double().repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) * D**-0.5
    pos = torch.arange(S - T, S)[:, None]
    scores = scores.masked_fill(torch.arange(S)[None, :] > pos, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v).float()


def scattered_rows(query_lens, context_lens, num_blocks=64, seed=0):
    """A cache holding each row's earlier tokens in randomly placed blocks, and the step's new q, k, v."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(1, num_blocks, BS, HKV, D, "cpu", torch.float32)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, slots, ks, vs, qs, full = [], [], [], [], [], []
    for T, S in zip(query_lens, context_lens):
        table = [free.pop() for _ in range(-(-S // BS))]
        k_all, v_all = torch.randn(S, HKV, D, generator=gen), torch.randn(S, HKV, D, generator=gen)
        old = torch.tensor([table[p // BS] * BS + p % BS for p in range(S - T)], dtype=torch.long)
        write_kv(cache.k[0], cache.v[0], k_all[: S - T], v_all[: S - T], old)
        tables.append(table)
        slots += [table[p // BS] * BS + p % BS for p in range(S - T, S)]
        ks.append(k_all[S - T:])
        vs.append(v_all[S - T:])
        qs.append(torch.randn(T, H, D, generator=gen))
        full.append((k_all, v_all))
    meta = build_metadata(list(query_lens), list(context_lens), tables, slots, BS, "cpu")
    return cache, meta, torch.cat(qs), torch.cat(ks), torch.cat(vs), qs, full


@pytest.mark.parametrize("backend", sorted(ATTENTION_BACKENDS))
@pytest.mark.parametrize("query_lens, context_lens", [
    ([1], [1]),  # a one-token prompt
    ([7], [7]),  # a fresh prompt: causal over its own tokens
    ([5], [13]),  # a prefill chunk after cached tokens
    ([9, 9], [9, 9]),  # equal fresh prompts, one batched call
    ([6, 3, 1, 1, 1], [6, 10, 17, 4, 9]),  # prefill, chunk and ragged decode rows in one step
    ([1, 1, 1], [5, 5, 5]),  # equal decode rows: no mask needed
    ([4, 4, 2], [4, 11, 2]),  # equal query lengths, one fresh and one after a cached prefix
])
def test_paged_attention_matches_dense_causal_attention(backend, query_lens, context_lens):
    cache, meta, q, k, v, qs, full = scattered_rows(query_lens, context_lens)
    write_kv(cache.k[0], cache.v[0], k, v, meta.slot_mapping)
    out = paged_attention(q, k, v, cache.k[0], cache.v[0], meta, D**-0.5, backend_core(backend))
    expected = torch.cat([dense_reference(qi, ki, vi) for qi, (ki, vi) in zip(qs, full)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", sorted(ATTENTION_BACKENDS))
def test_static_decode_path_matches_the_planned_one(backend):
    """The compiled step's shape-static path (whole block tables, masked) equals the grouped path."""
    core = backend_core(backend)
    query_lens, context_lens = [1, 1, 1, 1], [3, 16, 9, 1]
    cache, meta, q, k, v, _, _ = scattered_rows(query_lens, context_lens, seed=3)
    write_kv(cache.k[0], cache.v[0], k, v, meta.slot_mapping)
    planned = paged_attention(q, k, v, cache.k[0], cache.v[0], meta, D**-0.5, core)
    static = AttentionMetadata(positions=meta.positions, slot_mapping=meta.slot_mapping,
                               block_tables=torch.nn.functional.pad(meta.block_tables, (0, 3)),
                               context_lens=meta.context_lens, query_start=None, block_size=BS)
    torch.testing.assert_close(paged_attention(q, k, v, cache.k[0], cache.v[0], static, D**-0.5, core), planned,
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("query_lens, context_lens", [
    ([1, 1, 1], [5, 5, 5]),  # equal decode rows
    ([1, 1, 1, 1], [3, 16, 9, 1]),  # ragged decode rows: masked
    ([6, 3, 1, 1], [6, 10, 17, 4]),  # prefill, a chunk and decode rows in one step
])
def test_bf16_paged_attention_stays_within_bf16_of_the_dense_reference(backend, query_lens, context_lens):
    """A bf16 cache and bf16 queries (one-token rows take the two-matmul path on a CPU) match fp64 attention over
    the same bf16-rounded inputs to bf16's precision."""
    cache, meta, q, k, v, qs, full = scattered_rows(query_lens, context_lens)
    bf = KVCache(1, cache.num_blocks, BS, HKV, D, "cpu", torch.bfloat16)
    bf.k[0].copy_(cache.k[0])
    bf.v[0].copy_(cache.v[0])
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    write_kv(bf.k[0], bf.v[0], k, v, meta.slot_mapping)
    out = paged_attention(q, k, v, bf.k[0], bf.v[0], meta, D**-0.5, attention_backend(backend))
    assert out.dtype == torch.bfloat16
    rounded = [(ki.bfloat16().float(), vi.bfloat16().float()) for ki, vi in full]
    expected = torch.cat([dense_reference(qi.bfloat16().float(), ki, vi) for qi, (ki, vi) in zip(qs, rounded)])
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=2e-2)


def test_metadata_positions_slots_and_groups():
    meta = build_metadata([3, 1, 1], [3, 6, 2], [[4], [1, 7], [0]], [16, 17, 18, 29, 1], 4, "cpu")
    assert meta.positions.tolist() == [0, 1, 2, 5, 1]
    assert meta.query_start.tolist() == [0, 3, 4, 5]
    assert meta.block_tables.tolist() == [[4, 0], [1, 7], [0, 0]]
    fresh, decode = meta.groups
    assert fresh.is_fresh and fresh.is_causal and fresh.slots is None
    # the decode rows are gathered by whole blocks: 2 blocks of 4 keys, the slots past each context masked
    assert decode.rows == slice(1, 3) and decode.num_keys == 8 and decode.mask.shape == (2, 1, 1, 8)
    assert decode.slots.tolist() == [1, 7, 0, 0]
    assert decode.mask[0, 0, 0].tolist() == [True] * 6 + [False] * 2
    assert decode.mask[1, 0, 0].tolist() == [True, True] + [False] * 6


def test_kv_cache_rejects_empty_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        KVCache(1, 0, 4, 1, 8, "cpu", torch.float32)
