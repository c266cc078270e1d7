"""Every draft, on the embedded model: greedy speculative decoding is token-identical to plain greedy decoding,
alone and in a batch, with fixed and adaptive gamma, and leaves no KV block in use."""

import dataclasses

import pytest
import torch

from labkit.engine.spec_decode import proposers as drafts
from labkit.speculative.training import TRAIN_SIZES, load_or_train
from labkit.engine.engine import Engine
from labkit.model.rewrites import apply_rewrites
from labkit.model.llama import from_hf
from labkit.model.sampling import SamplingParams
from labkit.engine.spec_decode.speculator import SpeculativeConfig, Speculator

TEXTS = [("Once upon a time, in a small village,", False), ("What are three tips for staying healthy?", True),
         ("Repeat this sentence: the quick brown fox jumps over the lazy dog, and the dog sleeps on.", True)]
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def setup(embedded):
    plain = Engine(apply_rewrites(from_hf(embedded.model), gemm="plain"), embedded.tokenizer)  # MKL's GEMM only
    prompts = [plain.encode(t, chat=c) for t, c in TEXTS]
    params = plain.sampling_params(max_new_tokens=NUM_TOKENS)
    reference = [g.tokens for g in plain.generate(prompts, params)]
    target = apply_rewrites(from_hf(embedded.model))  # as `labkit bench spec` runs it: oneDNN-packed weights
    # learned drafts of the smoke size on a quarter of its corpus (3 answers of 12 tokens), trained here, not
    # saved: CI never relies on the cache, and these drafts only have to propose tokens, not good ones
    config = dataclasses.replace(TRAIN_SIZES["smoke"], num_sequences=3, max_new_tokens=12)
    trained = load_or_train(("draft", "medusa", "eagle"), target, embedded.tokenizer, size="smoke", save=False,
                            config=config)
    proposers = {"ngram": drafts.NgramProposer(), "self-int8": drafts.ModelProposer(drafts.self_draft(target))}
    proposers.update({kind: t.proposer(target) for kind, t in trained.items()})
    return target, embedded.tokenizer, prompts, params, reference, proposers


@pytest.mark.parametrize("name", ["ngram", "self-int8", "draft", "medusa", "eagle"])
def test_greedy_speculation_is_token_identical_alone_and_in_a_batch(setup, name):
    target, tokenizer, prompts, params, reference, proposers = setup
    engine = Engine(target, tokenizer, speculator=Speculator(proposers[name], SpeculativeConfig(num_speculative_tokens=3)))
    assert [g.tokens for g in engine.generate(prompts, params)] == reference
    assert engine.generate([prompts[2]], params)[0].tokens == reference[2]
    stats = engine.speculator.stats
    assert stats.num_draft_tokens > 0 and stats.num_rows > 0
    engine.blocks.check()
    assert engine.blocks.num_used_blocks == 0


def test_adaptive_gamma_is_token_identical(setup):
    target, tokenizer, prompts, params, reference, proposers = setup
    spec = Speculator(proposers["ngram"], SpeculativeConfig(num_speculative_tokens=2, gamma_policy="adaptive"))
    engine = Engine(target, tokenizer, speculator=spec)
    assert [g.tokens for g in engine.generate(prompts[1:], params)] == reference[1:]
    assert engine.blocks.num_used_blocks == 0


def test_prompt_lookup_proposes_what_followed_the_last_match():
    ngram = drafts.NgramProposer(max_ngram=2)
    from labkit.engine.spec_decode.speculator import DraftRequest

    def ask(ids, k=3, rid="r"):
        return ngram.propose([DraftRequest(rid, ids, k, SamplingParams(), None)])[0].tokens

    assert ask([1, 2, 3, 4, 9, 1, 2]) == [3, 4, 9]
    assert ask([5, 6, 7], rid="s") == []  # no earlier occurrence
    assert ask([7, 8, 7, 8, 7, 8], k=4, rid="t") == [7, 8, 7, 8]  # a repeating pattern: its first occurrence


def test_frequency_vocab_ranks_seen_tokens_then_fills_by_id():
    vocab = drafts.frequency_vocab([[5, 5, 9, 7, 9, 5]], size=6, vocab_size=100, always=[2])
    assert vocab.tolist() == [2, 5, 9, 7, 0, 1]


def test_self_draft_schemes(tiny):
    target = from_hf(tiny.model)
    assert "quant:int8" in drafts.self_draft(target, "int8").rewrites
    bf16 = drafts.self_draft(target, "bf16")
    assert bf16.layers[0].attn.wqkv.weight.dtype == torch.bfloat16
    assert target.layers[0].attn.wqkv.weight.dtype == torch.float32  # a copy: the target is untouched
    with pytest.raises(ValueError, match="unknown self-draft scheme 'int3'"):
        drafts.self_draft(target, "int3")


def test_compiled_int4_self_draft_is_token_identical(tiny):
    """The self-draft `bench spec` runs as self-int4-g32: int4 weights, its one-token steps compiled."""
    target = apply_rewrites(from_hf(tiny.model))
    plain = Engine(target, tiny.tokenizer)
    prompts = [plain.encode(t, chat=c) for t, c in TEXTS[:2]]
    params = plain.sampling_params(max_new_tokens=12, ignore_eos=True)
    reference = [g.tokens for g in plain.generate(prompts, params)]
    proposer = drafts.ModelProposer(drafts.self_draft(target, "int4-g32"), compile=True)
    assert proposer.describe()["compile"] and "quant:int4-g32" in proposer.model.rewrites
    engine = Engine(target, tiny.tokenizer, speculator=Speculator(proposer, SpeculativeConfig(num_speculative_tokens=3)))
    assert [g.tokens for g in engine.generate(prompts, params)] == reference
    assert proposer.runner.compiled_step is not None  # the draft's one-token steps did run compiled
    assert engine.blocks.num_used_blocks == 0
