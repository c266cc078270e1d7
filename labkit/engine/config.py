"""The engine's configuration: the scheduler's (a SchedulerConfig) and the KV cache's and decode step's own."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from labkit.checks import check_choice, check_int, check_optional_int, check_positive
from labkit.engine.scheduler import SchedulerConfig

KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's activation dtype; int8: codes + a scale per slot and head


@dataclass
class EngineConfig:
    """The engine's scheduler, cache and decode-step settings; validated on creation (one-line errors naming the
    value). `EngineConfig(scheduler=SchedulerConfig(max_num_seqs=64), num_kv_blocks=512)`."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # policy, batch and token limits
    enable_prefix_caching: bool = True
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_mb
    kv_cache_mb: float | None = None  # None: 512 MiB on CPU, 40 % of free memory on a GPU, at most what fits
    compile: bool = False  # compiled CPU steps lose to the eager packed-GEMM step at 2+ rows, and cost ~30 s
    cuda_graphs: bool = False  # replay the decode-only step from CUDA graphs, one per bucket (engine.cuda_graphs)
    kv_cache_dtype: str = "auto"  # see KV_CACHE_DTYPES; int8 fits ~3.8x the blocks of fp32 (head_dim 64)

    def __post_init__(self):
        if not isinstance(self.scheduler, SchedulerConfig):
            raise ValueError(f"scheduler must be a SchedulerConfig, got {self.scheduler!r}")
        check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        check_int("block_size", self.block_size)
        check_optional_int("num_kv_blocks", self.num_kv_blocks)
        if self.kv_cache_mb is not None:
            check_positive("kv_cache_mb", self.kv_cache_mb)
        for name in ("compile", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        """The settings as one flat dict (the scheduler's first), as results rows record an engine."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "scheduler"}
        return {**asdict(self.scheduler), **own}

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """A config from flat keyword arguments: SchedulerConfig's fields (max_num_seqs=...) go to `scheduler`,
        the rest are EngineConfig's own. What `Engine(model, max_num_seqs=4, num_kv_blocks=64)` builds."""
        names = {f.name for f in fields(SchedulerConfig)}
        scheduler = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if scheduler and "scheduler" in kwargs:
            raise ValueError(f"pass a SchedulerConfig or its fields ({', '.join(scheduler)}), not both")
        if scheduler:
            kwargs["scheduler"] = SchedulerConfig(**scheduler)
        return cls(**kwargs)


__all__ = ["EngineConfig", "SchedulerConfig", "KV_CACHE_DTYPES"]
