"""Check that speculative sampling keeps the target's distribution: exact marginals against seeded samples.

On a model with a vocabulary small enough to enumerate, the exact distribution of the second and third
generated tokens of plain sampling is a sum over every earlier token; thousands of seeded speculative runs
are then compared with it by a chi-square test. The rejection rule passes it; a wrong rule (e.g. resampling
from p instead of the residual after a rejection: `speculative_engine(..., residual=resample_from_target)`)
fails it.
"""

from __future__ import annotations

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
    from labkit.speculative.proposers import ModelProposer
    from labkit.speculative.speculator import SpeculativeConfig, Speculator

    proposer = ModelProposer(draft, max_num_seqs=512, kv_cache_mb=16)
    speculator = Speculator(proposer, SpeculativeConfig(num_draft_tokens=num_draft_tokens), residual=residual)
    return Engine(target, speculator=speculator, max_num_seqs=512, max_num_batched_tokens=4096)


def exact_marginals(engine, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """P(second token), P(third token) [V] of plain sampling at temperature 1, summed over every earlier token."""
    V = engine.model.args.vocab_size
    p1 = engine.prompt_logits(prompt)[-1].double().softmax(-1)
    p2_given = torch.stack([engine.prompt_logits(prompt + [a])[-1].double().softmax(-1) for a in range(V)])
    p3 = torch.zeros(V, dtype=torch.float64)
    for a in range(V):
        p3_given = torch.stack([engine.prompt_logits(prompt + [a, b])[-1].double().softmax(-1) for b in range(V)])
        p3 += p1[a] * (p2_given[a] @ p3_given)
    return (p1 @ p2_given).float(), p3.float()


def sampled_counts(engine, prompt: list[int], num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts [V] of the second and third tokens over num_samples seeded runs (4 tokens each, so the second
    speculative step drafts two tokens and both counted tokens can be verified drafts)."""
    params = [SamplingParams(max_new_tokens=4, temperature=1.0, seed=i, ignore_eos=True) for i in range(num_samples)]
    tokens = torch.tensor([g.tokens for g in engine.generate([prompt] * num_samples, params)])
    V = engine.model.args.vocab_size
    return torch.bincount(tokens[:, 1], minlength=V).float(), torch.bincount(tokens[:, 2], minlength=V).float()


def sampling_pvalues(engine, prompt: list[int], num_samples: int, exact=None) -> tuple[float, float]:
    """Chi-square p-values of the second and third tokens of `engine` against plain sampling's exact marginals."""
    p2, p3 = exact if exact is not None else exact_marginals(engine, prompt)
    c2, c3 = sampled_counts(engine, prompt, num_samples)
    return chi_square_pvalue(c2, p2), chi_square_pvalue(c3, p3)


__all__ = ["SMALL_VOCAB_CONFIG", "chi_square_pvalue", "small_vocab_model", "resample_from_target",
           "speculative_engine", "exact_marginals", "sampled_counts", "sampling_pvalues"]
