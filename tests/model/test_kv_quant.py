"""The int8 KV cache: the quantizer's error bound, paged attention against the float cache, the embedded model's
logits and greedy tokens against an fp32 cache, the memory accounting, and the refusals."""

import random

import pytest
import torch
import torch.nn.functional as F

from labkit.engine import Engine, EngineConfig
from labkit.model.attention import AttentionMetadata, build_metadata, paged_attention
from labkit.model.backends import attention_backend
from labkit.model.kv_cache import Int8KV, KVCache, dequantize_kv, quantize_kv, write_kv
from labkit.model.rewrites import apply_rewrites
from labkit.model.llama import from_hf
from labkit.model.sampling import SamplingParams

H, HKV, D, BS = 6, 2, 64, 4
CORES = {name: attention_backend(name) for name in ("sdpa", "math")}
# Unit-normal q, k, v with D = 64: each cached element is off by at most absmax / 254 (absmax ~3, so ~0.012);
# a score q.k moves by about 0.012 * |q| / sqrt(D) ~ 0.01 and the softmax-weighted values by as much again.
ATTENTION_ATOL = 0.03


def test_round_trip_is_within_half_a_step_of_each_heads_absmax():
    gen = torch.Generator().manual_seed(0)
    # heads of very different magnitudes: each gets its own scale
    x = torch.randn(37, HKV, D, generator=gen) * torch.logspace(-3, 2, 37)[:, None, None]
    x[5, 1] = 0  # an all-zero head stays exactly zero
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (37, HKV, 1)
    assert codes.abs().max() <= 127
    back = dequantize_kv(codes, scale, torch.float32)
    absmax = x.abs().amax(-1, keepdim=True)
    assert ((back - x).abs() <= absmax / 254 * (1 + 1e-5)).all()
    assert (back[5, 1] == 0).all()
    assert dequantize_kv(codes, scale, torch.bfloat16).dtype == torch.bfloat16


def _two_caches(query_lens, context_lens, num_blocks=48, seed=0):
    """A float and an int8 cache holding the same earlier tokens of each row in random blocks, both given the
    step's new k, v; returns them with the metadata and q, k, v."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    caches = KVCache(1, num_blocks, BS, HKV, D, "cpu", torch.float32), KVCache(1, num_blocks, BS, HKV, D, "cpu",
                                                                                torch.int8)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, slots, ks, vs = [], [], [], []
    for T, S in zip(query_lens, context_lens):
        table = [free.pop() for _ in range(-(-S // BS))]
        k_all, v_all = torch.randn(S, HKV, D, generator=gen), torch.randn(S, HKV, D, generator=gen)
        old = torch.tensor([table[p // BS] * BS + p % BS for p in range(S - T)], dtype=torch.long)
        for cache in caches:
            write_kv(cache.k[0], cache.v[0], k_all[: S - T], v_all[: S - T], old)
        tables.append(table)
        slots += [table[p // BS] * BS + p % BS for p in range(S - T, S)]
        ks.append(k_all[S - T:])
        vs.append(v_all[S - T:])
    meta = build_metadata(list(query_lens), list(context_lens), tables, slots, BS, "cpu")
    k, v = torch.cat(ks), torch.cat(vs)
    for cache in caches:
        write_kv(cache.k[0], cache.v[0], k, v, meta.slot_mapping)
    q = torch.randn(sum(query_lens), H, D, generator=gen)
    return caches, meta, q, k, v


@pytest.mark.parametrize("core", sorted(CORES))
@pytest.mark.parametrize("query_lens, context_lens", [
    ([5], [13]),  # a prefill chunk after cached tokens (one row: a view of consecutive blocks, or gathered)
    ([6, 3, 1, 1, 1], [6, 10, 17, 4, 9]),  # a fresh prompt, a chunk and ragged decode rows in one step
    ([1, 1, 1], [5, 5, 5]),  # equal decode rows
])
def test_int8_paged_attention_is_close_to_the_float_cache(core, query_lens, context_lens):
    (fp, q8), meta, q, k, v = _two_caches(query_lens, context_lens)
    assert isinstance(q8.k[0], Int8KV) and q8.k[0].codes.dtype == torch.int8
    want = paged_attention(q, k, v, fp.k[0], fp.v[0], meta, D**-0.5, CORES[core])
    got = paged_attention(q, k, v, q8.k[0], q8.v[0], meta, D**-0.5, CORES[core])
    assert got.dtype == want.dtype == torch.float32
    err = (got - want).abs()
    assert err.max() <= ATTENTION_ATOL, err.max()
    assert err.max() > 0  # the int8 cache is really read (a cached context is never exact)
    if query_lens[0] == context_lens[0]:  # a fresh prompt attends to its own exact k, v: no error at all
        assert err[: query_lens[0]].max() == 0


@pytest.mark.parametrize("core", sorted(CORES))
def test_int8_static_decode_path_matches_the_planned_one_and_compiles_without_breaks(core):
    """The compiled step's path (whole block tables, masked; meta.groups None) equals the grouped one, and traces
    into one graph (no host syncs, no branches on tensor values)."""
    (_, q8), meta, q, k, v = _two_caches([1, 1, 1, 1], [3, 16, 9, 1], seed=3)
    planned = paged_attention(q, k, v, q8.k[0], q8.v[0], meta, D**-0.5, CORES[core])
    static = AttentionMetadata(positions=meta.positions, slot_mapping=meta.slot_mapping,
                               block_tables=F.pad(meta.block_tables, (0, 3)), context_lens=meta.context_lens,
                               query_start=None, block_size=BS)

    def step(q, k, v, cache, meta):
        write_kv(cache.k[0], cache.v[0], k, v, meta.slot_mapping)
        return paged_attention(q, k, v, cache.k[0], cache.v[0], meta, D**-0.5, CORES[core])

    torch.testing.assert_close(step(q, k, v, q8, static), planned, atol=1e-6, rtol=1e-6)
    traced = torch.compile(step, fullgraph=True, dynamic=False, backend="eager")  # dynamo only: no C++ build
    torch.testing.assert_close(traced(q, k, v, q8, static), planned, atol=1e-6, rtol=1e-6)


def test_bytes_per_block_count_codes_and_scales():
    fp32 = KVCache.bytes_per_block(30, 16, 3, 64, torch.float32)
    int8 = KVCache.bytes_per_block(30, 16, 3, 64, torch.int8)
    assert fp32 == 2 * 30 * 16 * 3 * 64 * 4
    assert int8 == 2 * 30 * 16 * 3 * (64 + 4)  # one int8 per element, one float32 scale per slot and head
    assert fp32 / int8 == pytest.approx(256 / 68)  # 3.76x the blocks in the same memory
    assert KVCache.bytes_per_block(30, 16, 3, 64, torch.bfloat16) / int8 == pytest.approx(128 / 68)
    cache = KVCache(2, 5, 4, 3, 64, "cpu", torch.int8)
    assert cache.nbytes == (5 + 1) * KVCache.bytes_per_block(2, 4, 3, 64, torch.int8)  # the scratch block too
    assert cache.k[0].shape == (6 * 4, 3, 64)


def test_engine_fits_more_int8_blocks_in_the_same_memory(tiny):
    model = from_hf(tiny.model)
    fp = Engine(model, kv_cache_mb=4, max_num_seqs=1024)  # enough rows that memory, not rows, is the limit
    q8 = Engine(model, kv_cache_mb=4, max_num_seqs=1024, kv_cache_dtype="int8")
    assert fp.describe()["kv_cache_dtype"] == "fp32" and q8.describe()["kv_cache_dtype"] == "int8"
    args = tiny.model.config
    head_dim = args.hidden_size // args.num_attention_heads
    ratio = head_dim * 4 / (head_dim + 4)
    assert q8.blocks.num_blocks / fp.blocks.num_blocks == pytest.approx(ratio, rel=0.01)
    assert q8.cache.nbytes <= 4 * 2**20 + KVCache.bytes_per_block(args.num_hidden_layers, 16, q8.model.num_kv_heads,
                                                                   head_dim, torch.int8)  # budget + scratch


def test_embedded_logits_and_greedy_tokens_with_an_int8_cache(embedded):
    model = apply_rewrites(from_hf(embedded.model))  # one compact model behind both caches
    fp = Engine(model, embedded.tokenizer, num_kv_blocks=32)
    q8 = Engine(model, embedded.tokenizer, num_kv_blocks=32, kv_cache_dtype="int8")
    ids = fp.encode("Once upon a time, in a small village,")
    tokens = q8.generate([ids], SamplingParams(max_new_tokens=16, ignore_eos=True, detokenize=False))[0].tokens
    full = ids + tokens
    exact = fp.prompt_logits(full)  # fp32 in one pass: its greedy choice after every prefix of int8's tokens
    # int8 over the same tokens, prefilled in chunks of 8 so every chunk after the first reads the int8 cache
    chunked = q8.prompt_logits(full, chunk_size=8)
    cosine = F.cosine_similarity(exact, chunked, dim=-1)
    assert cosine.min() > 0.99, cosine.min()  # measured 0.9998
    assert (exact.argmax(-1) == chunked.argmax(-1)).float().mean() >= 0.9  # measured 0.96 (near-ties flip)
    fp_choice = exact[len(ids) - 1:-1].argmax(-1).tolist()  # what fp32 greedy picks where int8 picked tokens[i]
    assert fp_choice[:12] == tokens[:12]  # measured: all 16 of int8's greedy tokens are fp32's
    assert q8.blocks.num_free_blocks == q8.blocks.num_blocks  # nothing leaked


def test_bad_kv_cache_dtypes_and_backends_that_read_blocks_in_place_are_refused(tiny):
    with pytest.raises(ValueError, match=r"'fp8'.*auto, int8"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' is not supported with attention='triton'"):
        Engine(from_hf(tiny.model, attention="triton"), kv_cache_dtype="int8")


@pytest.mark.gpu
def test_gpu_int8_cache_under_cuda_graphs_matches_eager():
    from labkit.model.loader import load_model

    lm = load_model("tiny-smollm2", dummy=True, device="cuda", dtype="bf16")
    eager = Engine.from_hf(lm.model, kv_cache_dtype="int8")
    graphs = Engine.from_hf(lm.model, kv_cache_dtype="int8", cuda_graphs=True)
    prompts = [list(range(7, 30)), [3, 4, 5]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, detokenize=False)
    assert [g.tokens for g in graphs.generate(prompts, params)] == [g.tokens for g in eager.generate(prompts, params)]
