"""The labkit engine against HF transformers: logits, greedy tokens, batching, sampling, streaming.

Agreement with HF, EOS, text and bf16 run on the embedded model; the batching, policy and prefix-cache checks run
on `varied`, a tiny model whose greedy tokens change from step to step, so token identity still means something
(the tied tiny-smollm2 repeats its last token)."""

import pytest
import torch

from labkit.bench.hf import HFEngine, make_engine
from labkit.engine.engine import Engine
from labkit.model.llama import ModelArgs, UnsupportedArchitecture
from labkit.model.rewrites import packed_gemm_available
from labkit.model.loader import load_model

PROMPTS = ["Once upon a time, in a small village,", "The three primary colors are",
           "def fibonacci(n):\n", "Paris is the capital of"]


@pytest.fixture(scope="module")
def varied():
    """tiny-qwen2 (untied embeddings, random weights): fast, and its greedy tokens vary."""
    return load_model("tiny-qwen2", dummy=True, seed=4)


def assert_varied(outputs):
    """Token identity between runs proves nothing when every run repeats one token: demand varied outputs."""
    assert len({tuple(t) for t in outputs}) == len(outputs), outputs
    assert all(len(set(t)) > 1 for t in outputs if len(t) > 2), outputs


@pytest.fixture(scope="module")
def engines(embedded):
    return (Engine.from_hf(embedded.model, embedded.tokenizer, name=embedded.name),
            HFEngine(embedded.model, embedded.tokenizer, name=embedded.name))


def test_next_token_logits_match_hf(embedded, engines):
    engine, _ = engines
    for text in PROMPTS[:2]:
        ids = engine.encode(text)
        with torch.inference_mode():
            ref = embedded.model(torch.tensor([ids])).logits[0]
        # fp32 rounding over 30 layers, in an order that depends on the thread count: up to 1.6e-4 seen with one
        # thread, so the absolute part is 1e-5 of the largest logit (about 3e-4), as in the TP tests
        atol = 1e-5 * ref.abs().max().item()
        torch.testing.assert_close(engine.prompt_logits(ids), ref, atol=atol, rtol=1e-4)


def test_greedy_is_token_identical_to_hf_generate(engines):
    engine, hf = engines
    params = engine.sampling_params(max_new_tokens=32)  # both stop at EOS; most prompts run the full 32
    lengths = []
    for text in PROMPTS:
        ids = engine.encode(text)
        mine, ref = engine.generate([ids], params)[0], hf.generate([ids], params)[0]
        assert mine.tokens == ref.tokens, text
        assert mine.text == ref.text
        lengths.append(len(mine.tokens))
    assert sum(n == 32 for n in lengths) >= 3  # past two KV blocks of 16


def test_stops_at_eos_like_hf(engines):
    engine, hf = engines
    ids = engine.encode("What is 2+2?", chat=True)
    params = engine.sampling_params(max_new_tokens=64)
    mine, ref = engine.generate([ids], params)[0], hf.generate([ids], params)[0]
    assert mine.tokens == ref.tokens
    assert mine.finish_reason == ref.finish_reason == "stop"
    assert engine.eos_token_ids and not set(mine.tokens) & set(engine.eos_token_ids)


def test_ragged_batch_equals_one_by_one(engines):
    """On the embedded model's shapes (9 query heads over 3 KV heads); more batching checks run on `varied`."""
    engine, _ = engines
    prompts = [engine.encode(t) for t in PROMPTS]
    assert len({len(p) for p in prompts}) > 1
    params = engine.sampling_params(max_new_tokens=12, ignore_eos=True)
    batched = engine.generate(prompts, params)
    for p, b in zip(prompts, batched):
        assert b.tokens == engine.generate([p], params)[0].tokens


def test_equal_length_batch_matches_one_by_one(varied):
    engine = Engine.from_hf(varied.model)
    prompts = [list(range(3, 9)), list(range(60, 66)), [7, 1, 300, 5, 5, 42]]  # one length: the batched prefill
    params = engine.sampling_params(max_new_tokens=16, ignore_eos=True)
    solo = [engine.generate([p], params)[0].tokens for p in prompts]
    assert_varied(solo)
    assert [b.tokens for b in engine.generate(prompts, params)] == solo


def test_greedy_is_deterministic_and_stream_matches(engines):
    engine, _ = engines
    ids = engine.encode(PROMPTS[0])
    params = engine.sampling_params(max_new_tokens=16)
    first = engine.generate([ids], params)[0]
    assert engine.generate([ids], params)[0].tokens == first.tokens
    assert list(engine.stream(ids, params)) == first.tokens
    deltas = list(engine.stream_text(ids, params))
    assert "".join(d.text for d in deltas) == first.text
    assert deltas[-1].finish_reason == first.finish_reason
    assert sum(len(d.token_ids) for d in deltas) == len(first.tokens)


def test_stop_strings_cut_text(engines):
    engine, _ = engines
    ids = engine.encode(PROMPTS[0])
    full = engine.generate([ids], engine.sampling_params(max_new_tokens=24))[0].text
    stop = full.split()[2]
    cut = engine.generate([ids], engine.sampling_params(max_new_tokens=24, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    streamed = "".join(d.text for d in engine.stream_text(ids, engine.sampling_params(max_new_tokens=24,
                                                                                        stop=(stop,))))
    assert streamed == cut.text


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer)
    ids = engine.encode("hello world")
    sampled = engine.sampling_params(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    a, b = engine.generate([ids], sampled)[0], engine.generate([ids], sampled)[0]
    assert a.tokens == b.tokens
    greedy = engine.generate([ids], engine.sampling_params(max_new_tokens=12))[0]
    top1 = engine.generate([ids], engine.sampling_params(max_new_tokens=12, temperature=0.7, top_k=1, seed=1))[0]
    assert top1.tokens == greedy.tokens


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_architectures_match_hf_logits(preset):
    lm = load_model(preset, dummy=True, seed=1)
    engine = Engine.from_hf(lm.model)
    ids = list(range(3, 40))
    with torch.inference_mode():
        ref = lm.model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.prompt_logits(ids), ref, atol=1e-4, rtol=1e-4)
    params = engine.sampling_params(max_new_tokens=20, ignore_eos=True)
    assert engine.generate([ids], params)[0].tokens == HFEngine(lm.model).generate([ids], params)[0].tokens


def test_llama3_rope_scaling_matches_hf():
    lm = load_model(dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=4096, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=64)),
                    dummy=True, seed=2)
    engine = Engine.from_hf(lm.model)
    ids = list(range(1, 200))
    with torch.inference_mode():
        ref = lm.model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.prompt_logits(ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 16, 25])
def test_chunked_prefill_equals_one_pass(tiny, chunk):
    engine = Engine.from_hf(tiny.model)
    ids = list(range(5, 45))
    torch.testing.assert_close(engine.prompt_logits(ids, chunk_size=chunk), engine.prompt_logits(ids),
                               atol=1e-5, rtol=1e-5)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_math_attention_backend_matches_sdpa():
    lm = load_model("tiny-qwen2", dummy=True, seed=4)
    sdpa, math = Engine.from_hf(lm.model), Engine.from_hf(lm.model, attention="math")
    prompts = [list(range(3, 20)), list(range(5, 12)), [9] * 30]
    ids = prompts[0]
    torch.testing.assert_close(sdpa.prompt_logits(ids), math.prompt_logits(ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa.prompt_logits(ids, chunk_size=5), math.prompt_logits(ids, chunk_size=5),
                               atol=1e-5, rtol=1e-5)
    params = sdpa.sampling_params(max_new_tokens=10, ignore_eos=True)
    assert [g.tokens for g in sdpa.generate(prompts, params)] == [g.tokens for g in math.generate(prompts, params)]


def test_unsupported_architecture_names_the_hf_fallback():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitecture, match="--engine hf"):
        ModelArgs.from_hf(GPT2Config())


def test_bad_requests_are_clear(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer)
    with pytest.raises(ValueError, match="context"):
        engine.generate([[1] * 2000], engine.sampling_params(max_new_tokens=100))
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], engine.sampling_params(max_new_tokens=1))
    with pytest.raises(ValueError, match="'flash9'"):
        Engine.from_hf(tiny.model, attention="flash9")
    with pytest.raises(ValueError, match="99999"):
        engine.generate([[1, 99999]], engine.sampling_params(max_new_tokens=1))
    with pytest.raises(ValueError, match="'jax'"):
        make_engine("jax", tiny)


def test_bf16_engine_runs_and_mostly_agrees(engines, embedded):
    engine, _ = engines
    bf16 = Engine.from_hf(embedded.model, embedded.tokenizer, dtype="bf16")
    assert bf16.model.embed.weight.dtype == torch.bfloat16
    ids = engine.encode(PROMPTS[0])
    params = engine.sampling_params(max_new_tokens=8, ignore_eos=True)
    # bf16 rounding may change late tokens; the first few agree on this prompt
    assert bf16.generate([ids], params)[0].tokens[:4] == engine.generate([ids], params)[0].tokens[:4]


@pytest.fixture(scope="module")
def compiled_pair(tiny):
    """An eager engine and one compiled engine, shared by the compile tests: each compile takes seconds. The
    compiled one runs MKL's GEMM (gemm="plain"), so that its batched decode runs the compiled step too."""
    return Engine.from_hf(tiny.model), Engine.from_hf(tiny.model, compile=True, gemm="plain")


def test_compiled_decode_matches_eager(compiled_pair):
    eager, compiled = compiled_pair
    ids = list(range(7, 30))
    params = eager.sampling_params(max_new_tokens=12, ignore_eos=True)
    assert compiled.warmup() > 0 and compiled.compile_s is not None
    assert compiled.generate([ids], params)[0].tokens == eager.generate([ids], params)[0].tokens


@pytest.mark.gpu
def test_gpu_greedy_matches_hf_on_dummy_1b():
    lm = load_model("llama-1b", dummy=True, device="cuda", dtype="bf16")
    engine = Engine.from_hf(lm.model)
    ids = list(range(100, 164))
    params = engine.sampling_params(max_new_tokens=32, ignore_eos=True)
    mine = engine.generate([ids], params)[0].tokens
    ref = HFEngine(lm.model).generate([ids], params)[0].tokens
    # bf16 on GPU: kernels differ in accumulation order; demand agreement on the first tokens
    assert mine[:8] == ref[:8]


# -- the step-level engine: policies, preemption, aborts, per-row sampling, prefix caching -------------------
# six ragged prompts (4 to 12 tokens) and output lengths: a chunked prefill, a one-token answer, late joiners
POLICY_PROMPTS = [list(range(3, 8)), [9, 4, 4, 120, 7, 300, 2, 11], list(range(200, 212)), [450, 17, 3, 98, 5],
                  [61, 62, 63, 64], [8, 300, 8, 301, 8, 302, 8, 303, 9]]
POLICY_NEW_TOKENS = (3, 17, 9, 1, 12, 6)


def _solo_tokens(engine, prompts, params):
    return [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]


def _run_all(engine, prompts, params, on_step=None):
    """Add every request, step to the end (checking the block bookkeeping each step); tokens per request."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    got = {rid: [] for rid in ids}
    steps = 0
    while engine.has_unfinished:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
        engine.blocks.check()
        assert engine.stats().num_running <= engine.config.scheduler.max_num_seqs
        steps += 1
        if on_step:
            on_step(steps, ids)
    return [got[rid] for rid in ids]


@pytest.fixture(scope="module")
def policy_setup(varied):
    """One compact model, the requests' params and their solo greedy tokens, shared by the three policies."""
    from labkit.model.rewrites import apply_rewrites
    from labkit.model.llama import from_hf

    model = apply_rewrites(from_hf(varied.model))
    solo = Engine(model, max_num_seqs=1)
    params = [solo.sampling_params(max_new_tokens=n, ignore_eos=True) for n in POLICY_NEW_TOKENS]
    expected = _solo_tokens(solo, POLICY_PROMPTS, params)
    assert_varied(expected)
    return model, params, expected


@pytest.mark.parametrize("policy", ["static", "dynamic", "continuous"])
def test_every_policy_gives_each_request_its_solo_greedy_tokens(policy_setup, policy):
    model, params, expected = policy_setup
    # a small step budget forces chunked prefill; three rows at a time with six requests forces joining
    engine = Engine(model, policy=policy, max_num_seqs=3, max_num_batched_tokens=8, max_wait_s=0.0)
    assert _run_all(engine, POLICY_PROMPTS, params) == expected
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_preemption_and_aborts_leave_no_block_behind(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer, max_num_seqs=8, num_kv_blocks=12, block_size=4)
    solo = Engine.from_hf(tiny.model, tiny.tokenizer)
    prompts = [list(range(10 + i, 20 + 2 * i)) for i in range(8)]
    params = [solo.sampling_params(max_new_tokens=30, ignore_eos=True) for _ in prompts]
    aborted = set()

    def abort_some(step, ids):
        if step == 3:  # one running, one still waiting
            for rid in (ids[1], ids[7]):
                assert engine.abort(rid)
                aborted.add(rid)

    tokens = _run_all(engine, prompts, params, on_step=abort_some)
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.has_unfinished
    expected = _solo_tokens(solo, prompts, params)
    for i, (got, want) in enumerate(zip(tokens, expected)):
        if str(i) not in aborted:
            assert got == want, i
    assert not engine.abort("1") and not engine.abort("no such request")


def test_mixed_sampling_in_one_batch_gives_each_request_its_solo_result(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer, max_num_seqs=8)
    prompts = [engine.encode(t) for t in ("hello world", "one two three four", "a", "the cat sat on the")]
    params = [engine.sampling_params(max_new_tokens=16, temperature=0.8, seed=1, ignore_eos=True),
              engine.sampling_params(max_new_tokens=10, ignore_eos=True),
              engine.sampling_params(max_new_tokens=12, temperature=1.3, top_k=20, seed=7, ignore_eos=True),
              engine.sampling_params(max_new_tokens=14, temperature=1.0, top_p=0.6, seed=3, ignore_eos=True)]
    batched = [g.tokens for g in engine.generate(prompts, params)]
    assert batched == _solo_tokens(engine, prompts, params)
    assert batched[0] != batched[0][:1] * len(batched[0])  # really sampled, not stuck on one token


def test_prefix_cache_hits_do_not_change_outputs(varied):
    engine = Engine.from_hf(varied.model)
    uncached = Engine(engine.model, enable_prefix_caching=False)
    system = [(7 * i) % 500 + 3 for i in range(38)]  # a shared 38-token system prompt: two full blocks of 16
    prompts = [system + q for q in ([40, 41, 42, 43, 44, 45, 46], [300, 2, 5])]
    params = engine.sampling_params(max_new_tokens=12, ignore_eos=True)
    first = engine.generate([prompts[0]], params)[0]
    rid = engine.add_request(prompts[1], params)
    outs = []
    while engine.has_unfinished:
        outs += [o for o in engine.step() if o.request_id == rid]
    assert outs[-1].num_cached_tokens == len(system) // 16 * 16 > 0
    assert [t for o in outs for t in o.new_token_ids] == uncached.generate([prompts[1]], params)[0].tokens
    assert first.tokens == uncached.generate([prompts[0]], params)[0].tokens
    assert_varied([first.tokens, [t for o in outs for t in o.new_token_ids]])
    assert engine.stats().prefix_hit_rate > 0


def test_requests_join_a_running_batch(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer)
    params = engine.sampling_params(max_new_tokens=12, ignore_eos=True)
    a = engine.add_request(list(range(5, 25)), params)
    got = {a: []}
    for step in range(20):
        if step == 4:
            b = engine.add_request(list(range(30, 37)), params)
            got[b] = []
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            assert out.num_prompt_tokens == (20 if out.request_id == a else 7)
        stats = engine.stats()  # the step as --enable-logging-iteration-details splits it
        context = {0: (1, 20), 4: (1, 7)}.get(step, (0, 0))  # a's prompt; b's prompt beside a's decode row
        assert (stats.last_num_context_rows, stats.last_num_context_tokens) == context and stats.last_step_s > 0
        if step == 4:
            assert (stats.last_batch_size, stats.last_num_tokens) == (2, 8)  # b's prefill rides along a's decode
    assert not engine.has_unfinished
    assert got[a] == engine.generate([list(range(5, 25))], params)[0].tokens
    assert got[b] == engine.generate([list(range(30, 37))], params)[0].tokens


def test_a_chunked_prompts_steps_count_as_context_to_its_last_chunk(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer, max_num_batched_tokens=8)
    engine.add_request(list(range(5, 22)), engine.sampling_params(max_new_tokens=2, ignore_eos=True))
    split = []
    while engine.has_unfinished:
        engine.step()
        stats = engine.stats()
        split.append((stats.last_num_context_rows, stats.last_num_context_tokens, stats.last_num_tokens))
    assert split == [(1, 8, 8), (1, 8, 8), (1, 1, 1), (0, 0, 1)]  # 17 prompt tokens: 8 + 8 + 1, then a decode


def test_a_padded_static_batchs_step_log_leaves_its_padding_out(tiny, caplog):
    from labkit.serving.worker import log_iteration

    engine = Engine.from_hf(tiny.model, tiny.tokenizer, policy="static", max_num_seqs=2)
    params = engine.sampling_params(max_new_tokens=3, ignore_eos=True)
    engine.add_request(list(range(5, 15)), params)  # 10 tokens
    engine.add_request(list(range(5, 11)), params)  # 6, padded to 10
    engine.step()
    stats = engine.stats()
    assert (stats.last_num_context_rows, stats.last_num_context_tokens, stats.last_num_padding_tokens,
            stats.last_num_tokens) == (2, 16, 4, 20)
    with caplog.at_level("INFO", logger="labkit.serving.server"):
        log_iteration(stats)
    assert "2 context requests, 16 context tokens, 0 generation requests, 0 generation tokens" in caplog.text


def test_open_api_errors_are_clear(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer, num_kv_blocks=4, block_size=4)
    params = engine.sampling_params(max_new_tokens=4)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request(list(range(1, 20)), params)
    with pytest.raises(ValueError, match="-3"):
        engine.add_request([1, -3], params)
    rid = engine.add_request([1, 2, 3], params, request_id="r1")
    with pytest.raises(ValueError, match="'r1'"):
        engine.add_request([1, 2], params, request_id="r1")
    with pytest.raises(RuntimeError, match="step"):
        engine.generate([[1, 2]], params)
    assert engine.abort(rid) and engine.blocks.num_free_blocks == 4
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.add_request([1], {"max_new_tokens": 3})


def test_closing_a_stream_aborts_its_request(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer)
    stream = engine.stream(list(range(3, 9)), engine.sampling_params(max_new_tokens=50, ignore_eos=True))
    assert len([next(stream) for _ in range(5)]) == 5
    stream.close()
    assert not engine.has_unfinished and engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_compiled_ragged_batch_matches_eager(compiled_pair):
    eager, compiled = compiled_pair
    prompts = [list(range(7, 30)), list(range(3, 8)), list(range(40, 41))]  # 3 rows: padded to a bucket of 4
    params = eager.sampling_params(max_new_tokens=10, ignore_eos=True)
    assert [g.tokens for g in compiled.generate(prompts, params)] == [g.tokens for g in eager.generate(prompts, params)]


@pytest.mark.skipif(not packed_gemm_available(), reason="needs torch with oneDNN on an x86 CPU")
def test_compiled_engine_leaves_few_row_decode_to_the_packed_eager_step(tiny, monkeypatch):
    engine = Engine.from_hf(tiny.model, compile=True)
    assert "gemm:packed" in engine.model.rewrites
    static_rows = []
    forward_static = engine.runner.forward_static
    monkeypatch.setattr(engine.runner, "forward_static",
                        lambda spans: static_rows.append(len(spans)) or forward_static(spans))
    params = engine.sampling_params(max_new_tokens=4, ignore_eos=True)
    one = engine.generate([list(range(7, 30))], params)[0].tokens
    two = engine.generate([list(range(7, 30)), list(range(3, 8))], params)
    assert static_rows and set(static_rows) == {1}  # one row: compiled; two rows: eager over the packed weights
    assert two[0].tokens == one
