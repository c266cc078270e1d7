import time

import pytest
import torch

from labkit.model.loader import EMBEDDED_MODEL, ModelLoadError, dummy_config, load_model


def test_embedded_model_is_smollm2(embedded):
    cfg = embedded.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert embedded.source in ("embedded-cache", "embedded-gguf")
    assert embedded.name == EMBEDDED_MODEL
    assert embedded.model.dtype == torch.float32
    tok = embedded.tokenizer
    assert tok.decode(tok("Hello, world!")["input_ids"]) == "Hello, world!"


def test_cached_load_is_from_cache_and_matches(embedded):
    again = load_model(device="cpu", dtype="fp32")
    assert again.source == "embedded-cache"
    a, b = embedded.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_embedded_model_in_bf16():
    lm = load_model(device="cpu", dtype="bf16", with_tokenizer=False)
    assert lm.model.dtype == torch.bfloat16


def test_dummy_models_are_seeded():
    a = load_model("tiny-llama", dummy=True, seed=3)
    b = load_model("tiny-llama", dummy=True, seed=3)
    assert a.source == "dummy" and a.tokenizer is None
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


def test_real_size_dummy_config_has_llama_1b_shape():
    cfg = dummy_config("llama-1b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (2048, 16, 8)


def test_unknown_dummy_preset():
    with pytest.raises(ModelLoadError, match="'no-such-preset'"):
        load_model("no-such-preset", dummy=True)


def test_unknown_hub_model_fails_fast_naming_the_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=EMBEDDED_MODEL) as info:
        load_model("facebook/opt-125m-not-there")
    assert "facebook/opt-125m-not-there" in str(info.value)
    assert time.perf_counter() - start < 20


def test_bad_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(str(tmp_path / "missing"))


def test_local_directory_round_trip(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), device="cpu")
    assert again.source == "local"
    assert torch.equal(again.model.lm_head.weight, tiny.model.lm_head.weight)
