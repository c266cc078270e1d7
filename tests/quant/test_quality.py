"""Quality measures: the sliding-window plan, perplexity against HF, greedy agreement, layer errors, texts."""

import hashlib
import importlib.util
import math

import pytest
import torch

from labkit.engine.engine import Engine
from labkit.quant.quality import (TextUnavailable, greedy_agreement, layer_errors, layer_hidden_states, load_text,
                            perplexity, sliding_windows)


@pytest.fixture(scope="module")
def pydoc_text():
    return load_text("pydoc")


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    return Engine.from_hf(tiny.model, tiny.tokenizer)


@pytest.fixture(scope="module")
def tiny_ids(tiny_engine, pydoc_text):
    return tiny_engine.encode(pydoc_text.text[:3000])[:300]


def _assert_idle(engine):
    assert engine.blocks.num_used_blocks == 0
    engine.blocks.check()


@pytest.mark.parametrize("num_tokens,context_len,stride",
                         [(10, 4, 1), (10, 4, 2), (10, 4, 3), (100, 32, 16), (33, 8, 7), (5, 512, 256), (2, 2, 1),
                          (64, 16, 15)])
def test_every_token_after_the_first_is_scored_exactly_once(num_tokens, context_len, stride):
    windows = sliding_windows(num_tokens, context_len, stride)
    counts = [0] * num_tokens
    for k, w in enumerate(windows):
        assert w.begin == k * stride and w.end - w.begin <= context_len
        assert w.begin < w.score_begin <= w.end  # a target needs a token before it in its window
        if k:  # later windows keep at least context_len - stride tokens of context before their targets
            assert w.score_begin - w.begin >= context_len - stride
        for t in range(w.score_begin, w.end):
            counts[t] += 1
    assert windows[-1].end == num_tokens
    assert counts == [0] + [1] * (num_tokens - 1)


def test_stride_equal_to_context_len_is_non_overlapping_chunks(tiny_engine, tiny_ids):
    ids = tiny_ids[:100]
    windows = sliding_windows(len(ids), 32, 32)
    assert [(w.begin, w.end, w.score_begin) for w in windows] == [(0, 32, 1), (32, 64, 33), (64, 96, 65),
                                                                  (96, 100, 97)]
    result = perplexity(tiny_engine, ids, context_len=32, stride=32)
    nll, count = 0.0, 0
    for start in range(0, len(ids), 32):  # each chunk read on its own, its first token unscored
        chunk = ids[start:start + 32]
        logits = tiny_engine.prompt_logits(chunk).double()
        nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    assert result.num_tokens == count == len(ids) - 4 and result.num_windows == 4
    assert result.nll == pytest.approx(nll / count, rel=1e-9)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-9)


def test_perplexity_matches_hf_model_and_leaks_no_blocks(tiny, tiny_engine, tiny_ids):
    ours = perplexity(tiny_engine, tiny_ids, context_len=64, stride=24, chunk_size=20)
    _assert_idle(tiny_engine)
    peer = perplexity(tiny.model, tiny_ids, context_len=64, stride=24)  # HF's own forward, same windows
    assert (ours.num_tokens, ours.num_windows) == (peer.num_tokens, peer.num_windows) == (len(tiny_ids) - 1, 11)
    assert ours.perplexity == pytest.approx(peer.perplexity, rel=1e-4)


def test_random_model_perplexity_is_of_the_order_of_its_vocabulary(tiny_engine, tiny_ids):
    vocab = tiny_engine.model.args.vocab_size
    result = perplexity(tiny_engine, tiny_ids, context_len=128, stride=64)
    assert vocab / 3 < result.perplexity < vocab * 3
    assert result.nll == pytest.approx(math.log(result.perplexity))


def test_embedded_model_perplexity_is_sane(embedded, pydoc_text):
    engine = Engine.from_hf(embedded.model, embedded.tokenizer)
    ids = engine.encode(pydoc_text.text[:3000])[:256]
    result = perplexity(engine, ids, context_len=160, stride=96)
    assert 2 < result.perplexity < 200  # a trained 135M model on English prose; a random one scores ~49152
    assert (result.num_tokens, result.num_windows) == (255, 2)
    _assert_idle(engine)


def test_identical_engines_agree_fully(tiny_engine, tiny_ids):
    prompts = [tiny_ids[:10], tiny_ids[50:57]]
    result = greedy_agreement(tiny_engine, tiny_engine, prompts, max_tokens=8)
    assert result.teacher_forced == result.free_running == 1.0
    assert result.tokens_to_divergence == [8, 8] and result.mean_tokens_to_divergence == 8
    assert result.num_positions == 16 and result.num_prompts == 2
    _assert_idle(tiny_engine)


def test_agreement_counts_tokens_to_the_first_divergence(tiny, tiny_engine, tiny_ids):
    int8 = Engine.from_hf(tiny.model, tiny.tokenizer, quantize="int8")
    prompts = [tiny_ids[i:i + 6] for i in range(0, 60, 12)]
    result = greedy_agreement(tiny_engine, int8, prompts, max_tokens=10)
    params = tiny_engine.sampling_params(max_new_tokens=10, ignore_eos=True, detokenize=False)
    ref = [g.tokens for g in tiny_engine.generate(prompts, params)]
    got = [g.tokens for g in int8.generate(prompts, params)]
    expected = [next((i for i in range(10) if r[i] != g[i]), 10) for r, g in zip(ref, got)]
    assert result.tokens_to_divergence == expected
    assert result.free_running == pytest.approx(sum(expected) / 50)
    assert 0 <= result.teacher_forced <= 1


def test_layer_states_rebuild_the_forward_and_errors_grow_from_zero(tiny, tiny_engine, tiny_ids):
    ids = tiny_ids[:40]
    net = tiny_engine.model
    states = layer_hidden_states(tiny_engine, ids)
    assert len(states) == net.args.num_layers + 1 and states[0].shape == (40, net.args.dim)
    # the last residual stream through the final norm and the head gives the engine's own logits
    logits = net.logits(net.kernels.rms_norm(states[-1], net.norm, net.args.norm_eps))
    torch.testing.assert_close(logits, tiny_engine.prompt_logits(ids), atol=1e-5, rtol=1e-5)
    chunked = layer_hidden_states(net, ids, chunk_size=7)  # a bare Transformer, prefilled in chunks
    for a, b in zip(states, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert layer_errors(tiny_engine, tiny_engine, ids) == [0.0] * net.args.num_layers
    int8 = Engine.from_hf(tiny.model, tiny.tokenizer, quantize="int8")
    errors = layer_errors(tiny_engine, int8, ids)
    assert len(errors) == net.args.num_layers and all(0 < e < 0.2 for e in errors)
    _assert_idle(tiny_engine)


@pytest.mark.parametrize("kwargs,named", [({"context_len": 1}, "1"), ({"stride": 0}, "0"),
                                          ({"context_len": 8, "stride": 9}, "9"), ({"context_len": 2.5}, "2.5"),
                                          ({"chunk_size": 0}, "chunk_size")])
def test_bad_window_values_raise_naming_the_value(tiny_engine, tiny_ids, kwargs, named):
    with pytest.raises(ValueError, match=named):
        perplexity(tiny_engine, tiny_ids[:20], **kwargs)


def test_bad_inputs_raise_value_errors(tiny_engine, tiny_ids):
    with pytest.raises(ValueError, match="got 1"):
        perplexity(tiny_engine, tiny_ids[:1])
    with pytest.raises(ValueError, match="99999"):
        perplexity(tiny_engine, [1, 2, 99999])
    with pytest.raises(ValueError, match="4096"):
        perplexity(tiny_engine, [1] * 4096, context_len=4096, stride=2048)
    with pytest.raises(ValueError, match="max_tokens"):
        greedy_agreement(tiny_engine, tiny_engine, [tiny_ids[:5]], max_tokens=0)
    with pytest.raises(ValueError, match="prompts"):
        greedy_agreement(tiny_engine, tiny_engine, [], max_tokens=4)
    with pytest.raises(ValueError, match="'nope'"):
        load_text("nope")
    with pytest.raises(ValueError, match="max_chars"):
        load_text("pydoc", max_chars=0)


def test_pydoc_text_is_long_and_deterministic(pydoc_text):
    again = load_text("pydoc")
    assert again == pydoc_text and pydoc_text.num_chars > 100_000
    assert pydoc_text.sha256 == hashlib.sha256(pydoc_text.text.encode()).hexdigest()
    short = load_text("pydoc", max_chars=500)
    assert short.text == pydoc_text.text[:500] and short.sha256 != pydoc_text.sha256
    assert short.describe() == {"text": "pydoc", "text_sha256": short.sha256, "text_chars": 500}


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_wikitext_without_datasets_says_so_and_suggests_pydoc():
    with pytest.raises(TextUnavailable, match="datasets.*pydoc"):
        load_text("wikitext-2")
