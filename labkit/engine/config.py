"""The engine's one configuration, shaped like vLLM's VllmConfig: an EngineConfig made of smaller configs.

`EngineConfig(model=ModelConfig(...), scheduler=SchedulerConfig(...), speculative=SpeculativeConfig(...),
parallel=ParallelConfig(...))` plus the cache and decode-step fields holds every technique, so they compose:
`Engine.load(config=...)`, `labkit serve`, `labkit bench ...` and the notebooks read the same object. Each config
is validated on creation (one-line errors naming the value), and a combination of techniques that cannot work
is refused there, with one line naming both parts (`labkit.engine.combinations`); what needs the built model is
refused when the engine starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from labkit.checks import check_choice, check_int, check_ints, check_optional_int, check_positive
from labkit.engine.combinations import check_config
from labkit.engine.scheduler import SchedulerConfig
from labkit.model.backends import ATTENTION_BACKENDS, KERNEL_BACKENDS
from labkit.model.loader import EMBEDDED_MODEL
from labkit.model.quantize import BNB_METHODS, QUANT_METHODS
from labkit.model.rewrites import GEMMS, LINEAR_LAYOUTS

KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's activation dtype; int8: codes + a scale per slot and head
MODEL_DTYPES = ("auto", "fp32", "bf16", "fp16")  # auto: labkit.device.pick_dtype's choice for the device
# vLLM's --dtype names for them, so a vLLM command line works: the config keeps the short name
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
# vLLM's --quantization names for the lab's weight rewrites (labkit.model.quantize); "int4" is GGUF's Q4_1 grouping
QUANTIZATIONS = (*QUANT_METHODS, "int4", *BNB_METHODS)
QUANTIZATION_ALIASES = {"int4": "int4-g32"}
# vLLM's "ngram" and "draft_model", and the lab's quantized copy of the target (labkit.engine.spec_decode.proposers)
SPECULATIVE_METHODS = ("ngram", "draft_model", "self_draft")
GAMMA_POLICIES = ("fixed", "adaptive")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass
class ModelConfig:
    """Which model, built how: weights, dtype, weight quantization, backends and the context limit."""

    model: str = EMBEDDED_MODEL  # embedded name, HF hub id, local directory; with dummy a preset (tiny-smollm2)
    dtype: str = "auto"  # see MODEL_DTYPES: the weights' and activations' dtype
    quantization: str | None = None  # see QUANTIZATIONS; None: the dtype's dense weights
    dummy: bool = False  # random weights of a preset's shape (tests)
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    max_model_len: int | None = None  # the longest prompt + output served; None: the model's context
    seed: int = 0  # random weights of a dummy model, and the default sampling seed
    attention: str = "sdpa"  # see labkit.model.backends
    kernels: str = "torch"
    linear_layout: str = "auto"  # see labkit.model.rewrites.apply_rewrites
    gemm: str = "auto"

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a name or a path, got {self.model!r}")
        if isinstance(self.dtype, str):
            self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        check_choice("dtype", self.dtype, MODEL_DTYPES)
        if self.quantization is not None:
            check_choice("quantization", self.quantization, QUANTIZATIONS)
        for name, choices in (("attention", ATTENTION_BACKENDS), ("kernels", KERNEL_BACKENDS),
                              ("linear_layout", LINEAR_LAYOUTS), ("gemm", GEMMS)):
            check_choice(name, getattr(self, name), choices)
        _check_bool("dummy", self.dummy)
        check_optional_int("max_model_len", self.max_model_len)
        check_int("seed", self.seed, 0)

    @property
    def quantize(self) -> str | None:
        """The quantization as `labkit.model.quantize` names it (int4 -> int4-g32)."""
        return QUANTIZATION_ALIASES.get(self.quantization, self.quantization)


@dataclass
class SpeculativeConfig:
    """Speculative decoding, with vLLM's --speculative-config keys (method, num_speculative_tokens,
    prompt_lookup_max/min, model) and the lab's own: a quantized self-draft and the adaptive gamma."""

    num_speculative_tokens: int = 4  # gamma: drafts per row and step (the adaptive policy's first guess)
    method: str = "ngram"  # see SPECULATIVE_METHODS
    prompt_lookup_max: int = 4  # ngram: the longest n-gram looked up
    prompt_lookup_min: int = 1  # ngram: the shortest
    model: str | None = None  # draft_model: the draft (a name or path; with a dummy target, a preset)
    quantization: str = "int8"  # self_draft: the copy's weights (labkit.engine.spec_decode.proposers.self_draft)
    gamma_policy: str = "fixed"  # "fixed", or "adaptive": per request, from its acceptance rate and the costs
    max_draft_tokens: int = 16  # the adaptive policy's ceiling
    acceptance_decay: float = 0.8  # weight of the past in the running acceptance rate of a request

    def __post_init__(self):
        check_choice("speculative method", self.method, SPECULATIVE_METHODS)
        check_ints(self, ("num_speculative_tokens", "max_draft_tokens", "prompt_lookup_max", "prompt_lookup_min"))
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        check_choice("gamma policy", self.gamma_policy, GAMMA_POLICIES)
        if self.gamma_policy == "adaptive" and self.max_draft_tokens < self.num_speculative_tokens:
            raise ValueError(f"max_draft_tokens ({self.max_draft_tokens}) must be >= num_speculative_tokens "
                             f"({self.num_speculative_tokens})")
        if not isinstance(self.acceptance_decay, (int, float)) or not 0 <= self.acceptance_decay < 1:
            raise ValueError(f"acceptance_decay must be in [0, 1), got {self.acceptance_decay!r}")
        if self.method == "draft_model" and not (isinstance(self.model, str) and self.model.strip()):
            raise ValueError("speculative method 'draft_model' needs a model: the draft's name or path")
        if self.method != "draft_model" and self.model is not None:
            raise ValueError(f"speculative model {self.model!r} is for method 'draft_model', not {self.method!r}")
        check_choice("self-draft quantization", self.quantization, ("bf16", *QUANT_METHODS))

    @classmethod
    def from_json(cls, text: str | dict) -> "SpeculativeConfig":
        """vLLM's --speculative-config: a JSON object of this config's fields, e.g. '{"method": "ngram",
        "num_speculative_tokens": 8, "prompt_lookup_max": 4}'; a one-line ValueError on bad JSON or keys."""
        try:
            data = json.loads(text) if isinstance(text, str) else text
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative config is not valid JSON ({exc.msg} at character {exc.pos}): "
                             f"{text!r}") from None
        if not isinstance(data, dict):
            raise ValueError(f"speculative config must be a JSON object, got {text!r}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ValueError(f"unknown speculative config key {unknown[0]!r}: choose from {', '.join(known)}")
        return cls(**data)

    def describe(self) -> str:
        """One short label: ngram(k=4), draft_model(tiny-smollm2, k=4), self_draft(int8, k=4)."""
        what = {"ngram": f"n={self.prompt_lookup_min}..{self.prompt_lookup_max}", "draft_model": self.model,
                "self_draft": self.quantization}[self.method]
        policy = ", adaptive" if self.gamma_policy == "adaptive" else ""
        return f"{self.method}({what}, k={self.num_speculative_tokens}{policy})"


@dataclass
class ParallelConfig:
    """How many ranks split the model (tensor parallelism, labkit.parallel); 1: none."""

    tensor_parallel_size: int = 1

    def __post_init__(self):
        check_int("tensor_parallel_size", self.tensor_parallel_size)


@dataclass
class EngineConfig:
    """Every technique of one engine; validated on creation, combinations included (one-line errors naming the
    values). `EngineConfig(scheduler=SchedulerConfig(max_num_seqs=64), num_kv_blocks=512)`."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # policy, batch and token limits
    enable_prefix_caching: bool = True
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_mb
    kv_cache_mb: float | None = None  # None: 512 MiB on CPU, 40 % of free memory on a GPU, at most what fits
    # compiled CPU steps lose to the eager packed-GEMM step at 2+ rows, and cost ~30 s; vLLM's enforce_eager is
    # `not compile`
    compile: bool = False  # torch.compile the decode-only step (static shapes, bucketed batch sizes)
    cuda_graphs: bool = False  # replay the decode-only step from CUDA graphs, one per bucket (engine.cuda_graphs)
    kv_cache_dtype: str = "auto"  # see KV_CACHE_DTYPES; int8 fits ~3.8x the blocks of fp32 (head_dim 64)
    model: ModelConfig = field(default_factory=ModelConfig)  # what Engine.load builds
    speculative: SpeculativeConfig | None = None  # None: one token per decode row and step
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        for name, kind in (("scheduler", SchedulerConfig), ("model", ModelConfig), ("parallel", ParallelConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ValueError(f"speculative must be a SpeculativeConfig or None, got {self.speculative!r}")
        check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        check_int("block_size", self.block_size)
        check_optional_int("num_kv_blocks", self.num_kv_blocks)
        if self.kv_cache_mb is not None:
            check_positive("kv_cache_mb", self.kv_cache_mb)
        for name in ("compile", "cuda_graphs", "enable_prefix_caching"):
            _check_bool(name, getattr(self, name))
        check_config(self)

    @property
    def enforce_eager(self) -> bool:
        """vLLM's name: no compiled or graph-replayed decode step."""
        return not (self.compile or self.cuda_graphs)

    def to_dict(self) -> dict:
        """The settings as one flat dict, as results rows record an engine: the scheduler's first, then the
        engine's own, the model's, the speculative config as its one-line label (or None) and the TP size."""
        nested = ("scheduler", "model", "speculative", "parallel")
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in nested}
        return {**asdict(self.scheduler), **own, **asdict(self.model),
                "speculative": None if self.speculative is None else self.speculative.describe(),
                "tensor_parallel_size": self.parallel.tensor_parallel_size}

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """A config from flat keyword arguments: SchedulerConfig's fields (max_num_seqs=...) go to `scheduler`,
        ModelConfig's (dtype=..., quantization=...) to `model`, the rest are EngineConfig's own. What
        `Engine(model, max_num_seqs=4, num_kv_blocks=64)` builds."""
        for name, kind in (("scheduler", SchedulerConfig), ("model", ModelConfig)):
            names = {f.name for f in fields(kind)} - {"model"}
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            if given and name in kwargs:
                raise ValueError(f"pass a {kind.__name__} or its fields ({', '.join(given)}), not both")
            if given:
                kwargs[name] = kind(**given)
        return cls(**kwargs)


__all__ = ["EngineConfig", "SchedulerConfig", "ModelConfig", "SpeculativeConfig", "ParallelConfig", "KV_CACHE_DTYPES",
           "MODEL_DTYPES", "DTYPE_ALIASES", "QUANTIZATIONS", "SPECULATIVE_METHODS", "GAMMA_POLICIES"]
