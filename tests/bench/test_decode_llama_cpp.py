"""llama.cpp in `labkit bench decode` on the embedded model's GGUF file (needs llama-cpp-python): greedy tokens
by id, exactly max_tokens of them, and its own prompt lookup as lossless as the bench says it is."""

import pytest

pytest.importorskip("llama_cpp")

from labkit.bench.decode_rows import first_difference  # noqa: E402
from labkit.bench.decode_runners import LlamaCppRunner, LookupSettings  # noqa: E402

# a prompt that repeats itself: greedy decoding goes on with the pattern, which the lookup finds
PATTERN = b"red green blue yellow, red green blue yellow, red green blue yellow, red green blue yellow, red"


@pytest.fixture(scope="module")
def runners():
    plain = LlamaCppRunner(max_tokens=16, threads=1, n_ctx=128)
    lookup = LlamaCppRunner(max_tokens=16, threads=1, n_ctx=128,
                            lookup=LookupSettings(num_speculative_tokens=4, prompt_lookup_max=2))
    return plain, lookup


def test_llama_cpp_runners_generate_max_tokens_greedy_and_the_lookup_is_lossless_here(runners):
    plain, lookup = runners
    prompts = [plain.llm.tokenize(PATTERN, add_bos=False)]
    reference = plain(1, prompts)
    assert len(reference.tokens[0][0]) == 16 and reference.tokens_per_s > 0 and reference.ttft_ms > 0
    assert plain(1, prompts).tokens == reference.tokens  # the prompt's KV is forgotten, not reused
    assert plain.stats() == {}
    lookup.reset_stats()
    sample = lookup(1, prompts)
    assert first_difference(sample.tokens, reference.tokens) is None
    stats = lookup.stats()
    assert 0 < stats["decode_forwards"] < 15 and stats["tokens_per_forward"] > 1  # drafts were kept
    assert " green blue yellow" in plain.llm.detokenize(reference.tokens[0][0]).decode()


@pytest.mark.slow
def test_bench_decode_puts_labkit_lookup_and_llama_cpp_lookup_side_by_side_on_the_embedded_model():
    from labkit.bench.decode import run_decode_bench

    rows = run_decode_bench(variants=("labkit-gguf-ngram", "llama.cpp-lookup"), batch_sizes=(1,), max_tokens=12,
                            repeats=1, device="cpu", workloads=("summarise",), threads=1)
    by_name = {r["params"]["variant"]: r for r in rows}
    assert set(by_name) == {"hf-fp32", "labkit-gguf", "labkit-gguf-ngram", "llama.cpp", "llama.cpp-lookup"}
    for name in ("labkit-gguf-ngram", "llama.cpp-lookup"):
        m = by_name[name]["metrics"]
        assert m["token_identical"] is True and m["speedup"] > 0  # short answers: no near-tie to flip
        assert m["ratio_to_llama_cpp_lookup"] > 0 and by_name[name]["params"]["threads"] == 1
    assert by_name["llama.cpp-lookup"]["metrics"]["decode_forwards"] > 0
    assert by_name["llama.cpp"]["params"]["workload"] == "summarise"
