"""`labkit bench spec`: every draft on every workload beside the plain engine, rows with the speedup."""

import json

import pytest

from labkit.speculative import bench as bench_spec

from labkit import cli
from labkit.cli.bench_spec import format_table
from labkit.speculative.training import load_or_train
from labkit.model.rewrites import apply_rewrites
from labkit.model.llama import from_hf


def test_every_draft_on_every_workload_is_lossless_and_has_its_speedup(tiny):
    target = apply_rewrites(from_hf(tiny.model))
    trained = load_or_train(("draft", "medusa", "eagle"), target, tiny.tokenizer, size="smoke", save=False)
    names = bench_spec.DEFAULT_DRAFTS
    proposers = bench_spec.make_proposers(names, target, tiny.tokenizer, trained=trained)
    assert proposers["self-int4-g32"].describe()["compile"]  # the self-drafts' fast path
    rows = bench_spec.run_spec_bench(names, max_tokens=12, repeats=1, loaded=tiny, target=target,
                                     proposers=proposers)
    assert len(rows) == len(bench_spec.WORKLOADS) * (1 + len(names))
    for row in rows:
        m, p = row["metrics"], row["params"]
        assert m["token_identical"] and m["speedup"] > 0 and m["tokens_per_s"] > 0
        assert p["grounded"] == (p["workload"] in bench_spec.GROUNDED)
        if p["draft"] != "plain":
            assert len(m["acceptance_by_position"]) == 4 and m["verify_ms_per_step"] > 0
    assert "speedup" in format_table(rows)


def test_cli_json_holds_only_rows(capsys):
    argv = ["bench", "spec", "--dummy", "--model", "tiny-smollm2", "--drafts", "ngram", "--workloads", "copy",
            "--max-tokens", "8", "--repeats", "1", "--clock", "cpu", "--json", "--no-save", "--no-progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["params"]["draft"] for r in rows] == ["plain", "ngram"]
    assert all("run_id" in r and "env" in r for r in rows)
    assert "speedup" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["--drafts", "ngram,oracle"], "unknown draft 'oracle'"),
    (["--workloads", "poetry"], "unknown workload 'poetry'"),
    (["--train-size", "huge"], "unknown training size 'huge'"),
])
def test_cli_errors_name_the_bad_value(capsys, argv, message):
    assert cli.main(["bench", "spec", *argv]) == 2
    assert capsys.readouterr().err.startswith(f"labkit bench spec: {message}")


def test_spec_bench_repeats_its_prompts_without_the_prefix_cache(tiny, monkeypatch):
    from labkit.engine.engine import Engine

    engines = []

    class SpyEngine(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(bench_spec, "Engine", SpyEngine)
    rows = bench_spec.run_spec_bench(["ngram"], ["copy"], max_tokens=4, repeats=2, loaded=tiny)
    assert engines and all(e.describe()["prefix_caching"] is False for e in engines)
    assert all(e.blocks.num_hit_tokens == 0 for e in engines)  # every repeat computed its whole prompt
    assert [r["params"]["prefix_caching"] for r in rows] == [False, False]


def test_learned_drafts_never_train_on_the_benchmark_prompts():
    from labkit.speculative.distillation import TEMPLATES, TOPICS

    corpus = [template.format(topic) for template, _ in TEMPLATES for topic in TOPICS]
    for prompts in bench_spec.WORKLOADS.values():
        for prompt in prompts:
            sentences = [s.strip() for s in prompt.text.replace("\n", ". ").split(".") if len(s.strip()) > 20]
            assert not any(s in text for text in corpus for s in sentences), prompt.text[:40]
