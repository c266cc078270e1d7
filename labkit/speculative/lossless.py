"""Check that speculative sampling keeps the target's distribution: exact marginals against seeded samples.

On a model with a vocabulary small enough to enumerate, the exact distribution of the second and third
generated tokens of plain sampling is a sum over every earlier token; thousands of seeded speculative runs
are then compared with it by a chi-square test. The rejection rule passes it; a wrong rule (e.g. resampling
from p instead of the residual after a rejection: `speculative_engine(..., residual=resample_from_target)`)
fails it. The wrong rule's own marginals are exact too (`rule_marginals`), so the number of samples is sized
from the test's power against it (`samples_for_power`): `check_lossless` is the check notebook 03 runs, and
tests/speculative/test_lossless_seeds.py runs it across seeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from labkit.model.sampling import SamplingParams

# a vocabulary small enough to count every token: exact marginals by enumeration, chi-square over few cells
SMALL_VOCAB_CONFIG = dict(model_type="llama", vocab_size=12, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=True)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts [V] against expected probabilities [V] (cells expecting < 5 pooled)."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    if len(obs) < 2:
        return 1.0
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2.0, dtype=torch.float64), stat / 2))


def small_vocab_model(seed: int, sharpness: float = 8.0):
    """A random 12-token labkit model whose head is scaled up (the tied embedding times `sharpness`), so its
    distributions are far from uniform."""
    from labkit.model.llama import from_hf
    from labkit.model.loader import load_model

    hf = load_model(SMALL_VOCAB_CONFIG, dummy=True, seed=seed, device="cpu").model
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(sharpness)  # the inputs are normalised: only the head sharpens
    return from_hf(hf)


def resample_from_target(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A deliberately wrong rule, the check's negative control: after a rejection, resample from the target's p
    itself instead of the residual norm(max(0, p - q)), which biases the output toward the draft's tokens."""
    return p


def speculative_engine(target, draft, num_draft_tokens: int = 3, residual=None):
    """An engine over `target` that drafts with the model `draft`, wide enough to run thousands of seeded
    requests at once; `residual` replaces the rejection rule's residual (e.g. `resample_from_target`)."""
    from labkit.engine.engine import Engine
    from labkit.engine.spec_decode.proposers import ModelProposer
    from labkit.engine.spec_decode.speculator import SpeculativeConfig, Speculator

    proposer = ModelProposer(draft, max_num_seqs=512, kv_cache_mb=16)
    speculator = Speculator(proposer, SpeculativeConfig(num_speculative_tokens=num_draft_tokens), residual=residual)
    return Engine(target, speculator=speculator, max_num_seqs=512, max_num_batched_tokens=4096)


def _conditionals(engine, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P(t1) [V], P(t2 | a) [V, V], P(t3 | a, b) [V, V, V] of `engine`'s model at temperature 1 after `prompt`:
    one prompt_logits call per (a, b), whose last three rows are the three distributions."""
    V = engine.model.args.vocab_size
    probs = torch.stack([torch.stack([engine.prompt_logits(prompt + [a, b])[-3:].double().softmax(-1)
                                      for b in range(V)]) for a in range(V)])  # [V, V, 3, V]
    return probs[0, 0, 0], probs[:, 0, 1], probs[:, :, 2]


def exact_marginals(engine, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """P(second token), P(third token) [V] of plain sampling at temperature 1, summed over every earlier token."""
    p1, p2, p3 = _conditionals(engine, prompt)
    return (p1 @ p2).float(), torch.einsum("a,ab,abx->x", p1, p2, p3).float()


def rule_output(p: torch.Tensor, q: torch.Tensor, residual=None) -> torch.Tensor:
    """The distribution [..., V] of the token a verified draft position emits when the draft is drawn from q and
    kept with probability min(1, p/q), else replaced by a draw from residual(p, q) (default the true residual,
    which gives back p): min(p, q) + (1 - sum min(p, q)) * residual(p, q)."""
    from labkit.engine.spec_decode.speculator import residual_distribution

    shape = p.shape
    p2, q2 = p.reshape(-1, shape[-1]), q.reshape(-1, shape[-1])
    overlap = torch.minimum(p2, q2)
    r = (residual or residual_distribution)(p2, q2)
    return (overlap + (1 - overlap.sum(-1, keepdim=True)) * r).reshape(shape)


def rule_marginals(target, draft, prompt: list[int], residual=None) -> tuple[torch.Tensor, torch.Tensor]:
    """P(second token), P(third token) [V] that `sampled_counts` draws from a speculative engine whose rejection
    rule resamples from residual(p, q) (default the true residual, whose marginals are `exact_marginals`).

    In those runs the first token is plain target sampling, and the second and third are always verified draft
    positions (4 new tokens: the first speculative step drafts two, a step after a rejection at least one), so
    each is `rule_output` of the target's p and the draft's q after the tokens before it."""
    from labkit.engine.engine import Engine

    return _rule_marginals(_conditionals(Engine(target), prompt), _conditionals(Engine(draft), prompt), residual)


def _rule_marginals(p: tuple, q: tuple, residual=None) -> tuple[torch.Tensor, torch.Tensor]:
    """rule_marginals from the target's and the draft's `_conditionals`."""
    (p1, p2, p3), (_, q2, q3) = p, q
    out2, out3 = rule_output(p2, q2, residual), rule_output(p3, q3, residual)  # [V, V], [V, V, V]
    return (p1 @ out2).float(), torch.einsum("a,ab,abx->x", p1, out2, out3).float()


def _pooled(null: torch.Tensor, alt: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells `chi_square_pvalue` tests at num_samples: those expecting < 5 under `null` pooled into one."""
    null, alt = null.double(), alt.double()
    small = null * num_samples < 5
    p0 = torch.cat([null[~small], null[small].sum()[None]])
    p1 = torch.cat([alt[~small], alt[small].sum()[None]])
    return p0[p0 > 0], p1[p0 > 0]


def chi_square_isf(alpha: float, df: int) -> float:
    """The chi-square statistic whose upper tail with df degrees of freedom is alpha (bisection on gammaincc)."""
    a, lo, hi = torch.tensor(df / 2.0, dtype=torch.float64), 0.0, 10.0 * df + 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(torch.special.gammaincc(a, torch.tensor(mid / 2, dtype=torch.float64))) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def noncentral_chi_square_sf(x: float, df: int, noncentrality: float) -> float:
    """P(X > x) for X ~ chi-square(df, noncentrality): the Poisson(noncentrality / 2) mixture of central
    chi-squares with df + 2j degrees of freedom (Johnson, Kotz & Balakrishnan 1995, ch. 29), summed to 12 sd."""
    mu = noncentrality / 2
    j = torch.arange(int(mu + 12 * mu ** 0.5 + 60), dtype=torch.float64)
    log_w = (-mu + j * torch.log(torch.tensor(mu, dtype=torch.float64)) - torch.lgamma(j + 1)) if mu > 0 else \
        torch.where(j == 0, 0.0, -torch.inf)
    tails = torch.special.gammaincc((df + 2 * j) / 2, torch.full_like(j, x / 2))
    return float((log_w.exp() * tails).sum())


def chi_square_power(null: torch.Tensor, alt: torch.Tensor, num_samples: int, alpha: float) -> float:
    """Power of `chi_square_pvalue` at level alpha to tell num_samples draws from `alt` [V] from `null` [V]:
    Pearson's statistic is about non-central chi-square with k - 1 degrees of freedom and non-centrality
    n * sum (alt - null)^2 / null over the k tested cells (Cochran 1952; asymptotic, as the test itself)."""
    p0, p1 = _pooled(null, alt, num_samples)
    if len(p0) < 2:
        return 0.0
    noncentrality = num_samples * float(((p1 - p0) ** 2 / p0).sum())
    return noncentral_chi_square_sf(chi_square_isf(alpha, len(p0) - 1), len(p0) - 1, noncentrality)


def samples_for_power(null: Sequence[torch.Tensor], alt: Sequence[torch.Tensor], alpha: float, power: float,
                      max_samples: int = 10**6) -> int:
    """The fewest samples (to 1 %) with which at least one of the paired tests (null[i] against alt[i], each at
    level alpha) rejects alt with probability >= power; ValueError past max_samples (alt too close to null)."""
    for name, value in (("alpha", alpha), ("power", power)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")

    def best(n):
        return max(chi_square_power(n0, n1, n, alpha) for n0, n1 in zip(null, alt))

    hi = 64
    while best(hi) < power:
        if hi > max_samples:
            raise ValueError(f"more than max_samples={max_samples} samples needed for power {power} at level "
                             f"{alpha}: the two rules' marginals are too close to tell apart")
        hi *= 2
    lo = hi // 2
    while hi - lo > max(1, lo // 100):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if best(mid) >= power else (mid, hi)
    return hi


def sampled_counts(engine, prompt: list[int], num_samples: int, first_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts [V] of the second and third tokens over num_samples runs seeded first_seed, first_seed + 1, ...
    (4 tokens each, so the first speculative step drafts two tokens and both counted tokens are verified drafts)."""
    params = [SamplingParams(max_new_tokens=4, temperature=1.0, seed=first_seed + i, ignore_eos=True)
              for i in range(num_samples)]
    tokens = torch.tensor([g.tokens for g in engine.generate([prompt] * num_samples, params)])
    V = engine.model.args.vocab_size
    return torch.bincount(tokens[:, 1], minlength=V).float(), torch.bincount(tokens[:, 2], minlength=V).float()


def sampling_pvalues(engine, prompt: list[int], num_samples: int, exact=None,
                     first_seed: int = 0) -> tuple[float, float]:
    """Chi-square p-values of the second and third tokens of `engine` against plain sampling's exact marginals."""
    p2, p3 = exact if exact is not None else exact_marginals(engine, prompt)
    c2, c3 = sampled_counts(engine, prompt, num_samples, first_seed)
    return chi_square_pvalue(c2, p2), chi_square_pvalue(c3, p3)


# The check's design. alpha is family-wise over the two tested positions (each at alpha / 2, Bonferroni): a
# lossless rule fails with probability <= 1e-4 whatever the seed. The draft is flatter than the target, so it
# overlaps the target at every prefix and the wrong rule's distortion min(p, q) - sum(min(p, q)) p never
# vanishes; with a draft as sharp as the target it nearly did for some seeds (seed 8: 2000 samples saw nothing).
ALPHA = 1e-4
POWER = 0.999
DRAFT_SHARPNESS = 2.0
CHECK_PROMPT = (1, 2, 3)


@dataclass
class LosslessCheck:
    """The outcome of `check_lossless`: p-values of the rejection rule and of the wrong rule (second and third
    token), the samples taken and the fewest that give the wrong rule's test `power` at level `alpha`."""

    seed: int
    alpha: float
    power: float
    num_samples: int
    num_samples_needed: int
    right_pvalues: tuple[float, float]
    wrong_pvalues: tuple[float, float]
    acceptance_rate: float
    num_used_blocks: int  # KV blocks the checked engine still holds after its runs: 0

    @property
    def is_lossless(self) -> bool:
        """The rejection rule's samples pass the test at family-wise level alpha."""
        return min(self.right_pvalues) > self.alpha / 2

    @property
    def is_wrong_rule_caught(self) -> bool:
        """The wrong rule's samples fail the same test."""
        return min(self.wrong_pvalues) <= self.alpha / 2


def check_lossless(seed: int, min_samples: int = 0, alpha: float = ALPHA, power: float = POWER,
                   num_draft_tokens: int = 3) -> LosslessCheck:
    """Speculative sampling against plain sampling's exact marginals on a 12-token target (seed) and a flatter
    draft (seed + 1), and the wrong rule `resample_from_target` as the negative control: as many seeded samples
    as give the wrong rule's test `power` at level alpha (at least min_samples), the same samples for both."""
    target, draft = small_vocab_model(seed), small_vocab_model(seed + 1, DRAFT_SHARPNESS)
    from labkit.engine.engine import Engine

    prompt = list(CHECK_PROMPT)
    p, q = _conditionals(Engine(target), prompt), _conditionals(Engine(draft), prompt)
    exact = (p[0] @ p[1]).float(), torch.einsum("a,ab,abx->x", *p).float()  # = exact_marginals(Engine(target))
    wrong = _rule_marginals(p, q, resample_from_target)
    needed = samples_for_power(exact, wrong, alpha / 2, power)
    n, first_seed = max(needed, min_samples), seed * 10**7  # each model seed draws its own samples
    checked = speculative_engine(target, draft, num_draft_tokens)
    right_p = sampling_pvalues(checked, prompt, n, exact, first_seed)
    wrong_p = sampling_pvalues(speculative_engine(target, draft, num_draft_tokens, resample_from_target), prompt,
                               n, exact, first_seed)
    return LosslessCheck(seed, alpha, power, n, needed, right_p, wrong_p, checked.speculator.stats.acceptance_rate,
                         checked.blocks.num_used_blocks)


__all__ = ["SMALL_VOCAB_CONFIG", "chi_square_pvalue", "small_vocab_model", "resample_from_target",
           "speculative_engine", "exact_marginals", "rule_output", "rule_marginals", "chi_square_isf",
           "noncentral_chi_square_sf", "chi_square_power", "samples_for_power", "sampled_counts",
           "sampling_pvalues", "ALPHA", "POWER", "DRAFT_SHARPNESS", "CHECK_PROMPT", "LosslessCheck",
           "check_lossless"]
