"""Distil the learned drafts from the target: a small draft model, Medusa heads and an EAGLE head, on CPU in minutes.

There is no smaller SmolLM2 offline, so every learned draft is distilled from the target on text the target
generates itself (self-distillation, as Medusa-2 and EAGLE train): the target answers a seeded mix of prompts
(stories, questions, instructions over a given text) while a recording proposer keeps its final hidden
states, the features its LM head reads. Those features give every training signal without another pass
through the target: the teacher's next-token distribution at position j is its LM head over f_j, restricted
to the draft vocabulary (the most frequent tokens of the generated text, Zhao et al. 2025).

- draft: a few target layers (evenly spaced) with the shared embedding and a draft-vocabulary head, trained
  to match the teacher's distribution (KL; Hinton et al. 2015);
- medusa: head i over f_j learns the teacher's distribution at j + 1 + i (Cai et al. 2024, loss weights 0.8^i);
- eagle: one layer over fc([embed(x_{j+1}); f_j + noise]) regresses f_{j+1} (smooth L1) and matches the
  teacher's distribution read from it (weight 0.1), as Li et al. 2024 train EAGLE.

`labkit.speculative.training.load_or_train` trains them once and caches the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from labkit.checks import check_int, check_positive
from labkit.model.attention import build_metadata
from labkit.model.kv_cache import KVCache
from labkit.model.llama import Transformer
from labkit.engine.spec_decode.proposers import EagleDraft, MedusaHeads, head_rows, small_draft
from labkit.engine.spec_decode.speculator import Proposer, Speculator

KINDS = ("draft", "medusa", "eagle")
SIZES = ("smoke", "small", "default", "large")


@dataclass(frozen=True)
class TrainConfig:
    """The corpus, the draft networks' shapes and the optimiser; validated on creation."""

    num_sequences: int = 64  # prompts the target answers for the corpus
    max_new_tokens: int = 128  # tokens it generates for each
    temperature: float = 0.7  # the target samples part of its corpus (seeded): varied text, still its own habits
    greedy_every: int = 2  # every n-th answer is greedy instead: the contexts greedy decoding will meet
    seed: int = 0
    draft_vocab_size: int = 8192  # the draft heads' vocabulary: the most frequent tokens of the corpus
    draft_layers: int = 2  # layers of the small draft model
    medusa_heads: int = 4
    num_steps: int = 200  # optimiser steps per draft
    batch_size: int = 4  # windows per step
    window: int = 128  # tokens per window
    lr: float = 1e-3

    def __post_init__(self):
        for f in fields(self):
            if f.name in ("temperature", "lr"):
                check_positive(f.name, getattr(self, f.name))
            else:
                check_int(f.name, getattr(self, f.name), 0 if f.name == "seed" else 1)

    def key(self) -> str:
        return hashlib.blake2b(json.dumps(asdict(self), sort_keys=True).encode(), digest_size=6).hexdigest()


TRAIN_SIZES = {
    "smoke": TrainConfig(num_sequences=6, max_new_tokens=24, draft_vocab_size=1024, draft_layers=1, medusa_heads=3,
                         num_steps=6, batch_size=2, window=32),
    "small": TrainConfig(num_sequences=24, max_new_tokens=64, draft_vocab_size=4096, num_steps=60, batch_size=4,
                         window=64),
    "default": TrainConfig(),
    # eight times the text and 15x the steps: the learned drafts over-fit the default corpus (teacher-forced
    # top-1 on their own training text about three times that on new text)
    "large": TrainConfig(num_sequences=512, max_new_tokens=128, num_steps=1500, batch_size=8),
}

# The corpus prompts: topics crossed with kinds of request, none of them the benchmark's prompts.
TOPICS = ("the ocean", "volcanoes", "a lost dog", "the moon landing", "bread baking", "a robot gardener",
          "honey bees", "the Roman empire", "electric cars", "a haunted lighthouse", "photosynthesis",
          "learning to swim", "the stock market", "a dragon who cannot fly", "recycling", "jazz music",
          "a city under the sea", "climate change", "chess", "a time traveller", "vaccines", "the desert",
          "friendship", "rainforests", "a detective cat", "the internet", "mountain climbing", "coffee",
          "black holes", "a village festival", "sorting algorithms", "penguins")
TEMPLATES = (("Write a short story about {}.", True), ("Explain {} to a ten-year-old.", True),
             ("What are five interesting facts about {}?", True), ("Give me tips about {}.", True),
             ("Once upon a time, there was a story about {}. It", False),
             ("Here is an essay about {}.\n\n", False),
             ("Write a Python function related to {}, with a docstring.", True),
             ("Summarize what you know about {} in three sentences.", True))


def corpus_prompts(tokenizer, num_sequences: int, seed: int) -> list[list[int]]:
    """Seeded prompts (token ids): every kind of request, over shuffled topics."""
    from labkit.engine.text import encode_prompt

    rng = random.Random(f"spec-corpus-{seed}")
    pairs = [(t, topic) for topic in TOPICS for t in TEMPLATES]
    rng.shuffle(pairs)
    return [encode_prompt(tokenizer, template.format(topic), chat) for (template, chat), topic in
            (pairs[i % len(pairs)] for i in range(num_sequences))]


class FeatureRecorder(Proposer):
    """Proposes nothing; keeps the target's final hidden states of every computed token, per request."""

    name = "recorder"
    needs_hidden = True

    def __init__(self):
        self.features: dict[str, list[torch.Tensor]] = {}

    def propose(self, requests):
        from labkit.engine.spec_decode.speculator import Draft

        return [Draft([]) for _ in requests]

    def observe(self, request_id, token_ids, start, hidden) -> None:
        got = self.features.setdefault(request_id, [])
        assert sum(len(h) for h in got) == start, "features must arrive in order, without gaps"
        got.append(hidden.detach().float().clone())


@dataclass
class Corpus:
    """The target's own text as one stream: tokens [N], the target's features [N, dim] at each token, and the
    generated outputs (for the draft vocabulary)."""

    tokens: torch.Tensor
    features: torch.Tensor
    outputs: list[list[int]]
    generate_s: float

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def generate_corpus(target: Transformer, tokenizer, config: TrainConfig, progress: bool = False) -> Corpus:
    """The target answers `config.num_sequences` prompts by sampling; its features are recorded on the way."""
    from tqdm.auto import tqdm

    from labkit.engine.engine import Engine

    recorder = FeatureRecorder()
    # no prefix caching: every token is computed, so every token has its feature; wide batches for a big corpus
    rows = min(64, max(16, config.num_sequences // 4))
    engine = Engine(target, tokenizer, speculator=Speculator(recorder), max_num_seqs=rows, enable_prefix_caching=False,
                    eos_token_ids=[t for t in (getattr(tokenizer, "eos_token_id", None),) if t is not None])
    prompts = corpus_prompts(tokenizer, config.num_sequences, config.seed)
    lap = len(TOPICS) * len(TEMPLATES)  # past one lap of the prompts, the other half of each is greedy

    def greedy(i):
        return (i + i // lap) % config.greedy_every == 0

    params = [engine.sampling_params(max_new_tokens=config.max_new_tokens,  # answers end at EOS
                                     temperature=0.0 if greedy(i) else config.temperature,
                                     seed=config.seed * 100003 + i, detokenize=False)
              for i in range(len(prompts))]
    start = time.perf_counter()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outputs = {rid: [] for rid in ids}
    with tqdm(total=len(prompts) * config.max_new_tokens, desc="corpus", unit="tok", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        while engine.has_unfinished:
            for out in engine.step():
                outputs[out.request_id].extend(out.new_token_ids)
                bar.update(len(out.new_token_ids))
    tokens, feats = [], []
    for rid, prompt in zip(ids, prompts):
        seq = prompt + outputs[rid]
        f = torch.cat(recorder.features[rid])  # every token but the last, which was never computed
        tokens.extend(seq[: len(f)])
        feats.append(f)
    return Corpus(torch.tensor(tokens), torch.cat(feats), [outputs[r] for r in ids], time.perf_counter() - start)


def dense_forward(model: Transformer, tokens: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Causal forward of B fresh rows (training): tokens [B, T] -> hidden [B, T, dim], through the lab's own
    paged attention (every row attends to its own tokens; a scratch cache takes the K/V writes)."""
    B, T = tokens.shape
    bs = 16
    per_row = -(-T // bs)
    cache = KVCache(model.args.num_layers, B * per_row, bs, model.num_kv_heads, model.args.head_dim,
                    tokens.device, model.act_dtype)
    tables = [list(range(b * per_row, (b + 1) * per_row)) for b in range(B)]
    slots = [b * per_row * bs + t for b in range(B) for t in range(T)]
    meta = build_metadata([T] * B, [T] * B, tables, slots, bs, tokens.device)
    flat = None if embeds is None else embeds.reshape(B * T, -1)
    return model(tokens.reshape(-1), meta, cache, embeds=flat).view(B, T, -1)


def _windows(corpus: Corpus, config: TrainConfig, length: int, rng: torch.Generator) -> torch.Tensor:
    """Random window starts [batch] so that `length` tokens fit."""
    high = max(1, corpus.num_tokens - length)
    return torch.randint(0, high, (config.batch_size,), generator=rng)


def _gather(x: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    index = starts[:, None] + torch.arange(length)  # [B, length]
    return x[index]


def _soft_targets(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """The teacher's distribution over the draft vocabulary: softmax of its head rows over features [.., dim]."""
    return (features @ head.t()).softmax(dim=-1)


def _trainable(module: torch.nn.Module, names: tuple[str, ...] = ()) -> list[torch.nn.Parameter]:
    params = []
    for name, p in module.named_parameters():
        keep = not names or any(name.startswith(n) for n in names)
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    return params


def _fit(module: torch.nn.Module, params, loss_fn, config: TrainConfig, desc: str, progress: bool) -> dict:
    """Train params of module (frozen again afterwards) by AdamW with warm-up, a cosine schedule and clipping;
    loss_fn(step) -> loss. Returns the first and last losses."""
    with torch.enable_grad():
        metrics = _optimise(params, loss_fn, config, desc, progress)
    module.requires_grad_(False)
    return metrics


def _optimise(params, loss_fn, config: TrainConfig, desc: str, progress: bool) -> dict:
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / config.num_steps)))
    losses = []
    with tqdm(range(config.num_steps), desc=desc, unit="step", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for step in bar:
            loss = loss_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    tail = losses[-max(1, len(losses) // 10):]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail), "num_steps": len(losses)}


def train_small_draft(target: Transformer, corpus: Corpus, vocab: torch.Tensor, config: TrainConfig,
                      progress: bool = False) -> tuple[Transformer, dict]:
    """A few-layer draft matching the teacher's next-token distribution over the draft vocabulary."""
    model = small_draft(target, config.draft_layers, vocab)
    head = head_rows(target, vocab)
    params = _trainable(model, ("layers", "norm", "lm_head"))
    rng = torch.Generator().manual_seed(config.seed)
    T = min(config.window, corpus.num_tokens - 1)

    def loss_fn(step):
        starts = _windows(corpus, config, T, rng)
        tokens, feats = _gather(corpus.tokens, starts, T), _gather(corpus.features, starts, T)
        logits = model.logits(dense_forward(model, tokens))  # [B, T, V']
        return F.cross_entropy(logits.flatten(0, 1), _soft_targets(feats, head).flatten(0, 1))

    return model, _fit(model, params, loss_fn, config, "train draft", progress)


def train_medusa(target: Transformer, corpus: Corpus, vocab: torch.Tensor, config: TrainConfig,
                 progress: bool = False) -> tuple[MedusaHeads, dict]:
    """Medusa heads: head i over f_j matches the teacher's distribution at j + 1 + i (weights 0.8^i)."""
    head = head_rows(target, vocab)
    heads = MedusaHeads(target.args.dim, config.medusa_heads, head.clone(), vocab)
    params = _trainable(heads, ("blocks",))
    K = config.medusa_heads
    rng = torch.Generator().manual_seed(config.seed + 1)
    T = min(config.window, corpus.num_tokens - K - 1)
    weights = torch.tensor([0.8**i for i in range(K)])

    def loss_fn(step):
        starts = _windows(corpus, config, T + K, rng)
        feats = _gather(corpus.features, starts, T + K)  # [B, T + K, dim]
        logits = heads(feats[:, :T].flatten(0, 1)).view(-1, T, K, head.shape[0])  # [B, T, K, V']
        with torch.no_grad():
            targets = _soft_targets(feats[:, 1:], head)  # [B, T + K - 1, V']: position j + 1 + i for head i
        losses = torch.stack([F.cross_entropy(logits[:, :, i].flatten(0, 1), targets[:, i:i + T].flatten(0, 1))
                              for i in range(K)])
        return (weights * losses).sum() / weights.sum()

    return heads, _fit(heads, params, loss_fn, config, "train medusa", progress)


def train_eagle(target: Transformer, corpus: Corpus, vocab: torch.Tensor, config: TrainConfig,
                progress: bool = False) -> tuple[EagleDraft, dict]:
    """EAGLE: regress f_{j+1} from (f_j + noise, x_{j+1}) and match the teacher's distribution read from it."""
    head = head_rows(target, vocab)
    draft = EagleDraft(target, head.clone(), vocab)
    params = _trainable(draft, ("fc", "body.layers", "body.norm"))
    rng = torch.Generator().manual_seed(config.seed + 2)
    T = min(config.window, corpus.num_tokens - 2)
    scale = corpus.features.pow(2).mean().sqrt()  # the features' RMS: noise and regression are relative to it

    def loss_fn(step):
        starts = _windows(corpus, config, T + 1, rng)
        tokens, feats = _gather(corpus.tokens, starts, T + 1), _gather(corpus.features, starts, T + 1)
        noisy = feats[:, :T] + (torch.rand(feats[:, :T].shape, generator=rng) - 0.5) * 0.2 * scale
        x = draft.inputs(tokens[:, 1:].reshape(-1), noisy.reshape(-1, noisy.shape[-1])).view(*noisy.shape)
        pred = dense_forward(draft.body, tokens[:, 1:], x)  # [B, T, dim]: the predicted f_{j+1}
        regress = F.smooth_l1_loss(pred / scale, feats[:, 1:] / scale)
        with torch.no_grad():
            targets = _soft_targets(feats[:, 1:], head)
        classify = F.cross_entropy(draft.body.logits(pred).flatten(0, 1), targets.flatten(0, 1))
        return regress + 0.1 * classify

    return draft, _fit(draft, params, loss_fn, config, "train eagle", progress)



TRAINERS = {"draft": train_small_draft, "medusa": train_medusa, "eagle": train_eagle}

__all__ = ["TrainConfig", "Corpus", "FeatureRecorder", "TRAIN_SIZES", "TRAINERS", "KINDS", "SIZES", "TOPICS",
           "TEMPLATES", "generate_corpus", "corpus_prompts", "dense_forward", "train_small_draft", "train_medusa",
           "train_eagle"]
