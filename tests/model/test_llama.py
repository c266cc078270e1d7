"""The model in bf16: weights, activations and KV cache all bf16 (no cast around a linear), logits in fp32 and
close to the fp32 model's."""

import pytest
import torch

from labkit.engine.model_runner import ModelRunner
from labkit.engine.config import EngineConfig
from labkit.model.llama import Linear, from_hf
from labkit.model.rewrites import apply_rewrites


def test_bf16_model_runs_bf16_end_to_end_and_returns_fp32_logits(tiny):
    model = apply_rewrites(from_hf(tiny.model, dtype=torch.bfloat16))
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=8))
    assert model.act_dtype == torch.bfloat16 and runner.cache.k[0].dtype == torch.bfloat16
    seen = []
    for module in model.modules():
        if isinstance(module, Linear):
            module.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    logits = runner.prompt_logits(list(range(5, 17)), chunk_size=5)  # a prefill, then chunks after cached tokens
    assert logits.dtype == torch.float32 and logits.shape == (12, model.args.vocab_size)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("gemm", ["packed", "plain"])
def test_bf16_logits_stay_within_bf16_of_fp32_and_of_the_old_mixed_path(embedded, gemm):
    """bf16 end to end against fp32 and against bf16 weights with fp32 activations and KV (the path before):
    the same top token almost everywhere, logits within bf16's rounding of a 30-layer model."""
    ids = embedded.tokenizer("Once upon a time, in a small village, there lived an old baker who")["input_ids"]
    config = EngineConfig(num_kv_blocks=16)

    def logits(dtype, act_dtype, gemm="plain"):
        model = apply_rewrites(from_hf(embedded.model, dtype=dtype, act_dtype=act_dtype), gemm=gemm)
        rows = [ModelRunner(model, config).prompt_logits(ids, chunk_size=c) for c in (None, 1)]  # prefill; decode
        return torch.cat(rows)

    ref = logits(torch.float32, torch.float32)
    mixed = logits(torch.bfloat16, torch.float32)
    new = logits(torch.bfloat16, torch.bfloat16, gemm)
    for other in (ref, mixed):
        agree = (new.argmax(-1) == other.argmax(-1)).float().mean().item()
        assert agree >= 0.85, agree
        err = (new - other).abs().mean() / other.abs().mean()
        assert err < 0.1, err.item()
