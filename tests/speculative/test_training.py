"""Training the learned drafts: the corpus and its features, the training forward, the cache, `labkit spec train`."""

import json

import pytest
import torch

from labkit import cli

from labkit.speculative import distillation
from labkit.speculative import training as dt
from labkit.engine.engine import Engine
from labkit.engine.model_runner import RowSpan
from labkit.model.llama import from_hf
from labkit.engine.spec_decode.speculator import DraftRequest
from labkit.model.sampling import SamplingParams


@pytest.fixture
def spec_cache(tmp_path, monkeypatch):
    """Drafts are cached in a folder of the test's own (the converted embedded model stays where it is)."""
    monkeypatch.setattr(dt, "spec_cache_dir", lambda: tmp_path / "spec")
    return tmp_path / "spec"


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        distillation.TrainConfig(num_steps=0)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        distillation.TrainConfig(temperature=0)
    assert distillation.TrainConfig().key() != distillation.TrainConfig(num_steps=7).key()


def test_the_training_forward_is_the_engines_forward(tiny):
    target = from_hf(tiny.model)
    tokens = torch.tensor(tiny.tokenizer("Once upon a time, in a small village, there lived")["input_ids"])
    engine = Engine(target)
    key = "x"
    engine.blocks.allocate(key, tokens.tolist(), [], len(tokens))
    with torch.inference_mode():
        hidden = engine.runner.forward([RowSpan(key, tokens.tolist(), 0, len(tokens))], [0], return_hidden=True).hidden
        dense = distillation.dense_forward(target, tokens[None])[0]
    torch.testing.assert_close(dense, hidden, atol=1e-5, rtol=1e-5)


def test_the_corpus_records_a_feature_for_every_token_but_the_last(tiny):
    target = from_hf(tiny.model)
    config = distillation.TRAIN_SIZES["smoke"]
    corpus = distillation.generate_corpus(target, tiny.tokenizer, config)
    assert corpus.features.shape == (corpus.num_tokens, target.args.dim)
    assert len(corpus.outputs) == config.num_sequences
    prompt = distillation.corpus_prompts(tiny.tokenizer, 1, config.seed)[0]
    with torch.inference_mode():  # the first answer's features are the prefill's hidden states
        ref = distillation.dense_forward(target, torch.tensor(prompt + corpus.outputs[0])[None])[0]
    n = len(prompt) + len(corpus.outputs[0]) - 1
    torch.testing.assert_close(corpus.features[:n], ref[:n], atol=1e-4, rtol=1e-4)


def test_trained_drafts_are_saved_with_their_config_and_loaded_instead_of_retrained(tiny, spec_cache):
    target = from_hf(tiny.model)
    first = dt.load_or_train(distillation.KINDS, target, tiny.tokenizer, size="smoke")
    assert not any(t.loaded for t in first.values())
    assert sorted(p.name.split("-")[0] for p in spec_cache.iterdir()) == sorted(distillation.KINDS)
    again = dt.load_or_train(distillation.KINDS, target, tiny.tokenizer, size="smoke")
    assert all(t.loaded for t in again.values())
    ids = tiny.tokenizer("the cat sat on the mat and the cat")["input_ids"]
    for kind in ("draft", "eagle"):
        assert again[kind].config == first[kind].config
        assert torch.equal(again[kind].vocab, first[kind].vocab)
        for name, tensor in dt._state(kind, first[kind].module).items():
            torch.testing.assert_close(dt._state(kind, again[kind].module)[name], tensor)
    ask = [DraftRequest("r", ids, 3, SamplingParams(), None)]
    a, b = first["draft"].proposer(target), again["draft"].proposer(target)
    assert a.propose(ask)[0].tokens == b.propose(ask)[0].tokens


def test_a_cache_file_that_does_not_load_is_retrained(tiny, spec_cache):
    target = from_hf(tiny.model)
    path = dt.cache_path("medusa", "smoke", distillation.TRAIN_SIZES["smoke"], target)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"torn")
    messages = []
    got = dt.load_or_train("medusa", target, tiny.tokenizer, size="smoke", log=messages.append)
    assert not got["medusa"].loaded and any("retraining" in m for m in messages)
    assert dt.load_draft(path, target).kind == "medusa"


def test_auto_size_picks_the_largest_cached_one(tiny, spec_cache):
    target = from_hf(tiny.model)
    assert dt.resolve_size("eagle", "auto", target) == "smoke"
    path = dt.cache_path("eagle", "default", distillation.TRAIN_SIZES["default"], target)
    path.parent.mkdir(parents=True)
    path.touch()
    assert dt.resolve_size("eagle", "auto", target) == "default"
    with pytest.raises(ValueError, match="unknown training size 'huge'"):
        dt.resolve_size("eagle", "huge", target)


def test_cli_trains_then_loads(spec_cache, capsys):
    argv = ["spec", "train", "--kind", "medusa", "--size", "smoke", "--dummy", "--model", "tiny-smollm2", "--json",
            "--no-progress"]
    assert cli.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in first] == ["medusa"] and not first[0]["loaded"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)[0]["loaded"]


def test_cli_rejects_an_unknown_kind(capsys):
    assert cli.main(["spec", "train", "--kind", "gpt5"]) == 2
    assert capsys.readouterr().err.strip() == "labkit spec: unknown draft kind 'gpt5': choose from draft, medusa, eagle"
