"""A Speculator from the engine's configuration: vLLM's --speculative-config methods over the lab's proposers."""

from __future__ import annotations

from labkit.engine.config import EngineConfig, SpeculativeConfig
from labkit.engine.spec_decode.proposers import ModelProposer, NgramProposer, self_draft
from labkit.engine.spec_decode.speculator import Speculator
from labkit.model.llama import Transformer, from_hf
from labkit.model.rewrites import apply_rewrites

DRAFT_SEED_OFFSET = 1  # a dummy draft's random weights differ from a dummy target's, so drafts get rejected too


def build_speculator(config: EngineConfig, target: Transformer) -> Speculator | None:
    """The speculator config.speculative describes for this target (None without one): n-gram prompt lookup, a
    draft model with its own paged cache, or a quantized copy of the target; drafts run compiled when the
    engine's decode step does."""
    spec = config.speculative
    if spec is None:
        return None
    max_num_seqs = config.scheduler.max_num_seqs
    if spec.method == "ngram":
        proposer = NgramProposer(spec.prompt_lookup_max, spec.prompt_lookup_min)
    elif spec.method == "self_draft":
        proposer = ModelProposer(self_draft(target, spec.quantization), name=f"self-{spec.quantization}",
                                 max_num_seqs=max_num_seqs, compile=config.compile)
    else:
        proposer = ModelProposer(load_draft(spec, config, target), name=spec.model, max_num_seqs=max_num_seqs,
                                 compile=config.compile)
    return Speculator(proposer, spec)


def load_draft(spec: SpeculativeConfig, config: EngineConfig, target: Transformer) -> Transformer:
    """The draft model of method draft_model: loaded like the target (device, dtype; random weights when the
    target's are), built as a compact model in the target's layout, and checked to share its vocabulary."""
    from labkit.model.loader import load_model

    m = config.model
    device = target.embed.weight.device
    loaded = load_model(spec.model, device=device, dtype=target.embed.weight.dtype, dummy=m.dummy,
                        seed=m.seed + DRAFT_SEED_OFFSET, with_tokenizer=False)
    draft = from_hf(loaded.model, attention=target.attention, kernels=target.kernel_backend,
                    act_dtype=target.act_dtype)
    if draft.args.vocab_size != target.args.vocab_size:
        raise ValueError(f"speculative model {spec.model!r} has a vocabulary of {draft.args.vocab_size} tokens, the "
                         f"target {target.args.vocab_size}: a draft must share the target's tokenizer")
    return apply_rewrites(draft, linear_layout=m.linear_layout, gemm=m.gemm)  # the target's layout rules


__all__ = ["build_speculator", "load_draft"]
