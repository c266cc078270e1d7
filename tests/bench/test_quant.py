import pytest

from labkit.bench import quant as bench_quant

from labkit import cli


def _row(scheme, tokens_per_s, perplexity, batch_size=1, engine="labkit", fp32_ppl=10.0):
    return {"params": {"scheme": scheme, "batch_size": batch_size, "engine": engine},
            "metrics": {"tokens_per_s": tokens_per_s, "perplexity": perplexity, "ratio_to_fp32": tokens_per_s / 20,
                        "ratio_to_llama_cpp": None, "weight_bytes": 1,
                        "perplexity_change_pct": 100 * (perplexity / fp32_ppl - 1)}}


ROWS = [_row("fp32", 20, 10.0), _row("int8", 40, 10.05), _row("int4-g32", 60, 10.1), _row("int4-g128", 55, 11.0),
        _row("llama.cpp", 80, 10.1, engine="llama.cpp"), _row("int4-g32", 200, 10.1, batch_size=8)]


def test_pareto_front_keeps_only_undominated_schemes_fastest_first():
    # int4-g128 is slower and worse than int4-g32; llama.cpp dominates int4-g32 (faster, same perplexity)
    assert bench_quant.pareto_front(ROWS) == ["llama.cpp", "int8", "fp32"]
    assert bench_quant.pareto_front(ROWS, batch_size=8) == ["int4-g32"]


def test_recommend_is_the_fastest_labkit_scheme_within_the_budget():
    choice = bench_quant.recommend(ROWS, max_perplexity_change_pct=2.0)
    assert choice["scheme"] == "int4-g32" and choice["tokens_per_s"] == 60  # llama.cpp is not a labkit scheme
    assert bench_quant.recommend(ROWS, max_perplexity_change_pct=0.6)["scheme"] == "int8"
    with pytest.raises(ValueError, match="no labkit scheme stays within"):
        bench_quant.recommend(ROWS, max_perplexity_change_pct=-1)


def test_every_scheme_maps_to_a_decode_variant():
    for scheme in bench_quant.SCHEMES:
        for compile in (False, True):
            variant = bench_quant.scheme_variant(scheme, compile)
            assert variant.name == f"quant:{scheme}"
            assert variant.compile == (compile and variant.engine == "labkit")
    assert bench_quant.scheme_variant("kv-int8", False).kv_cache_dtype == "int8"
    assert bench_quant.scheme_variant("gguf", False).quantize == "gguf"


@pytest.mark.parametrize("argv, message", [
    (["--schemes", "int3"], "unknown quantization scheme 'int3'"),
    (["--stride", "600"], "--stride 600 must be <= --context-len 512"),
    (["--ppl-tokens", "1"], "num_tokens must be an integer >= 2"),
])
def test_bad_values_are_one_line_errors_before_any_work(argv, message, capsys):
    assert cli.main(["bench", "quant", "--no-save", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
