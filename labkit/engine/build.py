"""From a configuration to a model the engine runs: load, convert to the compact model, apply the rewrites."""

from __future__ import annotations

from dataclasses import replace

import torch

from labkit.device import dtype_name
from labkit.engine.config import DTYPE_ALIASES, MODEL_DTYPES, EngineConfig, ModelConfig
from labkit.model.llama import Transformer, from_hf
from labkit.model.rewrites import apply_rewrites


def build_model(hf_model, config: ModelConfig, dtype: torch.dtype | None = None) -> Transformer:
    """The compact model of an HF one with config's backends, then its rewrites in order (quantization, or the
    weight layout and packed GEMM: `labkit.model.rewrites.apply_rewrites`). dtype: convert the weights (None:
    keep the HF model's)."""
    model = from_hf(hf_model, dtype=dtype, attention=config.attention, kernels=config.kernels)
    return apply_rewrites(model, linear_layout=config.linear_layout, quantize=config.quantize, gemm=config.gemm)


def resolve_config(config: EngineConfig | None, kwargs: dict, **model_fields) -> EngineConfig:
    """One EngineConfig from a config or flat keyword arguments (`EngineConfig.from_kwargs`; `quantize` is
    ModelConfig's `quantization`), with the model fields given (those not None) set on its ModelConfig."""
    kwargs = dict(kwargs)
    if "quantize" in kwargs:
        kwargs["quantization"] = kwargs.pop("quantize")
    if config is None:
        config = EngineConfig.from_kwargs(**kwargs)
    elif kwargs:
        raise ValueError(f"pass an EngineConfig or keyword arguments ({', '.join(kwargs)}), not both")
    given = {k: dtype_name(v) if isinstance(v, torch.dtype) else v for k, v in model_fields.items() if v is not None}
    if given.get("dtype") not in (None, *MODEL_DTYPES, *DTYPE_ALIASES):
        given.pop("dtype")  # a dtype the model config does not name (e.g. float64 from a caller's model)
    return replace(config, model=replace(config.model, **given)) if given else config


__all__ = ["build_model", "resolve_config"]
