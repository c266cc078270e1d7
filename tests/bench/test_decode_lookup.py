"""`labkit bench decode`'s workloads, threads and prompt-lookup variants: every speculative row is checked token for
token against its plain twin, and a row that left its twin gets no speedup."""

import json

import pytest
import torch

from labkit import cli
from labkit.bench import decode, decode_rows
from labkit.bench.decode_runners import LookupSettings, Sample
from labkit.speculative.bench import WORKLOADS as SPEC_WORKLOADS, encode

TINY = dict(model="tiny-smollm2", dummy=True, device="cpu")


@pytest.fixture(scope="module")
def lookup_rows():
    return decode.run_decode_bench(variants=("labkit-fp32-ngram",), batch_sizes=(1, 2), max_tokens=10, repeats=2,
                                   workloads=("free", "summarise"), threads=1,
                                   lookup=LookupSettings(num_speculative_tokens=3, prompt_lookup_max=3), **TINY)


def test_speculative_variants_bring_their_twin_and_are_lossless(lookup_rows):
    cells = {(r["params"]["variant"], r["params"]["workload"], r["params"]["batch_size"]) for r in lookup_rows}
    assert cells == {(v, w, b) for v in ("hf-fp32", "labkit-fp32", "labkit-fp32-ngram")
                     for w in ("free", "summarise") for b in (1, 2)}
    for row in lookup_rows:
        p, m = row["params"], row["metrics"]
        if p["variant"] == "labkit-fp32-ngram":
            assert m["token_identical"] is True and m["first_difference"] is None
            assert m["speedup"] > 0 and p["plain_variant"] == "labkit-fp32"
            assert p["speculative"] == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                        "prompt_lookup_min": 1}
            assert m["num_rows"] >= 0 and "acceptance_rate" in m  # the speculator's own statistics
        else:
            assert m["token_identical"] is None and m["speedup"] is None and p["speculative"] is None
        assert p["threads"] == 1 and p["greedy"] and p["ignore_eos"] and p["prefix_caching"] in (None, False)
    table = decode.format_table(lookup_rows)
    assert [line.split()[-1] for line in table.splitlines() if line.startswith("labkit-fp32-ngram")] == ["yes"] * 4


def test_rows_record_the_workload_and_its_prompts(lookup_rows):
    from labkit.model.loader import load_model

    tokenizer = load_model("tiny-smollm2", device="cpu", dummy=True).tokenizer
    summarise = [encode(tokenizer, p) for p in SPEC_WORKLOADS["summarise"]]  # through the chat template
    assert all(tokenizer.convert_tokens_to_ids("<|im_start|>") in ids for ids in summarise)
    for row in lookup_rows:
        p = row["params"]
        if p["workload"] == "summarise":
            assert p["num_prompts"] == 2 and p["prompt"] is None
            assert p["prompt_tokens"] == round(sum(map(len, summarise)) / 2)
        else:
            assert p["num_prompts"] == 1 and p["prompt"] == decode.DEFAULT_PROMPT
            assert p["prompt_tokens"] == len(tokenizer(decode.DEFAULT_PROMPT)["input_ids"])


def test_threads_are_set_for_the_run_and_put_back():
    before = torch.get_num_threads()
    rows = decode.run_decode_bench(variants=("labkit-fp32",), batch_sizes=(1,), max_tokens=3, repeats=1, threads=2,
                                   **TINY)
    assert {r["params"]["threads"] for r in rows} == {2}
    assert torch.get_num_threads() == before


def _sample(*prompts):
    return Sample(100.0, 1.0, [[list(row) for row in rows] for rows in prompts])


def test_a_row_that_left_its_twin_gets_no_speedup_and_no_ratios():
    variants = decode.VARIANTS
    same = [[1, 2, 3, 4]], [[5, 6]]
    samples = {"labkit-fp32": [_sample(*same), _sample(*same)],
               "labkit-fp32-ngram": [_sample(*same), _sample([[1, 2, 9, 4]], [[5, 6]])]}
    assert decode_rows.check_lossless(list(samples), variants, samples) == {"labkit-fp32-ngram": 2}
    samples["labkit-fp32-ngram"][1] = _sample(*same)
    assert decode_rows.check_lossless(list(samples), variants, samples) == {"labkit-fp32-ngram": None}

    def row(name, rate, identical):
        return {"params": {"variant": name, "workload": "summarise", "batch_size": 1},
                "metrics": {"tokens_per_s": rate, "token_identical": identical}}

    rows = [row("hf-fp32", 10.0, None), row("labkit-fp32", 20.0, None), row("labkit-fp32-ngram", 40.0, True)]
    decode_rows.add_ratios(rows, "hf-fp32", variants)
    assert rows[2]["metrics"]["speedup"] == 2.0 and rows[2]["metrics"]["ratio_to_hf"] == 4.0
    assert rows[1]["metrics"]["speedup"] is None and rows[1]["metrics"]["ratio_to_llama_cpp"] is None
    rows[2]["metrics"]["token_identical"] = False
    decode_rows.add_ratios(rows, "hf-fp32", variants)
    assert rows[2]["metrics"]["speedup"] is None and rows[2]["metrics"]["ratio_to_hf"] is None


def test_first_difference_counts_a_shorter_row_as_differing_where_it_ends():
    assert decode_rows.first_difference([[[1, 2]]], [[[1, 2, 3]]]) == 2
    assert decode_rows.first_difference([[[1, 2], [1, 3]]], [[[1, 2], [1, 2]]]) == 1  # any row of a batch
    assert decode_rows.first_difference([[[1]]], [[[1]]]) is None


@pytest.mark.parametrize("kwargs, needle", [
    (dict(workloads=("poetry",)), "'poetry'"),
    (dict(workloads=()), "workload"),
    (dict(threads=0), "threads"),
    (dict(variants=("labkit-fp32-ngram", "turbo-ngram")), "'turbo-ngram'"),
])
def test_bad_settings_are_one_value_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        decode.run_decode_bench(**{**dict(batch_sizes=(1,), max_tokens=2, repeats=1, **TINY), **kwargs})


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(prompt_lookup_max=2, prompt_lookup_min=3), "prompt_lookup_min"),
    (dict(prompt_lookup_max=True), "prompt_lookup_max"),
])
def test_lookup_settings_are_validated(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LookupSettings(**kwargs)


def test_llama_cpp_lookup_refuses_a_minimum_ngram_it_cannot_honour():
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        decode.run_decode_bench(variants=("llama.cpp-lookup",), batch_sizes=(1,), max_tokens=2, repeats=1,
                                device="cpu", lookup=LookupSettings(prompt_lookup_max=4, prompt_lookup_min=2))


def test_a_grounded_workload_needs_a_tokenizer(monkeypatch):
    import labkit.bench.decode as module

    real = module.load_model

    def without_tokenizer(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.tokenizer = None
        return loaded

    monkeypatch.setattr(module, "load_model", without_tokenizer)
    with pytest.raises(ValueError, match="'summarise' needs a model with a tokenizer"):
        decode.run_decode_bench(variants=("labkit-fp32",), batch_sizes=(1,), max_tokens=2, repeats=1,
                                workloads=("summarise",), **TINY)


def test_cli_takes_the_workload_threads_and_lookup_settings(capsys):
    code = cli.main(["bench", "decode", *"--model tiny-smollm2 --dummy --device cpu --engines labkit-fp32-ngram "
                     "--workload code-edit --threads 1 --num-speculative-tokens 2 --prompt-lookup-max 2 "
                     "--max-tokens 4 --repeats 1 --batch-sizes 1 --json --no-save".split()])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = json.loads(out.out)
    ngram = next(r for r in rows if r["params"]["variant"] == "labkit-fp32-ngram")
    assert ngram["params"]["workload"] == "code-edit" and ngram["params"]["threads"] == 1
    assert ngram["params"]["speculative"]["num_speculative_tokens"] == 2
    assert ngram["metrics"]["token_identical"] is True
    assert "lossless" in out.err  # the table


@pytest.mark.parametrize("argv, needle", [
    (["--workload", "poetry"], "'poetry'"),
    (["--prompt-lookup-max", "2", "--prompt-lookup-min", "3"], "prompt_lookup_min"),
])
def test_cli_bad_lookup_values_are_one_line(run_cli, argv, needle):
    code, _, err = run_cli("bench", "decode", "--model", "tiny-smollm2", "--dummy", "--no-save", *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
