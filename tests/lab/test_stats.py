import os
import statistics

import pytest
import torch

import math

from labkit.lab.stats import (MedianInterval, format_coverage, measure, median_ci, order_statistic_coverage,
                              percentile, summarize, weight_bytes_per_token)
from labkit.bench.decode import format_table, run_decode_bench
from labkit.model.loader import load_model


def test_percentile_matches_numpy_linear():
    import numpy as np

    data = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(data, q) == pytest.approx(np.percentile(data, q))


def test_summary_and_median_interval():
    data = list(range(1, 102))
    t = summarize(data, num_warmup=2)
    assert t.median_ms == 51 and t.min_ms == 1 and t.max_ms == 101 and t.num_repeats == 101
    lo, hi = median_ci(data)
    assert lo < 51 < hi and hi - lo < 25
    assert (t.ci_low_ms, t.ci_high_ms) == (lo, hi) and (t.ci95_low_ms, t.ci95_high_ms) == (lo, hi)


def _binomial_coverage(n, l, u):
    """P(x_(l) <= median <= x_(u)) = sum of Binomial(n, 1/2) pmf over l..u-1, written out independently."""
    return sum(math.comb(n, k) * 0.5**n for k in range(l, u))


@pytest.mark.parametrize("n, lower, method", [(3, 1, "min-max"), (5, 1, "min-max"), (6, 1, "min-max"),
                                              (10, 2, "order statistics"), (30, 10, "order statistics")])
def test_median_interval_label_matches_its_method_and_exact_coverage(n, lower, method):
    data = [float(v) for v in range(n, 0, -1)]  # unsorted: the order statistics are x_(k) = k
    ci = median_ci(data)
    assert isinstance(ci, MedianInterval) and ci.method == method and ci.num_samples == n
    assert (ci.low, ci.high) == (lower, n + 1 - lower)
    assert ci.coverage == pytest.approx(_binomial_coverage(n, lower, n + 1 - lower), rel=1e-12)
    if method == "order statistics":  # the narrowest that reaches 95 %: one step in falls short
        assert ci.coverage >= 0.95 > _binomial_coverage(n, lower + 1, n - lower)
    assert ci.label.startswith("min-max" if method == "min-max" else "order-statistic") and "coverage" in ci.label


def test_small_samples_are_not_called_95_percent():
    assert median_ci([3.0, 1.0, 2.0]).coverage == 0.75  # three runs: min-max, 1 - 2^(1 - 3)
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0]).coverage == 1 - 2**-4 < 0.95
    assert median_ci([7.0]).coverage == 0.0 and tuple(median_ci([7.0])) == (7.0, 7.0)
    t = summarize([3.0, 1.0, 2.0])
    assert (t.ci_low_ms, t.ci_high_ms, t.ci_coverage, t.ci_method) == (1.0, 3.0, 0.75, "min-max")
    assert math.isnan(t.ci95_low_ms) and math.isnan(t.ci95_high_ms)  # not a 95 % interval: not given as one
    assert t.ci_label == "min-max of 3 runs (75 % coverage of the median)"
    assert summarize(list(range(10))).ci_label == "order-statistic interval of 10 runs (97.8 % coverage of the median)"
    assert format_coverage(0.96875) == "96.8 %"  # rounded down: never up to a level it misses
    assert order_statistic_coverage(10, 2) == pytest.approx(1 - 22 / 1024)
    with pytest.raises(ValueError, match="no samples"):
        median_ci([])
    with pytest.raises(ValueError, match="confidence must be in \\(0, 1\\), got 95"):
        median_ci([1.0, 2.0], confidence=95)


def test_measure_excludes_warmup_and_counts_repeats():
    calls = []
    t = measure(lambda: calls.append(1), repeats=5, warmup=3)
    assert len(calls) == 8 and t.num_repeats == 5 and t.num_warmup == 3
    assert len(t.samples_ms) == 5 and t.peak_memory_mb > 0
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=0)


def test_weight_bytes_count_a_tied_head_once():
    lm = load_model("tiny-llama", dummy=True)
    model = lm.model
    params = {id(p): p for p in model.parameters()}
    expected = sum(p.numel() * p.element_size() for p in params.values())
    assert weight_bytes_per_token(model) == expected


def test_decode_bench_rows_on_a_tiny_model():
    rows = run_decode_bench(variants=("labkit-fp32", "labkit-int8"), batch_sizes=(1, 2), max_tokens=6,
                            repeats=2, model="tiny-smollm2", dummy=True, device="cpu")
    variants = {(r["params"]["variant"], r["params"]["batch_size"]) for r in rows}
    assert variants == {(v, b) for v in ("hf-fp32", "labkit-fp32", "labkit-int8") for b in (1, 2)}
    for r in rows:
        m = r["metrics"]
        assert m["tokens_per_s"] > 0 and 0 < m["roofline_fraction"] and m["ratio_to_hf"] > 0
        assert m["tokens_per_s"] == statistics.median(m["tokens_per_s_runs"])
        assert "cpu" in r["env"] and r["env"]["torch"] == torch.__version__
    assert all(r["metrics"]["ratio_to_hf"] == 1.0 for r in rows if r["params"]["variant"] == "hf-fp32")
    assert "hf-fp32" in format_table(rows)


def test_decode_bench_rejects_unknown_variant():
    with pytest.raises(ValueError, match="'turbo'"):
        run_decode_bench(variants=("turbo",))


def test_decode_bench_skips_llama_cpp_by_default_where_it_cannot_run(monkeypatch, capsys):
    from labkit.bench import decode as bench_decode

    monkeypatch.setattr(bench_decode, "DEFAULT_VARIANTS", ("hf-fp32", "llama.cpp"))
    notes = []
    rows = run_decode_bench(batch_sizes=(1,), max_tokens=3, repeats=1, model="tiny-smollm2", dummy=True,
                            device="cpu", log=notes.append, progress=True)
    assert {r["params"]["variant"] for r in rows} == {"hf-fp32"}
    assert len(notes) == 2 and notes[0].startswith("skipping llama.cpp")
    assert rows[0]["env"]["device"] == "cpu"
    err = capsys.readouterr().err
    assert "bench decode" in err and "step" in err  # the progress bar


@pytest.mark.parametrize("installed, kwargs, needle", [
    (False, {}, "pip install"),
    (True, {"model": "tiny-smollm2", "dummy": True}, "embedded model"),
])
def test_decode_bench_asked_for_llama_cpp_fails_before_loading(monkeypatch, installed, kwargs, needle):
    from labkit.bench import decode as bench_decode

    def no_loading(*args, **kw):
        raise AssertionError("must fail before the model loads")

    monkeypatch.setattr(bench_decode, "llama_cpp_available", lambda: installed)
    monkeypatch.setattr(bench_decode, "load_model", no_loading)
    with pytest.raises(ValueError, match=needle):
        run_decode_bench(variants=("llama.cpp",), device="cpu", **kwargs)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton variant needs the interpreter")
def test_decode_bench_on_a_preset_without_tokenizer_at_bf16():
    """Dummy presets without a tokenizer get a seeded synthetic prompt; --dtype sets the HF baseline's dtype; the
    labkit variants of one weight format share one compact model."""
    from labkit.bench import decode as bench_decode

    built = []
    real = bench_decode.from_hf
    bench_decode.from_hf = lambda *a, **kw: built.append(kw) or real(*a, **kw)
    try:
        notes = []
        rows = run_decode_bench(variants=("labkit-bf16", "labkit-bf16-triton"), batch_sizes=(1,), max_tokens=3,
                                repeats=1, model="tiny-llama", dummy=True, device="cpu", dtype="bf16",
                                log=notes.append)
    finally:
        bench_decode.from_hf = real
    assert {r["params"]["variant"] for r in rows} == {"hf-bf16", "labkit-bf16", "labkit-bf16-triton"}
    assert len(built) == 1  # one compact model for both labkit variants, whose backends differ
    assert rows[0]["params"]["prompt_tokens"] == bench_decode.DEFAULT_PROMPT_TOKENS
    assert any("synthetic prompt" in n for n in notes)
    triton = next(r for r in rows if r["params"]["variant"] == "labkit-bf16-triton")
    assert triton["params"]["kernels"] == "triton" and triton["metrics"]["tokens_per_s"] > 0
    assert triton["metrics"]["compile_s"] is None and triton["metrics"]["capture_s"] is None
    assert next(r for r in rows if r["params"]["variant"] == "hf-bf16")["metrics"]["ratio_to_hf"] == 1.0


def test_decode_bench_refuses_gpu_only_variants_on_a_cpu():
    with pytest.raises(ValueError, match="labkit-bf16-graphs replays CUDA graphs: it needs --device cuda"):
        run_decode_bench(variants=("labkit-bf16-graphs",), device="cpu", dtype="bf16")


def test_default_variants_follow_dtype_and_device():
    from labkit.bench.decode import DEFAULT_VARIANTS, VARIANTS, default_variants

    assert default_variants("fp32", "cpu") == DEFAULT_VARIANTS
    assert default_variants("bf16", "cpu") == ("hf-bf16", "labkit-bf16", "labkit-bf16-compile")
    assert all(name in VARIANTS for dt in ("fp32", "bf16", "fp16") for name in default_variants(dt, "cpu"))


@pytest.mark.gpu
def test_decode_bench_on_gpu_with_graphs_and_triton():
    rows = run_decode_bench(variants=("labkit-bf16-graphs", "labkit-bf16-triton-graphs"), batch_sizes=(1, 2),
                            max_tokens=16, repeats=1, model="tiny-llama", dummy=True, device="cuda", dtype="bf16")
    graphs = [r for r in rows if r["params"]["cuda_graphs"]]
    assert len(graphs) == 4 and all(r["metrics"]["capture_s"] > 0 for r in graphs)
    assert rows[0]["env"]["gpu"] and rows[0]["env"]["cuda"]
