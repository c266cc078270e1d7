"""Speculative decoding: a cheap draft proposes tokens, the target verifies them all in one forward.

The engine's `step()` asks a `Speculator` for draft tokens for every decode row, computes each drafted row's
last token and its drafts in the same forward (rows in one batch draft and accept different numbers of
tokens), and hands the target's logits back to `verify`, which keeps what the target would have produced:

- greedy rows keep the longest draft prefix that equals the target's argmax, then the target's own argmax
  (a correction, or a bonus token when every draft was kept): token-identical to plain greedy decoding;
- sampled rows apply the rejection rule of Leviathan et al. 2023 (Alg. 1) and Chen et al. 2023: keep draft
  x with probability min(1, p(x) / q(x)); on the first rejection draw from the residual norm(max(0, p - q));
  when all are kept draw a bonus token from p. The output then has the target's distribution exactly, for
  any draft q (a draft that proposes one token for sure has a one-hot q).

The scheduler then rolls the paged cache back over the rejected tokens (`Scheduler.update_from_output`); stateful
drafts roll their own caches back when they next see the request's tokens. How many tokens to draft is
either fixed (gamma) or adaptive: per request, the gamma that maximises the expected tokens per unit of time
for its measured acceptance rate and the measured costs of drafting and verifying (Leviathan et al. 2023,
Sec. 3.4). The drafts themselves live in `labkit.engine.spec_decode.proposers`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from labkit.engine.config import GAMMA_POLICIES, SpeculativeConfig
from labkit.engine.model_runner import RowSpan
from labkit.model.sampling import SamplingParams, sample

@dataclass
class DraftRequest:
    """What a proposer sees of one row: its tokens so far (the last one not yet computed by the target)."""

    request_id: str
    token_ids: list[int]
    num_draft_tokens: int  # propose at most this many
    params: SamplingParams
    generator: torch.Generator | None


@dataclass
class Draft:
    """Proposed tokens and, for a draft that sampled them, the distributions they came from."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # [k, V] the draft's q at each position; None: each token proposed for sure


class Proposer:
    """The interface every draft implements (see `labkit.engine.spec_decode.proposers`)."""

    name = "proposer"
    needs_hidden = False  # True: the engine passes the target's hidden states to `observe`

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """Up to requests[i].num_draft_tokens tokens to follow each request's tokens (fewer, or none, allowed)."""
        raise NotImplementedError

    def observe(self, request_id: str, token_ids: Sequence[int], start: int, hidden: torch.Tensor) -> None:
        """The target's final hidden states [n, dim] at positions [start, start + n) of a request (only the
        tokens the target kept)."""

    def release(self, request_id: str) -> None:
        """Forget a request that finished or was aborted (free its caches)."""

    def describe(self) -> dict:
        return {"draft": self.name}


@dataclass
class SpecStats:
    """What verification kept, per draft position, and where the time went (seconds)."""

    max_positions: int
    num_steps: int = 0  # verify steps with at least one drafted row
    num_rows: int = 0  # drafted rows verified
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # accepted drafts plus the target's own token, over drafted rows
    proposed_at: list[int] = field(default_factory=list)  # rows that drafted position i
    accepted_at: list[int] = field(default_factory=list)  # rows whose draft at position i was kept
    draft_s: float = 0.0
    verify_s: float = 0.0  # the target's forward over the drafted step and the acceptance test

    def __post_init__(self):
        self.proposed_at = self.proposed_at or [0] * self.max_positions
        self.accepted_at = self.accepted_at or [0] * self.max_positions

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def acceptance_by_position(self) -> list[float | None]:
        """Share of rows that drafted position i whose draft there was kept (all drafts before it kept too)."""
        return [a / p if p else None for a, p in zip(self.accepted_at, self.proposed_at)]

    @property
    def mean_accepted_tokens(self) -> float | None:
        """Draft tokens kept per verified row (each row also gains the target's own token)."""
        return self.num_accepted_tokens / self.num_rows if self.num_rows else None

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens a drafted row gains per target forward: mean accepted + 1 (tau in the EAGLE papers)."""
        return self.num_emitted_tokens / self.num_rows if self.num_rows else None

    def to_dict(self) -> dict:
        return {"num_steps": self.num_steps, "num_rows": self.num_rows, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "acceptance_rate": self.acceptance_rate,
                "acceptance_by_position": self.acceptance_by_position,
                "mean_accepted_tokens": self.mean_accepted_tokens, "tokens_per_step": self.tokens_per_step,
                "draft_s": self.draft_s, "verify_s": self.verify_s}


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens per target forward with gamma drafts, each kept with probability alpha (Leviathan et al., Eq. 1)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def optimal_gamma(alpha: float, draft_cost: float, verify_cost: float, max_gamma: int) -> int:
    """The gamma in 0..max_gamma that maximises expected tokens per unit time (Leviathan et al. 2023, Sec. 3.4).

    Costs are relative to one target step of one token: drafting a token costs draft_cost, verifying each
    extra token verify_cost. 0 means: do not speculate.
    """
    def rate(g: int) -> float:
        return expected_tokens(alpha, g) / (1 + g * (draft_cost + verify_cost))

    return max(range(max_gamma + 1), key=rate)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where a rejected draft resamples from: norm(max(0, p - q)) per row, p and q [R, V] (Leviathan et al.)."""
    r = (p - q).clamp_(min=0)
    total = r.sum(dim=-1, keepdim=True)
    # p == q leaves nothing: then no draft can be rejected (p/q = 1), so any row here is unused; keep p
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probs [V] (the exponential race, as `labkit.model.sampling` draws)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax())


def verify_greedy(draft: Draft, target: list[int]) -> list[int]:
    """Greedy rows: the drafts up to the first that differs from the target's argmax, then the target's token.

    target [k + 1]: the argmax after the row's last token and after each draft.
    """
    k = len(draft.tokens)
    n = next((i for i in range(k) if draft.tokens[i] != target[i]), k)
    return draft.tokens[:n] + [target[n]]


def verify_sampled(p: torch.Tensor, draft: Draft, generator: torch.Generator | None, bonus: int,
                   residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> list[int]:
    """Sampled rows: the rejection rule (Leviathan et al. 2023, Alg. 1; Chen et al. 2023).

    p [k + 1, V]: the target's distributions after the row's last token and after each draft; bonus: a token
    already drawn from p[k], kept when every draft is accepted. residual(p, q): where a rejected draft resamples
    from (default `residual_distribution`; another rule is for checking that the lossless test catches it).
    """
    k = len(draft.tokens)
    drafts = torch.tensor(draft.tokens, device=p.device)
    p_x = p[:k].gather(1, drafts[:, None])[:, 0]  # [k] target probability of each draft token
    q_x = torch.ones_like(p_x) if draft.probs is None else draft.probs.gather(1, drafts[:, None])[:, 0]
    u = torch.rand(k, generator=generator, device=p.device)
    kept = (u * q_x < p_x).tolist()  # u < p/q without dividing by a q of 0
    n = next((i for i in range(k) if not kept[i]), k)
    if n == k:
        return draft.tokens + [bonus]
    q_n = draft.probs[n] if draft.probs is not None else torch.nn.functional.one_hot(drafts[n], p.shape[-1]).to(p)
    return draft.tokens[:n] + [_draw((residual or residual_distribution)(p[n : n + 1], q_n[None])[0], generator)]


class StepCosts:
    """Running estimates of a target step's time, its extra time per draft token verified, and a draft token's
    time: a least-squares line time = a + b * drafts over recent verify steps (older ones weigh less)."""

    def __init__(self, decay: float = 0.95, verify_prior: float = 0.05):
        self.decay, self.verify_prior = decay, verify_prior  # the slope's guess, x a step, until drafts vary
        self._sums = [0.0] * 5  # weight, x, x^2, y, x*y
        self._draft = [0.0, 0.0]  # seconds, tokens

    def add_verify(self, seconds: float, num_drafts: int) -> None:
        x, d = float(num_drafts), self.decay
        self._sums = [d * s + v for s, v in zip(self._sums, (1.0, x, x * x, seconds, x * seconds))]

    def add_draft(self, seconds: float, num_tokens: int) -> None:
        if num_tokens:
            self._draft = [self.decay * self._draft[0] + seconds, self.decay * self._draft[1] + num_tokens]

    def relative(self) -> tuple[float, float] | None:
        """(draft cost, verify cost) per token relative to a one-token step; None until both were measured."""
        w, sx, sxx, sy, sxy = self._sums
        if w == 0 or self._draft[1] == 0:
            return None
        var = sxx / w - (sx / w) ** 2
        if var > 1e-6:  # drafts varied: fit the line
            slope = (sxy / w - sx / w * sy / w) / var
            step = sy / w - slope * sx / w
        else:
            step = sy / w / (1 + self.verify_prior * sx / w)
            slope = self.verify_prior * step
        if step <= 0:
            return None
        return self._draft[0] / self._draft[1] / step, max(slope, 0.0) / step


class Speculator:
    """Plugs a proposer into `Engine.step()`: chooses gamma per row, collects drafts, verifies, keeps stats."""

    def __init__(self, proposer: Proposer, config: SpeculativeConfig | None = None, residual=None):
        """residual: `verify_sampled`'s rule after a rejection (default the residual; `lossless` checks others)."""
        self.proposer, self.config = proposer, config or SpeculativeConfig()
        self.residual = residual
        c = self.config
        self.stats = SpecStats(max(c.num_speculative_tokens, c.max_draft_tokens if c.gamma_policy == "adaptive" else 0))
        self.costs = StepCosts()
        self._acceptance: dict[str, float] = {}  # request id -> running acceptance rate (adaptive gamma)
        self._drafts: dict[str, Draft] = {}  # this step's drafts, by request id
        self._kept: dict[str, int] = {}  # this step's accepted drafts, by request id
        self._verify_start = 0.0

    @property
    def needs_hidden(self) -> bool:
        return self.proposer.needs_hidden

    def describe(self) -> dict:
        c = self.config
        return {**self.proposer.describe(), **getattr(self.proposer, "training", {}),
                "num_speculative_tokens": c.num_speculative_tokens, "gamma_policy": c.gamma_policy,
                "max_draft_tokens": c.max_draft_tokens if c.gamma_policy == "adaptive" else c.num_speculative_tokens}

    @property
    def last_step(self) -> dict[str, tuple[list[int], int]]:
        """Request id -> (the tokens drafted in the last step, how many of them the target kept)."""
        return {rid: (d.tokens, self._kept.get(rid, 0)) for rid, d in self._drafts.items()}

    def reset_stats(self) -> None:
        self.stats = SpecStats(self.stats.max_positions)

    def gamma(self, request_id: str) -> int:
        """Drafts for this request's next step."""
        c = self.config
        if c.gamma_policy == "fixed":
            return c.num_speculative_tokens
        alpha, costs = self._acceptance.get(request_id), self.costs.relative()
        if alpha is None or costs is None:
            return c.num_speculative_tokens
        return max(optimal_gamma(alpha, *costs, c.max_draft_tokens), 1)  # one draft at least: alpha may recover

    def propose(self, batch, engine) -> dict[str, Draft]:
        """Drafts for the batch's decode rows, each within its remaining length and the free KV blocks."""
        start = time.perf_counter()
        asks, seqs = [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if n != 1 or seq.num_computed_tokens + 1 != seq.num_tokens:
                continue  # a prefill chunk: nothing to draft after yet
            room = seq.params.max_new_tokens - seq.num_output_tokens - 1  # the step adds accepted + 1 tokens
            k = min(self.gamma(seq.request_id), room, engine.max_seq_len - seq.num_tokens)
            if k > 0:
                asks.append(DraftRequest(seq.request_id, seq.token_ids, k, seq.params,
                                         engine.request_generator(seq.request_id)))
                seqs.append(seq)
        self._drafts, self._kept = {}, {}
        if asks:
            for ask, seq, draft in zip(asks, seqs, self.proposer.propose(asks)):
                k = len(draft.tokens)
                while k and not engine.scheduler.reserve_draft_slots(seq, k):
                    k -= 1  # the cache is full: draft fewer tokens rather than preempt anyone
                if k:
                    self._drafts[ask.request_id] = Draft(draft.tokens[:k],
                                                         None if draft.probs is None else draft.probs[:k])
        now = time.perf_counter()
        self.stats.draft_s += now - start
        self.costs.add_draft(now - start, sum(len(d.tokens) for d in self._drafts.values()))
        self._verify_start = now
        return self._drafts

    def verify(self, logits: torch.Tensor, seqs: list, drafts: list[Draft | None],
               generators: list[torch.Generator | None]) -> list[list[int]]:
        """logits [sum(1 + k_i), V] of the sampled rows (row after row) -> each row's new tokens."""
        if not seqs:
            return []
        sizes = [1 + (len(d.tokens) if d else 0) for d in drafts]
        row_params = [s.params for s, n in zip(seqs, sizes) for _ in range(n)]
        row_gens = [g for g, n in zip(generators, sizes) for _ in range(n)]
        # one draw per position (argmax for greedy rows); distributions only where the rejection rule needs them
        need_probs = any(d is not None and not s.params.is_greedy for s, d in zip(seqs, drafts))
        out = sample(logits, row_params, row_gens, return_probs=need_probs)
        drawn = out.tokens.tolist()  # the step's host sync
        tokens, offset = [], 0
        for seq, draft, gen, n in zip(seqs, drafts, generators, sizes):
            if draft is None:
                tokens.append([drawn[offset]])
            else:
                kept = (verify_greedy(draft, drawn[offset:offset + n]) if seq.params.is_greedy else
                        verify_sampled(out.probs[offset:offset + n], draft, gen, drawn[offset + n - 1],
                                       self.residual))
                tokens.append(kept)
                self._record(seq.request_id, len(draft.tokens), len(kept) - 1)
            offset += n
        elapsed = time.perf_counter() - self._verify_start
        self.costs.add_verify(elapsed, sum(sizes) - len(sizes))
        if self._drafts:
            self.stats.verify_s += elapsed
            self.stats.num_steps += 1
        return tokens

    def _record(self, request_id: str, num_drafted: int, num_kept: int) -> None:
        s = self.stats
        s.num_rows += 1
        s.num_draft_tokens += num_drafted
        s.num_accepted_tokens += num_kept
        s.num_emitted_tokens += num_kept + 1
        for i in range(min(num_drafted, s.max_positions)):
            s.proposed_at[i] += 1
            s.accepted_at[i] += i < num_kept
        self._kept[request_id] = num_kept
        # a draft position reached after a rejection says nothing; count the drafts up to the first rejection
        seen = min(num_kept + 1, num_drafted)
        rate = num_kept / seen
        decay = self.config.acceptance_decay ** seen
        old = self._acceptance.get(request_id)
        self._acceptance[request_id] = rate if old is None else decay * old + (1 - decay) * rate

    def observe(self, rows: list[RowSpan], hidden: torch.Tensor) -> None:
        """Pass the target's hidden states [N, dim] of this step's kept tokens (rows as the forward ran them) to
        the proposer."""
        offset = 0
        for row in rows:
            rid = row.request_id
            if rid is not None:
                keep = 1 + self._kept[rid] if rid in self._drafts else row.length
                self.proposer.observe(rid, row.token_ids[: row.start + keep], row.start, hidden[offset: offset + keep])
            offset += row.length

    def release(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)
        self.proposer.release(request_id)


__all__ = ["SpeculativeConfig", "Speculator", "Proposer", "Draft", "DraftRequest", "SpecStats", "StepCosts",
           "verify_greedy", "verify_sampled", "residual_distribution", "expected_tokens", "optimal_gamma",
           "GAMMA_POLICIES"]
