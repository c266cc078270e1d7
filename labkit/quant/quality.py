"""The quality cost of a rewrite (quantized weights, a narrower KV cache) measured against the fp32 model.

Three measures, each over a built engine so any rewrite plugs in unchanged:
- `perplexity`: sliding-window perplexity of a text (HF's "Perplexity of fixed-length models" guide), through
  `Engine.prompt_logits`, so it runs the same paged prefill as generation.
- `greedy_agreement`: how often a candidate picks the reference's greedy token, teacher-forced along the
  reference's continuation and free-running until the first divergence.
- `layer_errors`: the relative error of the residual stream after each decoder layer (where the error enters).
Texts come from `load_text`: "pydoc" (English prose shipped with CPython, offline and identical everywhere) or
"wikitext-2" (the usual benchmark, through the `datasets` package when it is installed and can reach its hub).
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from labkit.checks import check_int
from labkit.engine.engine import Engine
from labkit.model.llama import Transformer
from labkit.model.sampling import SamplingParams

TEXTS = ("pydoc", "wikitext-2")


class TextUnavailable(RuntimeError):
    """A text that cannot be loaded on this machine; the message says which one can."""


# -- texts ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalText:
    """A text to score, with the name and sha256 that make two runs comparable."""

    name: str
    text: str
    sha256: str  # of `text` as returned (after max_chars)

    @property
    def num_chars(self) -> int:
        return len(self.text)

    def describe(self) -> dict:
        """The fields a results row records (the text itself left out)."""
        return {"text": self.name, "text_sha256": self.sha256, "text_chars": self.num_chars}


def load_text(name: str, max_chars: int | None = None) -> EvalText:
    """A text by name: "pydoc" (CPython's documentation topics, offline) or "wikitext-2" (raw test split,
    needs `datasets` and its hub); max_chars keeps only the first characters."""
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be an integer >= 1 or None, got {max_chars!r}")
    if name == "pydoc":
        from pydoc_data.topics import topics  # a dict of topic -> text; sorted keys make the order fixed

        text = "\n\n".join(topics[key] for key in sorted(topics))
    elif name == "wikitext-2":
        text = _load_wikitext2()
    else:
        raise ValueError(f"unknown text {name!r}: choose one of {', '.join(TEXTS)}")
    if max_chars is not None:
        text = text[:max_chars]
    return EvalText(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def _load_wikitext2() -> str:
    try:
        datasets = importlib.import_module("datasets")  # imported here: never at labkit's import, never offline
    except ImportError:
        raise TextUnavailable("load_text('wikitext-2') needs the `datasets` package, which is not installed; "
                              "use load_text('pydoc') for an offline text") from None
    try:
        split = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # offline, hub down, or not in the local cache: all mean "not here"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TextUnavailable(f"could not load WikiText-2 through `datasets` ({type(exc).__name__}: {reason}); "
                              f"use load_text('pydoc') for an offline text") from None
    return "\n\n".join(split["text"])  # as the HF perplexity guide joins it


# -- perplexity ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """One window of a sliding-window evaluation: the model reads tokens [begin, end) and is scored on the
    targets [score_begin, end), each predicted from the logits one position earlier."""

    begin: int
    end: int
    score_begin: int

    @property
    def num_scored(self) -> int:
        return self.end - self.score_begin


@dataclass
class PerplexityResult:
    """exp(mean NLL) over the scored tokens; nll in nats per token."""

    perplexity: float
    nll: float  # mean negative log-likelihood, nats per scored token
    num_tokens: int  # tokens scored
    context_len: int
    stride: int
    num_windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_windows(num_tokens: int, context_len: int = 512, stride: int = 256) -> list[Window]:
    """The window plan of HF's "Perplexity of fixed-length models": windows of context_len tokens moving by
    stride, each scoring only the targets the previous window did not (the first scores all but token 0).

    With stride < context_len every token after the first is scored exactly once, each with at least
    context_len - stride tokens of context (except near the start); stride == context_len is non-overlapping
    chunks, where each chunk's first token has no context and is not scored.
    """
    check_int("context_len", context_len, 2)
    check_int("stride", stride, 1)
    if stride > context_len:
        raise ValueError(f"stride must be <= context_len ({context_len}), got {stride!r}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 2:
        raise ValueError(f"num_tokens must be an integer >= 2 (a token and its target), got {num_tokens!r}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_len, num_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclass(frozen=True)
class LogitsFunction:
    """A model outside torch (llama.cpp, say): token ids -> logits [len(ids), V] of a window read from scratch."""

    fn: Callable[[list[int]], torch.Tensor]
    max_seq_len: int
    vocab_size: int


def perplexity(engine, token_ids: Sequence[int], context_len: int = 512, stride: int = 256,
               chunk_size: int | None = None) -> PerplexityResult:
    """Sliding-window perplexity of token_ids under engine: an Engine (any rewrite, any KV cache), an HFEngine,
    an HF causal LM (the peer) or a LogitsFunction. NLL summed in float64; chunk_size prefills each window in
    chunks (Engine)."""
    ids = list(token_ids)
    windows = sliding_windows(len(ids), context_len, stride)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    max_len, vocab = _limits(engine)
    if min(context_len, len(ids)) > max_len:
        raise ValueError(f"context_len {context_len} exceeds the model's context of {max_len} tokens")
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"token {bad!r} is not a token id in [0, {vocab})")
    total, count = 0.0, 0
    for w in windows:
        logits = _window_logits(engine, ids[w.begin:w.end], chunk_size)  # [end - begin, V]
        rows = logits[w.score_begin - 1 - w.begin: w.end - 1 - w.begin].double()  # predict score_begin..end-1
        targets = torch.tensor(ids[w.score_begin:w.end], device=rows.device)
        total += F.cross_entropy(rows, targets, reduction="sum").item()
        count += w.num_scored
    nll = total / count
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, num_tokens=count, context_len=context_len,
                            stride=stride, num_windows=len(windows))


def _limits(engine) -> tuple[int, int]:
    """(context length, vocabulary size) of an Engine, a LogitsFunction, an HFEngine or an HF model."""
    if isinstance(engine, Engine):
        return engine.max_seq_len, engine.model.args.vocab_size
    if isinstance(engine, LogitsFunction):
        return engine.max_seq_len, engine.vocab_size
    config = _hf_model(engine).config
    return config.max_position_embeddings, config.vocab_size


def _hf_model(engine) -> torch.nn.Module:
    """An HF causal LM, or the one a baseline engine (labkit.bench.hf.HFEngine) wraps."""
    return engine if isinstance(engine, torch.nn.Module) else engine.model


def _window_logits(engine, ids: list[int], chunk_size: int | None) -> torch.Tensor:
    """Logits [len(ids), V] at every position of ids, the window read from scratch."""
    if isinstance(engine, Engine):
        return engine.prompt_logits(ids, chunk_size=chunk_size)
    if isinstance(engine, LogitsFunction):
        return engine.fn(ids)
    model = _hf_model(engine)
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(torch.tensor([ids], device=device)).logits[0]


# -- greedy agreement ----------------------------------------------------------------------------------------
@dataclass
class AgreementResult:
    """How closely a candidate's greedy decoding follows the reference's, over the same prompts."""

    teacher_forced: float  # fraction of positions, along the reference's continuation, with the same argmax
    num_positions: int  # teacher-forced positions compared (prompts x max_tokens)
    free_running: float  # fraction of generated tokens before the first divergence
    mean_tokens_to_divergence: float  # max_tokens when a prompt never diverges
    tokens_to_divergence: list[int]  # per prompt
    max_tokens: int
    num_prompts: int

    def to_dict(self) -> dict:
        return asdict(self)


def greedy_agreement(reference_engine: Engine, engine: Engine, prompts_ids: Sequence[Sequence[int]],
                     max_tokens: int) -> AgreementResult:
    """Top-1 agreement of engine with reference_engine: teacher-forced along the reference's greedy
    continuation (both read the same tokens; both argmaxes from prefill logits), and free-running (each
    generates max_tokens greedily; count the tokens until the first difference)."""
    check_int("max_tokens", max_tokens, 1)
    prompts = [list(p) for p in prompts_ids]
    if not prompts or any(not p for p in prompts):
        raise ValueError(f"prompts_ids must be a non-empty list of non-empty token lists, got {len(prompts)} "
                         f"prompts with lengths {[len(p) for p in prompts]}")
    ref_vocab, vocab = reference_engine.model.args.vocab_size, engine.model.args.vocab_size
    if ref_vocab != vocab:
        raise ValueError(f"the engines have different vocabularies ({ref_vocab} and {vocab} tokens)")
    params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True, detokenize=False)
    reference = [g.tokens for g in reference_engine.generate(prompts, params)]
    candidate = [g.tokens for g in engine.generate(prompts, params)]
    same, diverge = 0, []
    for prompt, ref in zip(prompts, reference):
        teacher = prompt + ref[:-1]  # the last reference token is a target only
        rows = slice(len(prompt) - 1, len(teacher))  # the positions that predict ref[0], ..., ref[-1]
        a = reference_engine.prompt_logits(teacher)[rows].argmax(-1)
        b = engine.prompt_logits(teacher)[rows].argmax(-1)
        same += int((a == b.to(a.device)).sum())
    for ref, cand in zip(reference, candidate):
        diverge.append(next((i for i, (x, y) in enumerate(zip(ref, cand)) if x != y), max_tokens))
    num_positions = len(prompts) * max_tokens
    return AgreementResult(teacher_forced=same / num_positions, num_positions=num_positions,
                           free_running=sum(diverge) / num_positions,
                           mean_tokens_to_divergence=sum(diverge) / len(prompts), tokens_to_divergence=diverge,
                           max_tokens=max_tokens, num_prompts=len(prompts))


# -- layer by layer ------------------------------------------------------------------------------------------
def layer_hidden_states(model: Transformer | Engine, token_ids: Sequence[int],
                        chunk_size: int | None = None) -> list[torch.Tensor]:
    """The residual stream [T, dim] after the embedding and after each decoder layer (num_layers + 1 tensors),
    read through forward hooks during one `prompt_logits` call (no second copy of the forward)."""
    engine = model if isinstance(model, Engine) else _engine_for(model, len(token_ids))
    net = engine.model
    parts: dict[str, list[torch.Tensor]] = {"embed": []}
    hooks = [net.embed.register_forward_hook(lambda _m, _i, out: parts["embed"].append(out))]
    for i, layer in enumerate(net.layers):
        for name in ("attn", "mlp"):
            key = f"{name}{i}"
            parts[key] = []
            hooks.append(getattr(layer, name).register_forward_hook(
                lambda _m, _i, out, key=key: parts[key].append(out)))
    try:
        engine.prompt_logits(token_ids, chunk_size=chunk_size)
    finally:
        for hook in hooks:
            hook.remove()
    # the forward adds each sublayer's output to the residual stream: x = x + attn(.), then x = x + mlp(.)
    x = torch.cat(parts["embed"]).to(net.act_dtype)
    states = [x]
    for i in range(len(net.layers)):
        x = x + torch.cat(parts[f"attn{i}"])
        x = x + torch.cat(parts[f"mlp{i}"])
        states.append(x)
    return states


def _engine_for(model: Transformer, num_tokens: int) -> Engine:
    """A small engine around a bare model: just the KV blocks one prompt needs."""
    if not isinstance(model, Transformer):
        raise TypeError(f"expected a labkit Transformer or Engine, got {type(model).__name__}")
    block_size = 16
    return Engine(model, num_kv_blocks=max(1, -(-num_tokens // block_size)), block_size=block_size,
                  enable_prefix_caching=False)


def layer_errors(reference_model: Transformer | Engine, model: Transformer | Engine, token_ids: Sequence[int],
                 chunk_size: int | None = None) -> list[float]:
    """||h - h_ref|| / ||h_ref|| (Frobenius, over all positions, in float64) of the residual stream after each
    decoder layer: where a rewrite's error enters and how it grows (num_layers values)."""
    ref = layer_hidden_states(reference_model, token_ids, chunk_size)
    got = layer_hidden_states(model, token_ids, chunk_size)
    if len(ref) != len(got):
        raise ValueError(f"the models have different depths ({len(ref) - 1} and {len(got) - 1} layers)")
    errors = []
    for r, g in zip(ref[1:], got[1:]):
        r, g = r.double(), g.to(r.device).double()
        errors.append(float(torch.linalg.vector_norm(g - r) / torch.linalg.vector_norm(r)))
    return errors


__all__ = ["TEXTS", "TextUnavailable", "EvalText", "load_text", "Window", "sliding_windows", "PerplexityResult",
           "perplexity", "AgreementResult", "greedy_agreement", "layer_hidden_states", "layer_errors"]
