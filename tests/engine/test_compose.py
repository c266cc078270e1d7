"""Every technique in one EngineConfig: each accepted pair decodes greedy-identically to plain decoding of the same
weights (quantized: the same quantized model alone; a lossy KV dtype: the same KV dtype alone), and a refused
combination gets one line naming both parts.

A pairwise covering set over the techniques (rather than their full product) on the tiny dummy model, with
continuous batching of requests of different lengths; a test checks the set really covers every allowed pair.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from labkit.engine import Engine, EngineConfig
from labkit.engine.config import ModelConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig
from labkit.model.loader import load_model
from labkit.model.sampling import SamplingParams

# levels of each technique; the first is "off". compile last, so the greedy cover turns it on only where needed
FACTORS = {
    "quantization": (None, "int8", "int4"),
    "kv_cache_dtype": ("auto", "int8"),
    "speculative": (None, "ngram", "draft_model", "self_draft", "adaptive"),
    "prefix_caching": (False, True),
    "chunked_prefill": (False, True),  # True: a step budget of 16 tokens, so prompts prefill in chunks
    "dtype": ("fp32", "bf16"),
    "policy": ("continuous", "static"),
    "compile": (False, True),
}
REFUSED = {(("quantization", q), ("speculative", "self_draft")) for q in ("int8", "int4")}  # see test below


def _allowed(row: dict) -> bool:
    return not any(all(row.get(f) == v for f, v in pair) for pair in REFUSED)


def _pairs(row: dict) -> set:
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(FACTORS, 2)}


def covering_set() -> list[dict]:
    """Rows (one level per technique) covering every allowed pair of levels at least once: greedy, seeded with
    the first uncovered pair, each other factor at the level covering the most uncovered pairs (ties: the first)."""
    uncovered = {p for a, b in itertools.combinations(FACTORS, 2) for p in
                 (((a, x), (b, y)) for x in FACTORS[a] for y in FACTORS[b]) if _allowed(dict(p))}
    rows = []
    while uncovered:
        (a, x), (b, y) = min(uncovered, key=repr)
        row = {a: x, b: y}
        for f, levels in FACTORS.items():
            if f in row:
                continue
            def gain(level):
                trial = {**row, f: level}
                return sum(((g, trial[g]), (f, level)) in uncovered or ((f, level), (g, trial[g])) in uncovered
                           for g in row) if _allowed(trial) else -1
            row[f] = max(levels, key=gain)  # max keeps the first of equals
        row = {f: row[f] for f in FACTORS}
        rows.append(row)
        uncovered -= _pairs(row)
    return rows


def _spec(level: str | None) -> SpeculativeConfig | None:
    return {None: None, "ngram": SpeculativeConfig(3, prompt_lookup_max=3),
            "draft_model": SpeculativeConfig(3, method="draft_model", model="tiny-smollm2"),
            "self_draft": SpeculativeConfig(3, method="self_draft"),
            "adaptive": SpeculativeConfig(2, gamma_policy="adaptive", max_draft_tokens=6)}[level]


def config_of(row: dict) -> EngineConfig:
    scheduler = SchedulerConfig(max_num_seqs=3, policy=row.get("policy", "continuous"),
                                max_num_batched_tokens=16 if row.get("chunked_prefill") else 256)
    model = ModelConfig("tiny-smollm2", dummy=True, dtype=row.get("dtype", "fp32"), quantization=row.get("quantization"))
    return EngineConfig(scheduler=scheduler, model=model, kv_cache_dtype=row.get("kv_cache_dtype", "auto"),
                        enable_prefix_caching=row.get("prefix_caching", False), compile=row.get("compile", False),
                        speculative=_spec(row.get("speculative")))


def _prompts() -> tuple[list[list[int]], list[SamplingParams]]:
    """Requests of different lengths (more than a step's rows, so some wait and join later), sharing a
    32-token prefix (two blocks: later ones hit the prefix cache), some repetitive (n-gram drafts get kept)."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(100, 5000, (32,), generator=g).tolist()
    tails = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (3, 9, 21)]
    prompts = [shared + tails[0], shared + tails[1] * 4, (tails[2] * 3)[:50], shared[:5], shared + tails[1]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, detokenize=False) for n in (12, 7, 16, 10, 5)]
    return prompts, params


@pytest.fixture(scope="module")
def weights():
    return {dtype: load_model("tiny-smollm2", dummy=True, dtype=dtype) for dtype in ("fp32", "bf16")}


def _generate(weights, config: EngineConfig) -> tuple[Engine, list[list[int]]]:
    loaded = weights[config.model.dtype]
    engine = Engine.from_hf(loaded.model, loaded.tokenizer, dtype=config.model.dtype, config=config)
    prompts, params = _prompts()
    return engine, [g.tokens for g in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def references(weights):
    """Plain decoding per weight format and KV dtype, computed once."""
    cache = {}

    def reference(row: dict) -> list[list[int]]:
        key = (row["quantization"], row["kv_cache_dtype"], row["dtype"])
        if key not in cache:
            plain = dict(zip(("quantization", "kv_cache_dtype", "dtype"), key))
            cache[key] = _generate(weights, config_of(plain))[1]
        return cache[key]
    return reference


def test_the_covering_set_covers_every_allowed_pair_and_only_allowed_rows():
    rows = covering_set()
    covered = set().union(*map(_pairs, rows))
    for a, b in itertools.combinations(FACTORS, 2):
        for x, y in itertools.product(FACTORS[a], FACTORS[b]):
            pair = ((a, x), (b, y))
            assert (pair in covered) == _allowed(dict(pair)), pair
    assert all(_allowed(row) for row in rows)
    full = 1
    for levels in FACTORS.values():
        full *= len(levels)
    assert len(rows) <= 20 < full  # far fewer than the product
    assert sum(row["compile"] for row in rows) <= 6  # compile (slow on a CPU) in a few rows only


@pytest.mark.parametrize("row", covering_set(), ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items() if v not in
                                                                      (None, False, "auto", "fp32", "continuous")))
def test_every_accepted_combination_is_greedy_identical_to_plain_decoding(weights, references, row):
    # compiled rows run in one process on purpose: every runner compiles the one static_step code object, past
    # dynamo's default recompile limit of 8 graphs (model_runner raises it)
    engine, tokens = _generate(weights, config_of(row))
    assert tokens == references(row)
    prompts, params = _prompts()
    if row["prefix_caching"]:  # again, from the prefix cache this time
        assert [g.tokens for g in engine.generate(prompts, params)] == tokens
        assert engine.blocks.prefix_hit_rate > 0
    if row["speculative"]:
        assert engine.speculator.stats.num_draft_tokens > 0  # it did speculate
    assert engine.blocks.num_used_blocks == 0  # nothing leaked
    techniques = engine.techniques()
    assert techniques["quantization"] == {None: "none", "int8": "int8", "int4": "int4-g32"}[row["quantization"]]
    assert techniques["decode_step"] == ("compiled" if row["compile"] else "eager")


def test_speculation_methods_build_their_proposers(weights):
    for level, draft in (("ngram", "ngram"), ("draft_model", "tiny-smollm2"), ("self_draft", "self-int8")):
        engine, _ = _generate(weights, config_of({"speculative": level}))
        assert engine.speculator.proposer.name == draft


@pytest.mark.parametrize("make, message", [
    (lambda: config_of({"quantization": "int8", "speculative": "self_draft"}),
     "speculative method 'self_draft' quantizes a copy of the unquantized target; quantization='int8'"),
    (lambda: EngineConfig(model=ModelConfig("tiny-smollm2", dummy=True, quantization="gguf")),
     "quantization='gguf' reads the embedded model's GGUF blocks; a dummy model has none"),
    (lambda: EngineConfig(model=ModelConfig("some/other-model", quantization="gguf")),
     "quantization='gguf' reads the embedded model's GGUF blocks; model 'some/other-model' is not it"),
    (lambda: EngineConfig(cuda_graphs=True, model=ModelConfig(device="cpu")),
     "cuda_graphs=True needs a CUDA device; device='cpu'"),
    (lambda: EngineConfig(compile=True, model=ModelConfig(attention="triton", kernels="triton")),
     "compile=True traces the torch backends only"),
    (lambda: EngineConfig(kv_cache_dtype="int8", model=ModelConfig(attention="triton")),
     "kv_cache_dtype='int8' is not supported with attention='triton'"),
    (lambda: EngineConfig(parallel=ParallelConfig(2), speculative=SpeculativeConfig(method="draft_model", model="x")),
     "tensor_parallel_size=2 splits the target only; speculative method 'draft_model'"),
    (lambda: EngineConfig(parallel=ParallelConfig(2), model=ModelConfig(quantization="int4")),
     "tensor_parallel_size=2 splits dense and int8 linears; quantization='int4'"),
    (lambda: EngineConfig(parallel=ParallelConfig(2), scheduler=SchedulerConfig(policy="dynamic")),
     "tensor_parallel_size=2 needs every rank to batch alike"),
    (lambda: SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 8, "lookahead": 2}'),
     "unknown speculative config key 'lookahead'"),
    (lambda: SpeculativeConfig.from_json('{"method": "ngram",'), "speculative config is not valid JSON"),
    (lambda: SpeculativeConfig(method="draft_model"), "speculative method 'draft_model' needs a model"),
    (lambda: SpeculativeConfig(prompt_lookup_min=5, prompt_lookup_max=4), "prompt_lookup_min \\(5\\) must be <="),
])
def test_refused_combinations_say_both_parts_in_one_line(make, message):
    with pytest.raises(ValueError, match=message) as caught:
        make()
    assert "\n" not in str(caught.value)


def test_refusals_that_need_the_model_come_at_engine_start(weights):
    tiny = weights["fp32"]
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device; it is on cpu"):
        Engine.from_hf(tiny.model, cuda_graphs=True)
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's context of 2048 tokens"):
        Engine.from_hf(tiny.model, max_model_len=4096)
    with pytest.raises(ValueError, match="enable_chunked_prefill=False needs max_num_batched_tokens >= max_model_len"):
        Engine.from_hf(tiny.model, enable_chunked_prefill=False, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="pass a speculator or config.speculative, not both"):
        engine = Engine.from_hf(tiny.model, config=config_of({"speculative": "ngram"}))
        Engine(engine.model, config=engine.config, speculator=engine.speculator)


def test_max_model_len_limits_requests(weights):
    engine = Engine.from_hf(weights["fp32"].model, max_model_len=64, enable_chunked_prefill=False,
                            max_num_batched_tokens=64)
    assert engine.max_seq_len == 64
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        engine.add_request(list(range(100, 160)), SamplingParams(max_new_tokens=8))


def test_engine_load_takes_the_config_or_its_fields():
    config = config_of({"quantization": "int8", "speculative": "ngram"})
    engine = Engine.load(config=config)
    assert engine.config is config and engine.quantize == "int8" and engine.speculator is not None
    flat = Engine.load("tiny-smollm2", dummy=True, quantization="int8", max_num_seqs=3)
    assert flat.config.model.quantization == "int8" and flat.config.scheduler.max_num_seqs == 3
    assert flat.config.to_dict()["quantization"] == "int8"  # results rows record the model's settings flat
