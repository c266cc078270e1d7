"""EngineConfig holds a SchedulerConfig; flat keyword arguments still build one; results rows stay flat."""

import pytest

from labkit.engine import Engine, EngineConfig, SchedulerConfig
from labkit.model.llama import from_hf


def test_engine_config_holds_a_scheduler_config():
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512), num_kv_blocks=8)
    assert config.scheduler.max_num_seqs == 64 and config.num_kv_blocks == 8
    assert EngineConfig().scheduler == SchedulerConfig()  # one set of defaults, the scheduler's own


def test_flat_keywords_split_between_the_configs():
    config = EngineConfig.from_kwargs(max_num_seqs=4, policy="static", block_size=8)
    assert config.scheduler == SchedulerConfig(max_num_seqs=4, policy="static") and config.block_size == 8
    with pytest.raises(ValueError, match="not both"):
        EngineConfig.from_kwargs(max_num_seqs=4, scheduler=SchedulerConfig())
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1, got 0"):
        EngineConfig.from_kwargs(max_num_seqs=0)


def test_to_dict_is_flat_with_the_scheduler_first():
    d = EngineConfig(scheduler=SchedulerConfig(policy="dynamic"), num_kv_blocks=3).to_dict()
    assert list(d)[:7] == ["policy", "max_num_seqs", "max_num_batched_tokens", "max_wait_s",
                           "enable_chunked_prefill", "pad_batches", "enable_prefix_caching"]
    assert d["policy"] == "dynamic" and d["num_kv_blocks"] == 3 and "scheduler" not in d


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_size=0), "block_size must be an integer >= 1, got 0"),
    (dict(num_kv_blocks=True), "num_kv_blocks must be an integer >= 1, got True"),
    (dict(kv_cache_mb=0), "kv_cache_mb must be a number > 0, got 0"),
    (dict(kv_cache_dtype="fp8"), "unknown kv_cache_dtype 'fp8': choose one of auto, int8"),
    (dict(compile="yes"), "compile must be True or False, got 'yes'"),
    (dict(scheduler={"max_num_seqs": 4}), "scheduler must be a SchedulerConfig"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_engine_keywords_build_the_nested_config(tiny):
    engine = Engine(from_hf(tiny.model), max_num_seqs=2, num_kv_blocks=8)
    assert engine.config.scheduler.max_num_seqs == 2 and engine.blocks.num_blocks == 8
    assert engine.describe()["max_num_seqs"] == 2


def test_the_top_level_names_still_import():
    from labkit import Engine as E, EngineConfig as C, SamplingParams, load_model  # noqa: F401

    assert E is Engine and C is EngineConfig
