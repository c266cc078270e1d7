"""Speculative decoding never changes the output: greedy token identity, and the target's distribution when
sampling (chi-square tests that a deliberately wrong acceptance rule fails); KV blocks all free afterwards."""

import pytest
import torch

from labkit.engine.spec_decode import speculator as speculative
from labkit.engine.spec_decode.proposers import ModelProposer, NgramProposer
from labkit.engine.engine import Engine
from labkit.model.llama import from_hf
from labkit.model.sampling import SamplingParams
from labkit.speculative.lossless import (chi_square_pvalue, exact_marginals, resample_from_target, sampling_pvalues,
                                         small_vocab_model, speculative_engine)
from labkit.engine.spec_decode.speculator import (Draft, SpeculativeConfig, Speculator, StepCosts, expected_tokens, optimal_gamma,
                                verify_greedy, verify_sampled)

# -- the rules on their own ----------------------------------------------------------------------------------
def test_greedy_keeps_the_longest_matching_prefix_then_the_targets_token():
    assert verify_greedy(Draft([5, 6, 7]), [5, 6, 9, 1]) == [5, 6, 9]
    assert verify_greedy(Draft([5, 6, 7]), [5, 6, 7, 1]) == [5, 6, 7, 1]  # all kept: the bonus token
    assert verify_greedy(Draft([5]), [4, 3]) == [4]


def _first_tokens(p, q, n, seed=0, residual=None):
    """The first token verify_sampled keeps, over n seeded trials with drafts drawn from q."""
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q, n, replacement=True, generator=gen).t().tolist()  # [n, k]
    bonuses = torch.multinomial(p[-1], n, replacement=True, generator=gen).tolist()
    counts = torch.zeros(p.shape[-1])
    for tokens, bonus in zip(drafts, bonuses):
        counts[verify_sampled(p, Draft(tokens, q), gen, bonus, residual)[0]] += 1
    return counts


def test_rejection_rule_gives_the_target_distribution_and_a_wrong_rule_does_not(monkeypatch):
    p = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05, 0.0], [0.2] * 5 + [0.0], [1 / 6] * 6])
    q = torch.tensor([[0.05, 0.05, 0.1, 0.3, 0.3, 0.2], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]])
    assert chi_square_pvalue(_first_tokens(p, q, 4000), p[0]) > 1e-3
    # a deliberately wrong rule: on rejection, resample from p itself (biased toward the draft's tokens)
    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    assert chi_square_pvalue(_first_tokens(p, q, 4000), p[0]) < 1e-6


def test_the_wrong_rule_passed_as_the_residual_fails_without_patching():
    p = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05, 0.0], [0.2] * 5 + [0.0], [1 / 6] * 6])
    q = torch.tensor([[0.05, 0.05, 0.1, 0.3, 0.3, 0.2], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]])
    assert chi_square_pvalue(_first_tokens(p, q, 4000, residual=resample_from_target), p[0]) < 1e-6
    assert chi_square_pvalue(_first_tokens(p, q, 4000), p[0]) > 1e-3  # the default is still the residual


def test_a_sure_draft_has_a_one_hot_q():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    assert verify_sampled(p, Draft([1]), None, bonus=0) == [1, 0]  # p(x) = 1: always kept
    assert verify_sampled(p, Draft([2]), None, bonus=0) == [1]  # p(x) = 0: never kept; the residual is p


# -- the engine: sampling ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampling_setup():
    target, draft = small_vocab_model(0), small_vocab_model(1)
    prompt = [1, 2, 3]
    return target, draft, prompt, exact_marginals(Engine(target), prompt)


def _spec_engine(target, draft) -> Engine:
    return speculative_engine(target, draft, num_draft_tokens=3)


def test_speculative_sampling_cannot_be_told_from_target_sampling(sampling_setup):
    target, draft, prompt, (p2, p3) = sampling_setup
    engine = _spec_engine(target, draft)
    assert min(sampling_pvalues(engine, prompt, 2000, (p2, p3))) > 1e-3
    stats = engine.speculator.stats
    assert 0.05 < stats.acceptance_rate < 0.95, "the test needs a draft that is sometimes right, sometimes wrong"
    assert stats.proposed_at[1] > 0, "second draft positions were verified too"
    assert engine.blocks.num_used_blocks == 0
    engine.blocks.check()


def test_a_wrong_acceptance_rule_fails_the_same_test(sampling_setup, monkeypatch):
    target, draft, prompt, (p2, p3) = sampling_setup
    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    assert min(sampling_pvalues(_spec_engine(target, draft), prompt, 2000, (p2, p3))) < 1e-4


def test_a_wrong_rule_given_to_the_engine_fails_the_same_test(sampling_setup):
    """The notebook's negative control, without patching: the engine's speculator takes the wrong rule."""
    target, draft, prompt, (p2, p3) = sampling_setup
    engine = speculative_engine(target, draft, residual=resample_from_target)
    assert min(sampling_pvalues(engine, prompt, 2000, (p2, p3))) < 1e-4
    assert engine.blocks.num_used_blocks == 0


def test_seeded_speculative_sampling_repeats_itself(sampling_setup):
    target, draft, prompt, _ = sampling_setup
    engine = _spec_engine(target, draft)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    first = engine.generate([prompt], params)[0].tokens
    assert engine.generate([prompt, [4, 5]], params)[0].tokens == first  # whatever shares its batch


# -- the engine: greedy, rollback, limits ----------------------------------------------------------------------
def test_rows_accept_different_lengths_and_every_block_comes_back(tiny):
    target = from_hf(tiny.model)
    plain = Engine(target, tiny.tokenizer)
    prompts = [plain.encode(t) for t in ("one two three one two three one two", "a b c d", "x")]
    params = plain.sampling_params(max_new_tokens=20, ignore_eos=True)
    reference = [g.tokens for g in plain.generate(prompts, params)]
    engine = Engine(target, tiny.tokenizer, speculator=Speculator(NgramProposer(), SpeculativeConfig(6)),
                    block_size=4)
    for p in prompts:
        engine.add_request(p, params)
    got = {}
    while engine.has_unfinished:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.blocks.check()
    assert [got[str(i)] for i in range(3)] == reference
    assert engine.blocks.num_used_blocks == 0
    assert engine.speculator.stats.num_accepted_tokens > 0


def test_drafts_respect_max_new_tokens_and_stop_tokens(tiny):
    target = from_hf(tiny.model)
    plain = Engine(target, tiny.tokenizer)
    prompt = plain.encode("one two one two one two")
    ref = plain.generate([prompt], plain.sampling_params(max_new_tokens=30, ignore_eos=True))[0].tokens
    engine = Engine(target, tiny.tokenizer, speculator=Speculator(NgramProposer(), SpeculativeConfig(8)))
    for n in (1, 2, 7):
        assert engine.generate([prompt], plain.sampling_params(max_new_tokens=n, ignore_eos=True))[0].tokens == ref[:n]
    stop = ref[5]
    first = ref.index(stop)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=30, stop_token_ids=(stop,)))[0]
    assert out.tokens == ref[:first] and out.finish_reason == "stop"
    assert engine.blocks.num_used_blocks == 0


def test_abort_releases_the_drafts_state(tiny):
    target = from_hf(tiny.model)
    proposer = ModelProposer(from_hf(tiny.model), kv_cache_mb=8)
    engine = Engine(target, tiny.tokenizer, speculator=Speculator(proposer))
    rid = engine.add_request(engine.encode("hello there"), SamplingParams(max_new_tokens=30, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert proposer.runner.blocks.num_used_blocks > 0
    engine.abort(rid)
    assert proposer.runner.blocks.num_used_blocks == 0 and engine.blocks.num_used_blocks == 0


def test_a_full_cache_drafts_fewer_tokens_instead_of_failing(tiny):
    target = from_hf(tiny.model)
    engine = Engine(target, tiny.tokenizer, speculator=Speculator(NgramProposer(), SpeculativeConfig(8)),
                    num_kv_blocks=3, block_size=16)
    prompt = engine.encode("one two one two one two one two")
    ref = Engine(target, tiny.tokenizer).generate([prompt], SamplingParams(max_new_tokens=32, ignore_eos=True))
    out = engine.generate([prompt], SamplingParams(max_new_tokens=32, ignore_eos=True))
    assert out[0].tokens == ref[0].tokens
    engine.blocks.check()


# -- gamma -----------------------------------------------------------------------------------------------------
def test_expected_tokens_and_optimal_gamma():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert optimal_gamma(0.9, 0.0, 0.01, 16) == 16  # a free draft that is usually right: draft all you can
    assert optimal_gamma(0.1, 0.5, 0.05, 16) == 0  # an expensive, wrong draft: do not speculate
    assert 1 < optimal_gamma(0.8, 0.05, 0.02, 16) < 16


def test_step_costs_fit_a_line():
    costs = StepCosts(decay=1.0)
    assert costs.relative() is None
    for k in (0, 2, 4, 8):
        costs.add_verify(0.030 + 0.002 * k, k)
    costs.add_draft(0.004, 4)
    draft, verify = costs.relative()
    assert draft == pytest.approx(0.001 / 0.030) and verify == pytest.approx(0.002 / 0.030)


def test_adaptive_gamma_grows_for_a_good_draft_and_shrinks_for_a_bad_one():
    config = SpeculativeConfig(num_speculative_tokens=2, gamma_policy="adaptive", max_draft_tokens=12)
    spec = Speculator(NgramProposer(), config)
    assert spec.gamma("anyone") == 2  # nothing measured yet: the configured first guess
    for k in (0, 2, 4):  # a 30 ms step, 1 ms per extra verified token, 0.5 ms per draft token
        spec.costs.add_verify(0.030 + 0.001 * k, k)
    spec.costs.add_draft(0.002, 4)
    spec._record("good", 2, 2)
    spec._record("bad", 2, 0)
    for _ in range(10):
        spec._record("good", 4, 4)
        spec._record("bad", 4, 0)
    assert spec.gamma("good") > config.num_speculative_tokens > spec.gamma("bad") == 1


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 1, got 0"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="unknown gamma policy 'sometimes'"):
        SpeculativeConfig(gamma_policy="sometimes")
    with pytest.raises(ValueError, match="max_draft_tokens"):
        SpeculativeConfig(num_speculative_tokens=8, gamma_policy="adaptive", max_draft_tokens=4)


@pytest.mark.gpu
def test_greedy_and_seeded_speculation_on_cuda(tiny):
    target = from_hf(tiny.model).cuda()
    plain = Engine(target, tiny.tokenizer)
    prompts = [plain.encode(t) for t in ("one two three one two three", "a b c")]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    spec = Engine(target, tiny.tokenizer, speculator=Speculator(ModelProposer(from_hf(tiny.model).cuda())))
    assert [g.tokens for g in spec.generate(prompts, params)] == [g.tokens for g in plain.generate(prompts, params)]
    sampled = SamplingParams(max_new_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
    assert spec.generate(prompts, sampled)[0].tokens == spec.generate(prompts[:1], sampled)[0].tokens
    assert spec.blocks.num_used_blocks == 0
