"""The lossless check's parts: the power calculation, and the wrong rule's exact marginals against its samples."""

import pytest
import torch

from labkit.engine.engine import Engine
from labkit.speculative import lossless
from labkit.speculative.lossless import (chi_square_isf, chi_square_power, chi_square_pvalue, exact_marginals,
                                         noncentral_chi_square_sf, resample_from_target, rule_marginals, rule_output,
                                         samples_for_power, sampling_pvalues, small_vocab_model, speculative_engine)


@pytest.mark.parametrize("alpha, df, expected", [(0.05, 1, 3.841459), (1e-3, 10, 29.588298), (0.01, 5, 15.086272)])
def test_chi_square_isf_matches_tables(alpha, df, expected):
    x = chi_square_isf(alpha, df)
    assert x == pytest.approx(expected, rel=2e-3)
    assert float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64))) == pytest.approx(alpha, rel=1e-6)


def test_noncentral_tail_is_the_central_one_at_zero_and_matches_simulation():
    assert noncentral_chi_square_sf(29.588298, 10, 0.0) == pytest.approx(1e-3, rel=1e-4)
    gen = torch.Generator().manual_seed(0)
    for df, lam, x in [(4, 5.0, 10.0), (10, 40.0, 29.6)]:
        shift = torch.zeros(df, dtype=torch.float64)
        shift[0] = lam ** 0.5
        draws = ((torch.randn(400_000, df, generator=gen, dtype=torch.float64) + shift) ** 2).sum(-1)
        simulated = float((draws > x).double().mean())  # sd <= 0.0008 over 400k draws
        assert noncentral_chi_square_sf(x, df, lam) == pytest.approx(simulated, abs=0.004)


def test_power_matches_simulated_multinomial_tests():
    """The asymptotic power against the rejection rate of chi_square_pvalue itself on multinomial draws."""
    null = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01])
    alt = torch.tensor([0.34, 0.27, 0.17, 0.11, 0.07, 0.03, 0.01])
    gen = torch.Generator().manual_seed(1)
    for n, alpha in [(300, 0.05), (1500, 1e-3)]:
        counts = torch.stack([torch.bincount(torch.multinomial(alt, n, replacement=True, generator=gen),
                                             minlength=len(alt)).float() for _ in range(2000)])
        rejected = sum(chi_square_pvalue(c, null) <= alpha for c in counts) / len(counts)
        assert chi_square_power(null, alt, n, alpha) == pytest.approx(rejected, abs=0.05), n
    assert chi_square_power(null, null, 1000, 0.01) == pytest.approx(0.01, rel=1e-3)  # no effect: the level


def test_samples_for_power_is_the_fewest_to_one_percent():
    null = torch.tensor([0.4, 0.3, 0.2, 0.1])
    alt = torch.tensor([0.35, 0.3, 0.22, 0.13])
    n = samples_for_power([null], [alt], 1e-3, 0.999)
    assert chi_square_power(null, alt, n, 1e-3) >= 0.999 > chi_square_power(null, alt, int(n * 0.98), 1e-3)
    assert samples_for_power([null, null], [null, alt], 1e-3, 0.999) == n  # the better of two tests counts
    with pytest.raises(ValueError, match="too close"):
        samples_for_power([null], [null], 1e-3, 0.999, max_samples=10_000)
    with pytest.raises(ValueError, match="alpha must be in \\(0, 1\\), got 0"):
        samples_for_power([null], [alt], 0, 0.9)


def test_the_true_residual_gives_back_p_and_the_wrong_rule_mixes_in_the_overlap():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.3, 0.6], [0.2, 0.2, 0.6]], dtype=torch.float64)
    torch.testing.assert_close(rule_output(p, q), p)
    overlap = torch.minimum(p, q)
    torch.testing.assert_close(rule_output(p, q, resample_from_target), overlap + (1 - overlap.sum(-1, True)) * p)


@pytest.fixture(scope="module")
def pair():
    return small_vocab_model(0), small_vocab_model(1, lossless.DRAFT_SHARPNESS), [1, 2, 3]


def test_rule_marginals_of_the_rejection_rule_are_plain_samplings(pair):
    target, draft, prompt = pair
    for mine, plain in zip(rule_marginals(target, draft, prompt), exact_marginals(Engine(target), prompt)):
        torch.testing.assert_close(mine, plain)


def test_the_wrong_rules_samples_follow_its_predicted_marginals(pair):
    """The power calculation's alternative is what the wrong engine really draws: its samples pass against it."""
    target, draft, prompt = pair
    wrong = rule_marginals(target, draft, prompt, resample_from_target)
    engine = speculative_engine(target, draft, residual=resample_from_target)
    assert min(sampling_pvalues(engine, prompt, 3000, wrong, first_seed=123)) > 1e-4
