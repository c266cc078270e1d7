"""Train the learned drafts in the lab: a small draft model, Medusa heads and an EAGLE head, on CPU in minutes.

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

Trained weights are saved under the labkit cache (`labkit.model.loader.cache_dir()/spec`) with the config and the
target they fit, and loaded instead of retrained when both match. `labkit spec train --kind ...` trains
outside a notebook.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit.model.attention import build_metadata
from labkit.model.kv_cache import KVCache
from labkit.speculative.proposers import (EagleDraft, EagleProposer, MedusaHeads, MedusaProposer, ModelProposer, frequency_vocab,
                           head_rows, small_draft, use_target_layout)
from labkit.model.llama import Transformer
from labkit.speculative.speculator import Proposer, Speculator

KINDS = ("draft", "medusa", "eagle")
SIZES = ("smoke", "small", "default", "large")
FORMAT_VERSION = 1


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
            value = getattr(self, f.name)
            if f.name == "temperature" or f.name == "lr":
                if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                    raise ValueError(f"{f.name} must be a number > 0, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < (0 if f.name == "seed" else 1):
                raise ValueError(f"{f.name} must be an integer >= {0 if f.name == 'seed' else 1}, got {value!r}")

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
        from labkit.speculative.speculator import Draft

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


# -- the cache -----------------------------------------------------------------------------------------------
def target_fingerprint(target: Transformer) -> str:
    """A short id of the target's weights (shape, embedding, first and last layers), so drafts fit one model."""
    h = hashlib.blake2b(digest_size=8)
    args = target.args
    h.update(json.dumps([args.vocab_size, args.dim, args.num_layers, args.num_heads, args.num_kv_heads,
                         args.hidden_dim]).encode())
    for tensor in (target.embed.weight, target.layers[0].attn_norm, target.layers[-1].mlp_norm, target.norm):
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def spec_cache_dir() -> Path:
    from labkit.model.loader import cache_dir

    return cache_dir() / "spec"


def cache_path(kind: str, size: str, config: TrainConfig, target: Transformer) -> Path:
    return spec_cache_dir() / f"{kind}-{size}-{config.key()}-{target_fingerprint(target)}.safetensors"


@dataclass
class TrainedDraft:
    """A learned draft: its network, the draft vocabulary, how it was trained, and where it is cached."""

    kind: str
    size: str
    module: torch.nn.Module
    vocab: torch.Tensor
    config: TrainConfig
    metrics: dict
    path: Path | None
    loaded: bool  # True: read from the cache; False: trained now

    def proposer(self, target: Transformer) -> Proposer:
        """The proposer over this draft, its weights in the target's layout."""
        V = target.args.vocab_size
        module = use_target_layout(self.module, target)
        if self.kind == "draft":
            proposer = ModelProposer(module, name="draft", vocab=self.vocab, target_vocab_size=V)
        elif self.kind == "medusa":
            proposer = MedusaProposer(module, V)
        else:
            proposer = EagleProposer(module, V)
        proposer.training = {"train_size": self.size, "loaded_from_cache": self.loaded,
                             "draft_vocab": len(self.vocab), "final_loss": self.metrics.get("final_loss")}
        return proposer


def _build(kind: str, target: Transformer, vocab: torch.Tensor, config: TrainConfig) -> torch.nn.Module:
    head = head_rows(target, vocab)
    if kind == "draft":
        return small_draft(target, config.draft_layers, vocab)
    if kind == "medusa":
        return MedusaHeads(target.args.dim, config.medusa_heads, head, vocab)
    return EagleDraft(target, head, vocab)


TRAINERS = {"draft": train_small_draft, "medusa": train_medusa, "eagle": train_eagle}
_SAVED = {"draft": ("layers.", "norm", "lm_head."), "medusa": ("blocks.",),
          "eagle": ("fc.", "body.layers.", "body.norm")}


def _state(kind: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors only: the shared embedding and frozen head rows are rebuilt from the target."""
    return {k: v.detach().contiguous() for k, v in module.state_dict().items() if k.startswith(_SAVED[kind])}


def save_draft(trained: TrainedDraft, path: Path, target: Transformer) -> None:
    """Write weights and their config atomically (a temp file renamed into place)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {**_state(trained.kind, trained.module), "draft_vocab": trained.vocab}
    meta = {"format": str(FORMAT_VERSION), "kind": trained.kind, "size": trained.size,
            "config": json.dumps(asdict(trained.config)), "metrics": json.dumps(trained.metrics),
            "target": target_fingerprint(target)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_draft(path: Path, target: Transformer) -> TrainedDraft:
    """Read a cached draft and rebuild it around the target; ValueError if it was trained for another one."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != str(FORMAT_VERSION) or meta.get("target") != target_fingerprint(target):
        raise ValueError(f"{path} was saved for another target or format")
    kind, config = meta["kind"], TrainConfig(**json.loads(meta["config"]))
    vocab = tensors.pop("draft_vocab")
    module = _build(kind, target, vocab, config)
    missing = set(_state(kind, module)) - set(tensors)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)[:3]}")
    module.load_state_dict(tensors, strict=False, assign=False)
    module.requires_grad_(False)
    return TrainedDraft(kind, meta["size"], module, vocab, config, json.loads(meta["metrics"]), path, True)


def resolve_size(kind: str, size: str, target: Transformer, fallback: str = "smoke") -> str:
    """"auto": the largest size already cached for this kind and target, else `fallback`; others as given."""
    if size != "auto":
        if size not in SIZES:
            raise ValueError(f"unknown training size {size!r}: choose auto or one of {', '.join(SIZES)}")
        return size
    for name in ("large", "default"):
        if cache_path(kind, name, TRAIN_SIZES[name], target).exists():
            return name
    return fallback


def load_or_train(kinds, target: Transformer, tokenizer, size: str = "default", progress: bool = False,
                  force: bool = False, save: bool = True, config: TrainConfig | None = None,
                  log=None, fallback: str = "smoke") -> dict[str, TrainedDraft]:
    """Each learned draft of `kinds`, from the cache when it holds one for this config and target, else trained
    (on one corpus shared by all kinds) and saved. size "auto": the largest cached size, else `fallback`.
    `config` overrides the size's config (tests)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown draft kind {bad[0]!r}: choose from {', '.join(KINDS)}")
    out, todo = {}, []
    for kind in kinds:
        name = resolve_size(kind, size, target, fallback) if config is None else size
        cfg = config or TRAIN_SIZES[name]
        path = cache_path(kind, name, cfg, target)
        if path.exists() and not force:
            try:
                out[kind] = load_draft(path, target)
                if log:
                    log(f"{kind}: loaded {path}")
                continue
            except Exception as exc:  # a stale or torn file is retrained, not trusted
                if log:
                    log(f"{kind}: retraining, the cached file did not load ({exc})")
        todo.append((kind, name, cfg, path))
    corpora: dict[str, Corpus] = {}
    for kind, name, cfg, path in todo:
        key = cfg.key()
        if key not in corpora:
            corpora[key] = generate_corpus(target, tokenizer, cfg, progress)
        corpus = corpora[key]
        eos = [t for t in (getattr(tokenizer, "eos_token_id", None),) if t is not None]
        vocab = frequency_vocab(corpus.outputs, min(cfg.draft_vocab_size, target.args.vocab_size),
                                target.args.vocab_size, always=eos)
        start = time.perf_counter()
        module, metrics = TRAINERS[kind](target, corpus, vocab, cfg, progress)
        metrics.update(train_s=time.perf_counter() - start, corpus_tokens=corpus.num_tokens,
                       corpus_generate_s=corpus.generate_s)
        trained = TrainedDraft(kind, name, module, vocab, cfg, metrics, path if save else None, False)
        if save:
            save_draft(trained, path, target)
        if log:
            log(f"{kind}: trained ({name}) in {metrics['train_s']:.0f} s, loss {metrics['first_loss']:.2f} -> "
                f"{metrics['final_loss']:.2f}" + (f"; saved {path}" if save else ""))
        out[kind] = trained
    return {k: out[k] for k in kinds}


# -- the command line ----------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    from labkit.cli.arguments import comma_list

    spec = subparsers.add_parser("spec", help="speculative decoding: train the learned drafts",
                                 description="Speculative decoding tools. Benchmark with `labkit bench spec`.")
    sub = spec.add_subparsers(dest="spec_command", metavar="COMMAND", required=True)
    p = sub.add_parser("train", help="train (or load from the cache) the draft model, Medusa heads, EAGLE head",
                       description="Generate a corpus with the target, distil the learned drafts from it and save "
                                   f"them under the labkit cache ({spec_cache_dir()}); cached drafts that fit the "
                                   "config and the target are loaded instead, unless --force.")
    p.add_argument("--kind", type=comma_list(str), default=KINDS,
                   help=f"comma-separated from {', '.join(KINDS)} (default: all)")
    p.add_argument("--size", choices=SIZES, default="default",
                   help="smoke (seconds, for CI), small, default (minutes on 2 cores), large (default: default)")
    p.add_argument("--model", default=None, help="target model (default: the embedded SmolLM2)")
    p.add_argument("--dummy", action="store_true", help="random weights from a preset (e.g. tiny-smollm2)")
    p.add_argument("--force", action="store_true", help="retrain even when the cache holds the drafts")
    p.add_argument("--json", action="store_true", help="print what was trained or loaded as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from tqdm.auto import tqdm

    from labkit.model.rewrites import apply_rewrites
    from labkit.model.llama import from_hf
    from labkit.model.loader import EMBEDDED_MODEL, load_model

    bad = [k for k in args.kind if k not in KINDS]
    if bad:
        raise ValueError(f"unknown draft kind {bad[0]!r}: choose from {', '.join(KINDS)}")
    loaded = load_model(args.model or EMBEDDED_MODEL, device="cpu", dummy=args.dummy)
    if loaded.tokenizer is None:
        raise ValueError("the target needs a tokenizer to write its corpus")
    target = apply_rewrites(from_hf(loaded.model))
    log = (lambda msg: tqdm.write(msg, file=sys.stderr))
    trained = load_or_train(args.kind, target, loaded.tokenizer, size=args.size, progress=not args.no_progress,
                            force=args.force, log=log)
    summary = [{"kind": t.kind, "size": t.size, "path": str(t.path), "loaded": t.loaded, "metrics": t.metrics,
                "config": asdict(t.config)} for t in trained.values()]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for s in summary:
            print(f"{s['kind']:7s} {s['size']:8s} {'loaded' if s['loaded'] else 'trained'}  {s['path']}")
    return 0


__all__ = ["TrainConfig", "TrainedDraft", "Corpus", "FeatureRecorder", "TRAIN_SIZES", "KINDS", "SIZES",
           "generate_corpus", "train_small_draft", "train_medusa", "train_eagle", "load_or_train", "load_draft",
           "save_draft", "cache_path", "resolve_size", "target_fingerprint", "dense_forward", "corpus_prompts"]
