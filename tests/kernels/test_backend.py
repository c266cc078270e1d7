"""The Triton backends in the engine: the same greedy tokens as the torch backends on the embedded model, the
same logits through chunked prefill, prefix-cache hits and ragged batches."""

import pytest
import torch

from labkit.engine.engine import Engine
from labkit.model.loader import load_model
from labkit.model.sampling import SamplingParams


def _engines(lm, **kwargs):
    torch_engine = Engine.from_hf(lm.model, lm.tokenizer, name=lm.name, **kwargs)
    triton_engine = Engine.from_hf(lm.model, lm.tokenizer, name=lm.name, kernels="triton", attention="triton",
                                   **kwargs)
    return torch_engine, triton_engine


@pytest.mark.slow
def test_greedy_tokens_identical_on_the_embedded_model(embedded, device):
    if device.type != "cpu":
        pytest.skip("the embedded model is loaded on the CPU")
    reference, triton_engine = _engines(embedded, num_kv_blocks=8)
    assert triton_engine.describe()["kernels"] == triton_engine.describe()["attention"] == "triton"
    prompt = reference.encode("Once upon a time, in a small village,")
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, detokenize=False)  # the interpreter is slow
    mine, ref = triton_engine.generate([prompt], params)[0], reference.generate([prompt], params)[0]
    assert mine.tokens == ref.tokens  # a prefill through flash attention, then a decode step through split-K


def test_chunked_prefill_and_prefix_hits_match_torch(tiny, device):
    if device.type != "cpu":
        pytest.skip("the tiny model is loaded on the CPU")
    reference, triton_engine = _engines(tiny, num_kv_blocks=16, max_num_batched_tokens=16)
    ids = list(range(5, 35))  # 30 tokens: chunks of 11 attend to the cached context before them
    torch.testing.assert_close(triton_engine.prompt_logits(ids, chunk_size=11), reference.prompt_logits(ids),
                               atol=2e-5, rtol=2e-5)
    prompts = [ids[:18], ids[:27], [9, 8, 7]]  # the first two share a prefix block; ragged lengths
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, detokenize=False)
    assert [g.tokens for g in triton_engine.generate(prompts, params)] == \
        [g.tokens for g in reference.generate(prompts, params)]


def test_static_decode_step_matches_the_planned_one(device):
    """The shape-static step (what torch.compile and CUDA graphs run: padded rows and tables, every input a
    column of one tensor) through the triton backends, run eagerly here, gives the planned steps' tokens."""
    lm = load_model("tiny-llama", dummy=True, device="cpu")
    if device.type != "cpu":
        pytest.skip("the tiny model is loaded on the CPU")
    planned = Engine.from_hf(lm.model, kernels="triton", attention="triton", num_kv_blocks=16)
    static = Engine.from_hf(lm.model, kernels="triton", attention="triton", num_kv_blocks=16)
    static.config.compile = True  # decode steps take the static path ...
    static.runner.compiled_step = static.runner.static_step  # ... uncompiled: the interpreter cannot be traced
    prompts = [list(range(3, 12)), list(range(40, 43)), [5]]  # 3 rows: padded to a bucket of 4
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, detokenize=False)  # a prefill, two static steps
    assert [g.tokens for g in static.generate(prompts, params)] == [g.tokens for g in planned.generate(prompts, params)]
