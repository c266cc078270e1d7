"""Five kinds of draft behind one proposer interface (`labkit.engine.spec_decode.speculator.Proposer`).

- `NgramProposer`: prompt lookup (Saxena 2023; vLLM's "ngram"): the tokens that followed the last earlier
  occurrence of the context's final n-gram. No model; strong wherever the output copies the input.
- `ModelProposer` over a cheaper causal LM with its own paged KV cache, drafting token by token:
  `self_draft(target, "int8")`, a quantized copy of the target itself (Zhang et al. 2024 call such drafts
  "self-speculative"), or `small_draft(...)`, a few-layer model distilled in the lab
  (`labkit.speculative.distillation`).
- `MedusaProposer`: K extra heads on the target's last hidden state, head i guessing the token i + 2 places
  ahead, all in one shot (Cai et al. 2024, "Medusa").
- `EagleProposer`: one decoder layer that extrapolates the target's final features from (feature, next
  token) pairs and reads tokens off them with the target's LM head (Li et al. 2024, "EAGLE").

Draft heads may use a reduced, frequency-ranked draft vocabulary (Zhao et al. 2025, "FR-Spec"): the LM head
restricted to the tokens the target emits most, so a draft token costs a fraction of the head's 49152 rows.
A draft only changes how many tokens the target keeps, never which: `labkit.engine.spec_decode.speculator` verifies.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from labkit.engine.config import EngineConfig, SchedulerConfig
from labkit.engine.model_runner import ModelRunner, RowSpan
from labkit.model.llama import Linear, Transformer
from labkit.model.rewrites import use_kn_layout
from labkit.model.sampling import sample
from labkit.engine.spec_decode.speculator import Draft, DraftRequest, Proposer

SELF_DRAFT_SCHEMES = ("int8", "bf16")  # and every other method of labkit.model.quantize (int4, gguf)


class NgramProposer(Proposer):
    """Prompt lookup: find the context's last n-gram (n from max_ngram down to min_ngram) earlier in the context
    and propose what followed it: after its most recent occurrence, or after its first one when the recent one
    is followed by fewer tokens than asked for (a repeating pattern). Each request keeps an index of n-grams,
    updated as tokens arrive.
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        # request -> (tokens indexed, n-gram -> (end of first occurrence, end of latest))
        self._index: dict[str, tuple[int, dict[tuple, tuple[int, int]]]] = {}

    def describe(self) -> dict:
        return {"draft": self.name, "max_ngram": self.max_ngram, "min_ngram": self.min_ngram}

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self._lookup(r.request_id, r.token_ids, r.num_draft_tokens)) for r in requests]

    def _lookup(self, request_id: str, ids: list[int], k: int) -> list[int]:
        done, index = self._index.get(request_id, (0, {}))
        L = len(ids)
        # index every n-gram that has a continuation: those ending before the last token
        for end in range(max(done, 1), L):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    key = tuple(ids[end - n:end])
                    index[key] = (index[key][0] if key in index else end, end)
        self._index[request_id] = (L, index)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            ends = index.get(tuple(ids[L - n:]))
            if ends is not None:
                end = ends[1] if L - ends[1] >= k else ends[0]
                return ids[end:end + k]
        return []

    def release(self, request_id: str) -> None:
        self._index.pop(request_id, None)


def _pick(logits: torch.Tensor, requests: Sequence[DraftRequest], vocab: torch.Tensor | None,
          full_vocab: int) -> tuple[list[int], list[torch.Tensor | None]]:
    """A draft token per row from draft logits [R, V']: the argmax for greedy rows, else a draw from the row's
    own sampling distribution, returned over the full vocabulary as q [V] for the rejection rule."""
    greedy = all(r.params.is_greedy for r in requests)
    out = sample(logits, [r.params for r in requests], [r.generator for r in requests], return_probs=not greedy)
    ids = out.tokens if vocab is None else vocab[out.tokens]
    probs: list[torch.Tensor | None] = [None] * len(requests)
    if not greedy:
        for i, r in enumerate(requests):
            if r.params.is_greedy:
                continue
            q = out.probs[i]
            if vocab is not None:
                q = torch.zeros(full_vocab, device=q.device, dtype=q.dtype).index_copy_(0, vocab, q)
            probs[i] = q
    return ids.tolist(), probs


def _draft(tokens: list[int], probs: list[torch.Tensor | None]) -> Draft:
    """A Draft from per-position tokens and distributions (None for positions proposed for sure)."""
    if not tokens or all(p is None for p in probs):
        return Draft(tokens)
    return Draft(tokens, torch.stack(probs))


def _common_prefix(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _runner(model: Transformer, max_num_seqs: int, kv_cache_mb: float | None, compile: bool = False) -> ModelRunner:
    """A draft network's own paged KV cache and model runner."""
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=max_num_seqs), enable_prefix_caching=False,
                          kv_cache_mb=kv_cache_mb, compile=compile)
    return ModelRunner(model, config)


class ModelProposer(Proposer):
    """A causal LM drafts token by token with its own paged KV cache, rolled back to what the target kept.

    vocab [V']: the target token of each of the draft's outputs (a reduced draft vocabulary); None: the same
    vocabulary as the target. compile: the draft's one-token steps (every draft token after a step's first) run
    compiled, as `EngineConfig(compile=True)` runs decode.
    """

    def __init__(self, model: Transformer, name: str = "draft", vocab: torch.Tensor | None = None,
                 target_vocab_size: int | None = None, max_num_seqs: int = 16, kv_cache_mb: float | None = 256,
                 compile: bool = False):
        self.model, self.name = model, name
        self.vocab = None if vocab is None else vocab.to(model.embed.weight.device)
        self.target_vocab_size = target_vocab_size or model.args.vocab_size
        self.runner = _runner(model, max_num_seqs, kv_cache_mb, compile)
        # per request: the tokens whose K/V the draft cache holds, and how many of them are the request's own
        # (the rest are drafts, which the target may have rejected)
        self._cached: dict[str, tuple[list[int], int]] = {}

    def describe(self) -> dict:
        args = self.model.args
        return {"draft": self.name, "draft_layers": args.num_layers, "draft_vocab": args.vocab_size,
                "rewrites": list(self.model.rewrites), "compile": self.runner.config.compile}

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        live, rows = [], []
        for r in requests:
            ids, L, k = r.token_ids, len(r.token_ids), r.num_draft_tokens
            old, own = self._cached.get(r.request_id, ([], 0))
            keep = min(_common_prefix(old, ids, own), L - 1)  # a request's own tokens never change
            if not self.runner.reserve(r.request_id, L + k - 1, keep):
                self._cached.pop(r.request_id, None)
                self.runner.release(r.request_id)
                continue
            live.append(r)
            rows.append(RowSpan(r.request_id, list(ids), keep, L - keep))
        drafts: dict[str, tuple[list[int], list]] = {r.request_id: ([], []) for r in live}
        with torch.inference_mode():
            while live:
                logits = self.runner.forward(rows, list(range(len(rows)))).logits
                tokens, probs = _pick(logits, live, self.vocab, self.target_vocab_size)
                next_live, next_rows = [], []
                for r, row, t, q in zip(live, rows, tokens, probs):
                    got, qs = drafts[r.request_id]
                    got.append(t)
                    qs.append(q)
                    if len(got) < r.num_draft_tokens:
                        ids = row.token_ids + [t]
                        next_live.append(r)
                        next_rows.append(RowSpan(r.request_id, ids, len(ids) - 1, 1))
                live, rows = next_live, next_rows
        out = []
        for r in requests:
            got, qs = drafts.get(r.request_id, ([], []))
            if r.request_id in drafts:  # the draft cache now holds the tokens and every draft but the last
                self._cached[r.request_id] = (list(r.token_ids) + got[:-1], len(r.token_ids))
            out.append(_draft(got, qs))
        return out

    def release(self, request_id: str) -> None:
        self._cached.pop(request_id, None)
        self.runner.release(request_id)


def head_rows(model: Transformer, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """The target's LM head as [V or V', dim] float rows (tied heads read the embedding)."""
    if model.args.tie_embeddings:
        weight = model.embed.weight
    else:
        head = model.lm_head
        if not isinstance(head, Linear):
            raise ValueError("draft heads are built from an unquantized target: build them before quantize()")
        weight = head.weight.t() if head.kn else head.weight
    weight = weight.detach().float()
    return (weight if vocab is None else weight[vocab]).contiguous()


def self_draft(target: Transformer, scheme: str = "int8") -> Transformer:
    """A copy of the target with its weights in a cheaper form: int8 weight-only (labkit.model.quantize) or bf16 storage.

    Any method of `labkit.model.quantize.quantize` is accepted too (int4-g32, gguf, ...).
    """
    from labkit.checks import check_choice
    from labkit.model.quantize import QUANT_METHODS, quantize

    schemes = (*SELF_DRAFT_SCHEMES, *(m for m in QUANT_METHODS if m not in SELF_DRAFT_SCHEMES))
    check_choice("self-draft scheme", scheme, schemes)
    draft = copy.deepcopy(target)
    if scheme == "bf16":
        for module in draft.modules():
            if isinstance(module, Linear):
                module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
        draft.rewrites.append("cast:bf16")
        return draft
    return quantize(draft, scheme)  # it reads [in, out] weights back to [out, in] itself


def small_draft(target: Transformer, num_layers: int, vocab: torch.Tensor | None = None) -> Transformer:
    """A few-layer model of the target's shape, started from evenly spaced target layers (DistilBERT's choice),
    sharing the target's embedding, with its own LM head over the draft vocabulary (from the target's rows)."""
    if not 1 <= num_layers <= target.args.num_layers:
        raise ValueError(f"num_layers must be in 1..{target.args.num_layers}, got {num_layers}")
    size = target.args.vocab_size if vocab is None else len(vocab)
    args = replace(target.args, num_layers=num_layers, tie_embeddings=False, vocab_size=size)
    with torch.device("meta"):
        model = Transformer(args, attention=target.attention, kernels=target.kernel_backend,
                            act_dtype=target.act_dtype)
    picks = [round(i * (target.args.num_layers - 1) / max(1, num_layers - 1)) for i in range(num_layers)]
    model.layers = nn.ModuleList(_plain_copy(target.layers[i]) for i in picks)
    model.embed = target.embed  # shared and frozen: only looked up
    model.norm = nn.Parameter(target.norm.detach().clone())
    model.lm_head = Linear(args.dim, size, bias=False, device="meta")
    model.lm_head.weight = nn.Parameter(head_rows(target, vocab).to(target.embed.weight.dtype))
    model.inv_freq = target.inv_freq
    return model


def _plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose labkit Linears are stored [out, in] (the layout that is trained and saved)."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, Linear) and m.kn:
            m.weight = nn.Parameter(m.weight.detach().t().contiguous())
            m.kn = False
    return out


class ResBlock(nn.Module):
    """Medusa's head body: x + SiLU(W x + b), W started at zero so a fresh head repeats the LM head's guess."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, dim, bias=True)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads over the target's final hidden state: head i guesses the token i + 2 places ahead (Cai et al.
    2024). Each head is a ResBlock into one shared, frozen LM head (the target's rows over the draft vocabulary).
    """

    def __init__(self, dim: int, num_heads: int, head: torch.Tensor, vocab: torch.Tensor | None):
        super().__init__()
        self.rewrites: list[str] = []
        self.blocks = nn.ModuleList(ResBlock(dim) for _ in range(num_heads))
        self.lm_head = Linear(dim, head.shape[0], bias=False)
        self.lm_head.weight = nn.Parameter(head, requires_grad=False)
        self.register_buffer("vocab", vocab, persistent=False)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, dim] -> logits [N, K, V'] over the draft vocabulary."""
        h = torch.stack([block(hidden) for block in self.blocks], dim=1)  # [N, K, dim]
        return self.lm_head(h)


class MedusaProposer(Proposer):
    """Medusa heads read the target's hidden state at the position that produced the row's last token."""

    name = "medusa"
    needs_hidden = True

    def __init__(self, heads: MedusaHeads, target_vocab_size: int):
        self.heads, self.target_vocab_size = heads, target_vocab_size
        self._last: dict[str, tuple[int, torch.Tensor]] = {}  # request -> (position, hidden [dim])

    def describe(self) -> dict:
        return {"draft": self.name, "num_heads": self.heads.num_heads, "draft_vocab": self.heads.lm_head.out_features}

    def observe(self, request_id, token_ids, start, hidden) -> None:
        self._last[request_id] = (start + hidden.shape[0] - 1, hidden[-1])

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        rows = [i for i, r in enumerate(requests)
                if self._last.get(r.request_id, (-1,))[0] == len(r.token_ids) - 2]
        out = [Draft([]) for _ in requests]
        if not rows:
            return out
        with torch.inference_mode():
            logits = self.heads(torch.stack([self._last[requests[i].request_id][1] for i in rows]))  # [R, K, V']
        for j, i in enumerate(rows):
            r = requests[i]
            k = min(r.num_draft_tokens, self.heads.num_heads)
            tokens, probs = _pick(logits[j, :k], [r] * k, self.heads.vocab, self.target_vocab_size)
            out[i] = _draft(tokens, probs)
        return out

    def release(self, request_id: str) -> None:
        self._last.pop(request_id, None)


class EagleDraft(nn.Module):
    """One decoder layer over fc([embed(x_{j+1}); f_j]) that predicts the target's next feature f_{j+1}
    (Li et al. 2024); tokens are read off the prediction with the target's LM head (its draft-vocabulary rows).
    """

    def __init__(self, target: Transformer, head: torch.Tensor | None = None, vocab: torch.Tensor | None = None):
        super().__init__()
        self.rewrites: list[str] = []
        size = target.args.vocab_size if head is None else head.shape[0]
        args = replace(target.args, num_layers=1, tie_embeddings=False, vocab_size=size)
        dim = args.dim
        with torch.device("meta"):
            self.body = Transformer(args, attention=target.attention, kernels=target.kernel_backend,
                                    act_dtype=target.act_dtype)
        self.body.layers = nn.ModuleList([_plain_copy(target.layers[-1])])  # start from the target's top layer
        self.body.norm = nn.Parameter(target.norm.detach().clone())
        self.body.embed = target.embed  # shared and frozen
        if head is None:
            self.body.lm_head = target.lm_head  # the target's own head, shared
        else:
            self.body.lm_head = Linear(dim, size, bias=False, device="meta")
            self.body.lm_head.weight = nn.Parameter(head, requires_grad=False)
        self.body.inv_freq = target.inv_freq
        self.fc = Linear(2 * dim, dim, bias=True)
        with torch.no_grad():  # start as "feature in, feature out": the fc passes f_j through
            self.fc.weight.zero_()
            self.fc.weight[:, dim:] = torch.eye(dim)
            self.fc.bias.zero_()
        self.register_buffer("vocab", vocab, persistent=False)

    def inputs(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The layer's input [N, dim] from tokens [N] and the features [N, dim] before them."""
        e = self.body.embed(tokens).to(features.dtype)
        return self.fc(torch.cat([e, features], dim=-1))


class EagleProposer(Proposer):
    """EAGLE drafting: its own one-layer KV cache over (target feature, next token) pairs, caught up with the
    target's features of the tokens it kept, then extrapolated on its own predicted features (chain drafts)."""

    name = "eagle"
    needs_hidden = True

    def __init__(self, draft: EagleDraft, target_vocab_size: int, max_num_seqs: int = 16,
                 kv_cache_mb: float | None = 64):
        self.draft, self.target_vocab_size = draft, target_vocab_size
        self.runner = _runner(draft.body, max_num_seqs, kv_cache_mb)
        # per request: offset (first position with a feature), entries cached from the target's features,
        # and the target features waiting to be cached (positions offset + done onwards)
        self._state: dict[str, list] = {}

    def describe(self) -> dict:
        return {"draft": self.name, "draft_vocab": self.draft.body.lm_head.out_features}

    def observe(self, request_id, token_ids, start, hidden) -> None:
        state = self._state.get(request_id)
        if state is None or start != state[0] + state[1] + sum(len(h) for h in state[2]):
            # first features, or a gap (a prefix served from the prefix cache was never computed): the draft
            # then attends only to what follows
            self.runner.release(request_id)
            state = self._state[request_id] = [start, 0, []]
        state[2].append(hidden.detach())

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        live, rows, feats = [], [], []
        for r in requests:
            state = self._state.get(r.request_id)
            if state is None:
                continue
            offset, done, pending = state
            L, k = len(r.token_ids), r.num_draft_tokens
            pending_n = sum(len(h) for h in pending)
            if offset + done + pending_n != L - 1 or done + pending_n == 0:
                continue  # features missing for some kept token: no draft this time
            entries = L - 1 - offset  # entry e pairs feature f_{offset+e} with token x_{offset+e+1}
            if not self.runner.reserve(r.request_id, entries + k - 1, done):
                continue
            live.append(r)
            rows.append(RowSpan(r.request_id, r.token_ids[offset + 1:], done, entries - done))
            feats.append(torch.cat(pending) if pending else None)
            state[1], state[2] = entries, []
        drafts: dict[str, tuple[list[int], list]] = {r.request_id: ([], []) for r in live}
        draft = self.draft
        with torch.inference_mode():
            while live:
                ids = torch.tensor([t for row in rows for t in row.new_token_ids], device=feats[0].device)
                x = draft.inputs(ids, torch.cat(feats))
                out = self.runner.forward(rows, list(range(len(rows))), return_hidden=True, embeds=x)
                tokens, probs = _pick(out.logits, live, draft.vocab, self.target_vocab_size)
                ends = torch.tensor([0, *(row.length for row in rows)]).cumsum(0)
                next_live, next_rows, next_feats = [], [], []
                for i, (r, row, t, q) in enumerate(zip(live, rows, tokens, probs)):
                    got, qs = drafts[r.request_id]
                    got.append(t)
                    qs.append(q)
                    if len(got) < r.num_draft_tokens:  # next entry: the predicted feature and the drafted token
                        toks = row.token_ids + [t]
                        next_live.append(r)
                        next_rows.append(RowSpan(r.request_id, toks, len(toks) - 1, 1))
                        next_feats.append(out.hidden[int(ends[i + 1]) - 1: int(ends[i + 1])])
                live, rows, feats = next_live, next_rows, next_feats
        return [_draft(*drafts.get(r.request_id, ([], []))) for r in requests]

    def release(self, request_id: str) -> None:
        self._state.pop(request_id, None)
        self.runner.release(request_id)


def frequency_vocab(sequences: Sequence[Sequence[int]], size: int, vocab_size: int,
                    always: Sequence[int] = ()) -> torch.Tensor:
    """A draft vocabulary of `size` tokens: `always`, then the tokens of the sequences by frequency (ties: lower
    id first), then unseen tokens by id (a BPE tokenizer numbers its merges in order, common ones first)."""
    counts: dict[int, int] = {}
    for seq in sequences:
        for t in seq:
            counts[t] = counts.get(t, 0) + 1
    ranked = list(dict.fromkeys([*always, *sorted(counts, key=lambda t: (-counts[t], t))]))[:size]
    seen = set(ranked)
    ranked += [t for t in range(vocab_size) if t not in seen][: size - len(ranked)]
    return torch.tensor(ranked, dtype=torch.long)


def use_target_layout(module: nn.Module, target: Transformer) -> nn.Module:
    """Store a draft network's weights in the target's layout ([in, out] where the target uses it); returns it.

    Modules shared with the target are already in its layout and stay untouched."""
    if "layout:kn" in target.rewrites and "layout:kn" not in module.rewrites:
        use_kn_layout(module)
    return module


__all__ = ["NgramProposer", "ModelProposer", "MedusaProposer", "EagleProposer", "MedusaHeads", "EagleDraft",
           "ResBlock", "self_draft", "small_draft", "head_rows", "frequency_vocab", "use_target_layout",
           "SELF_DRAFT_SCHEMES"]
