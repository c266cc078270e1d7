"""The learned drafts, trained once per target and config and cached: `load_or_train`.

Trained weights are saved under the labkit cache (`labkit.model.loader.cache_dir()/spec`) with the config and the
target they fit, and loaded instead of retrained when both match; the training itself is
`labkit.speculative.distillation`. `labkit spec train --kind ...` trains outside a notebook.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from labkit.model.llama import Transformer
from labkit.speculative.distillation import (KINDS, SIZES, TRAIN_SIZES, TRAINERS, Corpus, TrainConfig,
                                             generate_corpus)
from labkit.engine.spec_decode.proposers import (EagleDraft, EagleProposer, MedusaHeads, MedusaProposer, ModelProposer,
                                          frequency_vocab, head_rows, small_draft, use_target_layout)
from labkit.engine.spec_decode.speculator import Proposer

FORMAT_VERSION = 1


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


def check_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """`kinds` if every one is a learned draft's kind; else a message naming the first that is not."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown draft kind {bad[0]!r}: choose from {', '.join(KINDS)}")
    return kinds


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
    kinds = check_kinds((kinds,) if isinstance(kinds, str) else tuple(kinds))
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



__all__ = ["TrainedDraft", "load_or_train", "load_draft", "save_draft", "cache_path", "spec_cache_dir",
           "resolve_size", "check_kinds", "target_fingerprint", "FORMAT_VERSION"]
