"""`labkit bench decode`'s measurement traps: the repeated prompt is never answered from a prefix cache, and each
row says whether the cache was on."""

import pytest

from labkit.bench import decode, decode_runners


def test_decode_engines_run_without_the_prefix_cache():
    config = decode._engine_config((1, 4), 64, decode.VARIANTS["labkit-fp32"])
    assert config.enable_prefix_caching is False  # every run sends the same prompt


def test_decode_rows_record_prefix_caching_and_no_run_hit_the_cache(monkeypatch):
    engines = []
    real = decode._labkit_engine

    def spy(*args, **kwargs):
        engines.append(real(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(decode, "_labkit_engine", spy)
    # 40 prompt tokens: two full blocks a cache would hand the second and later runs
    rows = decode.run_decode_bench(variants=("labkit-fp32",), batch_sizes=(1, 2), max_tokens=3, repeats=2,
                                   model="tiny-smollm2", dummy=True, device="cpu", prompt_tokens=40)
    caching = {(r["params"]["variant"], r["params"]["batch_size"]): r["params"]["prefix_caching"] for r in rows}
    assert caching == {("hf-fp32", 1): None, ("hf-fp32", 2): None, ("labkit-fp32", 1): False,
                       ("labkit-fp32", 2): False}
    assert engines and all(e.blocks.num_hit_tokens == 0 for e in engines)


def test_llama_cpp_runner_forgets_the_last_prompt_before_every_timed_run():
    calls = []

    class FakeLlama:
        def reset(self):
            calls.append("reset")

        def generate(self, ids, **kwargs):
            calls.append("generate")
            yield from range(100)  # generate() itself never stops: the runner stops it at max_tokens

    runner = decode_runners.LlamaCppRunner.__new__(decode_runners.LlamaCppRunner)
    runner.llm, runner.max_tokens, runner.draft = FakeLlama(), 3, None
    for _ in range(2):
        sample = runner(1, [[5, 6, 7]])
        assert sample.tokens == [[[0, 1, 2]]]
    assert calls == ["reset", "generate"] * 2


@pytest.mark.parametrize("scheme", ["fp32", "kv-int8"])
def test_quant_variants_inherit_the_decode_engines_settings(scheme):
    from labkit.bench.quant import scheme_variant

    variant = scheme_variant(scheme, compile=False)
    assert decode._engine_config((1,), 32, variant).enable_prefix_caching is False
