"""Rewrites over a built model: swapping backends shares the weights; the packed GEMM keeps the outputs."""

import copy

import pytest
import torch

from labkit.model.llama import Linear, from_hf
from labkit.model.rewrites import (PACKED_MAX_ROWS, apply_rewrites, packed_gemm_available, use_kn_layout,
                                   use_packed_gemm, with_backends)
from labkit.model.loader import load_model


def test_with_backends_shares_weights_and_changes_only_backends():
    lm = load_model("tiny-llama", dummy=True, device="cpu")
    model = from_hf(lm.model)
    other = with_backends(model, attention="math")
    assert other is not model and other.attention == "math" and model.attention == "sdpa"
    assert all(a is b for a, b in zip(model.parameters(), other.parameters()))
    other.rewrites.append("x")
    assert "x" not in model.rewrites
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        with_backends(model, kernels="cuda")


@pytest.mark.skipif(not packed_gemm_available(), reason="needs torch with oneDNN on an x86 CPU")
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_packed_gemm_matches_the_plain_product_and_is_used_only_for_few_rows(layout):
    lm = load_model("tiny-llama", dummy=True, device="cpu")
    model = from_hf(lm.model)
    if layout == "kn":
        use_kn_layout(model)
    linear = model.layers[0].mlp.w_gate_up
    assert isinstance(linear, Linear)
    gen = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(n, linear.in_features, generator=gen) for n in (1, 2, 5, PACKED_MAX_ROWS + 1)}
    plain = {n: linear(x) for n, x in xs.items()}
    use_packed_gemm(model)
    assert "gemm:packed" in model.rewrites and linear.packed is not None
    for n, x in xs.items():
        out = linear(x)
        if n == 1 or n > PACKED_MAX_ROWS:  # the unpacked path, bit for bit
            assert torch.equal(out, plain[n])
        else:
            torch.testing.assert_close(out, plain[n], rtol=1e-5, atol=1e-5)
    clone = copy.deepcopy(linear)  # oneDNN's tensor has no storage: the copy drops it and runs unpacked
    assert clone.packed is None and linear.packed is not None
    assert torch.equal(clone(xs[5]), plain[5])


@pytest.mark.skipif(not packed_gemm_available(), reason="needs torch with oneDNN on an x86 CPU")
def test_packed_bf16_gemm_runs_every_row_count_and_matches_the_plain_product(monkeypatch):
    lm = load_model("tiny-llama", dummy=True, device="cpu")
    model = from_hf(lm.model, dtype=torch.bfloat16)
    assert model.act_dtype == torch.bfloat16  # bf16 weights mean bf16 activations: no cast around a linear
    linear = model.layers[0].attn.wqkv
    gen = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(n, linear.in_features, generator=gen).bfloat16() for n in (1, 3, 64, PACKED_MAX_ROWS + 1)}
    plain = {n: linear(x) for n, x in xs.items()}
    assert apply_rewrites(model).rewrites == ["gemm:packed"]  # bf16 keeps [out, in] and packs by default
    assert linear.packed is not None and linear.packed_min_rows == 1
    calls = []
    packed_op = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[0].shape[0]) or packed_op(*a))
    for n, x in xs.items():
        out = linear(x)
        assert out.dtype == torch.bfloat16
        # both accumulate in fp32 and round once to bf16; the order of the sums may differ
        torch.testing.assert_close(out, plain[n], rtol=1.6e-2, atol=1e-2)
    assert calls == list(xs), "every row count, long prefill chunks included, reads the packed weight"


@pytest.mark.skipif(not packed_gemm_available(), reason="needs torch with oneDNN on an x86 CPU")
def test_default_rewrites_pack_fp32_cpu_weights_once_and_plain_keeps_mkl():
    lm = load_model("tiny-llama", dummy=True, device="cpu")
    packed = use_packed_gemm(apply_rewrites(from_hf(lm.model)))  # packing twice is a no-op
    assert packed.rewrites == ["layout:kn", "gemm:packed"]
    assert all(m.packed is not None for m in packed.modules() if isinstance(m, Linear))
    clone = copy.deepcopy(packed)  # a copy drops the packed weights, and their label with them
    assert clone.rewrites == ["layout:kn"] and all(m.packed is None for m in clone.modules() if isinstance(m, Linear))
    assert packed.rewrites == ["layout:kn", "gemm:packed"]
    plain = apply_rewrites(from_hf(lm.model), gemm="plain")
    assert plain.rewrites == ["layout:kn"] and all(m.packed is None for m in plain.modules() if isinstance(m, Linear))
    with pytest.raises(ValueError, match="unknown gemm 'fast'"):
        apply_rewrites(from_hf(lm.model), gemm="fast")


@pytest.mark.skipif(not packed_gemm_available(), reason="needs torch with oneDNN on an x86 CPU")
def test_packed_gemm_keeps_greedy_tokens_in_batches_and_verification(embedded):
    from labkit.engine.spec_decode.proposers import NgramProposer
    from labkit.engine.engine import Engine
    from labkit.engine.spec_decode.speculator import SpeculativeConfig, Speculator

    plain = Engine(apply_rewrites(from_hf(embedded.model), gemm="plain"), embedded.tokenizer)
    texts = ["Once upon a time, in a small village,", "Repeat this: the quick brown fox jumps over the lazy dog."]
    prompts = [plain.encode(t, chat=True) for t in texts]
    params = plain.sampling_params(max_new_tokens=16)
    reference = [g.tokens for g in plain.generate(prompts, params)]  # two decode rows: MKL's own GEMM
    packed = apply_rewrites(from_hf(embedded.model))  # the default rewrites pack the weights on this CPU
    assert "gemm:packed" in packed.rewrites
    assert [g.tokens for g in Engine(packed, embedded.tokenizer).generate(prompts, params)] == reference
    spec = Engine(packed, embedded.tokenizer, speculator=Speculator(NgramProposer(), SpeculativeConfig(4)))
    assert [spec.generate([p], params)[0].tokens for p in prompts] == reference
