"""Which techniques compose: a combination that cannot work is refused with one line naming both parts.

`check_config` runs when an EngineConfig is built (what the config alone decides); `check_engine` when the engine
starts (what needs the built model or its device). Each refusal here fails when tried (tests/engine/
test_compose.py tries every pair of techniques on a tiny model); every other pair decodes greedy-identically.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labkit.model.loader import EMBEDDED_ALIASES

if TYPE_CHECKING:
    import torch

    from labkit.model.llama import Transformer

TP_SPLITTABLE = (None, "int8")  # labkit.parallel.tp splits dense and int8 linears only
DRAFT_METHODS = ("draft_model", "self_draft")  # a second network with its own cache, unsplit


def check_config(config) -> None:  # an EngineConfig
    """Refuse the combinations the config alone rules out."""
    m, spec, tp = config.model, config.speculative, config.parallel.tensor_parallel_size
    if m.quantization == "gguf" and (m.dummy or m.model not in EMBEDDED_ALIASES):
        what = "a dummy model has none" if m.dummy else f"model {m.model!r} is not it"
        raise ValueError(f"quantization='gguf' reads the embedded model's GGUF blocks; {what}")
    if config.cuda_graphs and m.device.split(":")[0] in ("cpu", "mps"):
        raise ValueError(f"cuda_graphs=True needs a CUDA device; device={m.device!r}")
    if config.compile and "triton" in (m.attention, m.kernels):
        raise ValueError("compile=True traces the torch backends only; attention/kernels='triton' run as they are "
                         "(cuda_graphs=True removes their launch overhead)")
    if config.kv_cache_dtype == "int8" and m.attention == "triton":
        raise ValueError("kv_cache_dtype='int8' is not supported with attention='triton': its kernels read float "
                         "blocks in place; use attention='sdpa' or 'math'")
    if spec is not None and spec.method == "self_draft" and m.quantization is not None:
        raise ValueError(f"speculative method 'self_draft' quantizes a copy of the unquantized target; "
                         f"quantization={m.quantization!r} leaves none: use method 'ngram' or 'draft_model'")
    if tp > 1:
        _check_tensor_parallel(config, tp)


def _check_tensor_parallel(config, tp: int) -> None:
    m, spec = config.model, config.speculative
    if spec is not None and spec.method in DRAFT_METHODS:
        raise ValueError(f"tensor_parallel_size={tp} splits the target only; speculative method {spec.method!r} "
                         f"runs a whole draft network on every rank: use method 'ngram'")
    if m.quantize not in TP_SPLITTABLE:
        raise ValueError(f"tensor_parallel_size={tp} splits dense and int8 linears; quantization="
                         f"{m.quantization!r} has packed groups it cannot split")
    if config.scheduler.policy == "dynamic":
        raise ValueError(f"tensor_parallel_size={tp} needs every rank to batch alike; the dynamic policy waits on "
                         f"each rank's clock: use continuous or static")


def check_engine(model: Transformer, config, device: torch.device) -> None:
    """Refuse, at engine start, the combinations of the built model, its device and the config that cannot work."""
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
    if config.compile and "triton" in (model.attention, model.kernel_backend):
        raise ValueError("compile=True traces the torch backends only; the triton backends run as they are "
                         "(cuda_graphs=True removes their launch overhead)")
    if config.kv_cache_dtype == "int8" and hasattr(model.core, "paged_attention"):
        raise ValueError(f"kv_cache_dtype='int8' is not supported with attention={model.attention!r}: its kernels "
                         f"read float blocks in place; use attention='sdpa' or 'math'")
    limit, context = config.model.max_model_len, model.args.max_seq_len
    if limit is not None and limit > context:
        raise ValueError(f"max_model_len={limit} exceeds the model's context of {context} tokens")
    s = config.scheduler
    longest = limit or context
    if s.policy == "continuous" and not s.enable_chunked_prefill and s.max_num_batched_tokens < longest:
        raise ValueError(f"enable_chunked_prefill=False needs max_num_batched_tokens >= max_model_len: a prompt "
                         f"longer than {s.max_num_batched_tokens} tokens (of up to {longest}) would never run")


__all__ = ["check_config", "check_engine"]
