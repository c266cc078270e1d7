"""Turn logits into tokens, each row with its own parameters: logit bias, greedy, temperature, top-k and top-p;
and the log-probabilities of the raw logits (OpenAI's `logprobs`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; validated on creation (one-line errors naming the value)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS; the stop token is not returned
    stop: tuple[str, ...] = field(default=())  # stop strings, applied to decoded text
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    detokenize: bool = True  # build the text as tokens arrive; False: token ids only (benchmarks)
    logprobs: int | None = None  # per new token: its log-probability and the `logprobs` most likely; None = off
    prompt_logprobs: int | None = None  # the same for every prompt token after the first; None = off
    logit_bias: dict[int, float] | None = None  # token id -> added to the logits before sampling (OpenAI's)

    def __post_init__(self):
        # max_new_tokens=0 only scores the prompt (OpenAI's echo with max_tokens=0), so it needs prompt_logprobs
        least = 0 if self.prompt_logprobs is not None else 1
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < least:
            raise ValueError(f"max_new_tokens must be an integer >= {least}, got {self.max_new_tokens!r}"
                             + ("" if least else " (0 needs prompt_logprobs)"))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        self._check_logit_bias()
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                    or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias[{token}] must be a number in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], "
                                 f"got {bias!r}")

    @property
    def is_greedy(self) -> bool:
        # like vLLM, temperatures too small to divide by safely mean greedy (1e-40 would overflow to inf)
        return self.temperature < GREEDY_BELOW

    @property
    def is_seeded(self) -> bool:
        return self.seed is not None and not self.is_greedy


GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # alternatives per token, OpenAI's limit
MAX_LOGIT_BIAS = 100  # OpenAI's range is [-100, 100]


@dataclass
class SamplerOutput:
    """The sampled token of each row and, when asked for, the distribution it was drawn from."""

    tokens: torch.Tensor  # [B] int64
    probs: torch.Tensor | None = None  # [B, V] float32; one-hot for greedy rows


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    """A request's own random stream: seeded requests repeat exactly, whatever else shares their batch."""
    if not params.is_seeded:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams],
           generators: torch.Generator | None | Sequence[torch.Generator | None] = None,
           return_probs: bool = False) -> SamplerOutput:
    """logits [B, V] -> a token per row, each row with its own parameters and random generator.

    Greedy rows take the argmax. Other rows are divided by their temperature, cut to their top-k and top-p
    (nucleus, Holtzman et al. 2019; the top token always stays), and drawn from the softmax.
    """
    B = logits.shape[0]
    rows = [params] * B if isinstance(params, SamplingParams) else list(params)
    gens = list(generators) if isinstance(generators, (list, tuple)) else [generators] * B
    if len(rows) != B or len(gens) != B:
        raise ValueError(f"{B} rows of logits need {B} SamplingParams and generators, got {len(rows)}, {len(gens)}")
    logits = apply_logit_bias(logits, rows)
    greedy = [p.is_greedy for p in rows]
    argmax = logits.argmax(dim=-1)
    if all(greedy):
        probs = F.one_hot(argmax, logits.shape[-1]).float() if return_probs else None
        return SamplerOutput(argmax, probs)
    probs = _filtered_probs(logits, rows, greedy)
    # Exponential race (as vLLM samples): argmax(p / E) with E ~ Exp(1) draws from p, all rows at once; each
    # seeded row draws its noise from its own generator, so its tokens do not depend on the batch around it.
    noise = torch.empty_like(probs)
    if any(g is None and not gr for g, gr in zip(gens, greedy)):
        noise.exponential_()
    for b in range(B):
        if gens[b] is not None and not greedy[b]:
            noise[b] = torch.empty(probs.shape[-1], device=gens[b].device).exponential_(generator=gens[b])
    drawn = (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)  # a zero draw would give nan
    tokens = torch.where(torch.tensor(greedy, device=logits.device), argmax, drawn)
    if return_probs and any(greedy):
        probs[torch.tensor(greedy, device=probs.device)] = F.one_hot(argmax[greedy], logits.shape[-1]).float()
    return SamplerOutput(tokens, probs if return_probs else None)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [B, V] with each row's logit_bias added (a copy; the same tensor when no row has one)."""
    if not any(p.logit_bias for p in rows):
        return logits
    logits = logits.clone()
    for b, p in enumerate(rows):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[b, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], num_top: int) -> list[tuple[float, list]]:
    """For each row of logits [N, V] and its chosen token: (the token's log-probability, the num_top most likely
    (token id, log-probability) pairs, best first). Log-softmax of the raw logits in float32, before any bias,
    temperature or cut (vLLM's default "raw_logprobs")."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = logp.gather(1, torch.tensor(list(tokens), device=logp.device)[:, None])[:, 0].tolist()
    if num_top:
        top = torch.topk(logp, min(num_top, logp.shape[-1]), dim=-1)
        pairs = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    else:
        pairs = [[] for _ in chosen]
    return list(zip(chosen, pairs))


def _filtered_probs(logits: torch.Tensor, rows: Sequence[SamplingParams], greedy: Sequence[bool]) -> torch.Tensor:
    """[B, V] softmax of each row after its temperature, top-k and top-p (greedy rows: temperature 1, uncut)."""
    device, V = logits.device, logits.shape[-1]
    temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(rows, greedy)], device=device)
    x = logits.float() / temps[:, None]
    ks = [min(p.top_k, V) if p.top_k and not g else V for p, g in zip(rows, greedy)]
    if min(ks) < V:
        kth = torch.sort(x, dim=-1, descending=True).values.gather(1, torch.tensor(ks, device=device)[:, None] - 1)
        x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th logit stay
    top_p = [p.top_p if p.top_p < 1.0 and not g else 2.0 for p, g in zip(rows, greedy)]  # 2: never cuts
    if min(top_p) < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sorted_p = sorted_x.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= torch.tensor(top_p, device=device)[:, None]
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x.softmax(dim=-1)


__all__ = ["SamplingParams", "SamplerOutput", "sample", "make_generator", "apply_logit_bias", "token_logprobs",
           "GREEDY_BELOW", "MAX_LOGPROBS", "MAX_LOGIT_BIAS"]
