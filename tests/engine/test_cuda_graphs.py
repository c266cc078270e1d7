"""CUDA graphs of the decode step: replay gives the tokens eager gives, per batch bucket, with any backend."""

import pytest
import torch

from labkit.engine.engine import Engine, EngineConfig
from labkit.model.loader import load_model
from labkit.model.sampling import SamplingParams


def test_cuda_graphs_need_a_cuda_model():
    tiny = load_model("tiny-llama", dummy=True, device="cpu")
    with pytest.raises(ValueError, match="CUDA device; it is on cpu"):
        Engine.from_hf(tiny.model, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        EngineConfig(cuda_graphs="yes")
    assert Engine.from_hf(tiny.model).capture_s is None
    with pytest.raises(ValueError, match="compile=True traces the torch backends only"):
        Engine.from_hf(tiny.model, kernels="triton", compile=True)


@pytest.fixture(scope="module")
def gpu_model():
    """fp32 (no TF32 in matmuls, IEEE dots in the kernels): the static and planned paths then agree to ~1e-6,
    so greedy tokens cannot flip between them; bf16 would make near-ties of a random model a coin toss."""
    return load_model("tiny-llama", dummy=True, device="cuda", dtype="fp32")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_replay_equals_eager(gpu_model, backend):
    kwargs = dict(kernels=backend, attention="sdpa" if backend == "torch" else "triton", num_kv_blocks=64)
    eager = Engine.from_hf(gpu_model.model, **kwargs)
    graphs = Engine.from_hf(gpu_model.model, cuda_graphs=True, **kwargs)
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 40)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, detokenize=False)
    for batch in ([prompts[0]], prompts, prompts[:2]):  # buckets of 1, 4 and 2 rows
        assert [g.tokens for g in graphs.generate(batch, params)] == [g.tokens for g in eager.generate(batch, params)]
    assert graphs.runner.num_graphs >= 3 and graphs.capture_s > 0
    torch.testing.assert_close(graphs.prompt_logits(prompts[1]), eager.prompt_logits(prompts[1]))  # prefill: eager


@pytest.mark.gpu
def test_compiled_step_under_graphs_equals_eager(gpu_model):
    """torch.compile's step captured in a graph (one bucket: each compile takes seconds)."""
    eager = Engine.from_hf(gpu_model.model, num_kv_blocks=16)
    graphs = Engine.from_hf(gpu_model.model, cuda_graphs=True, compile=True, num_kv_blocks=16)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, detokenize=False)
    assert graphs.warmup(batch_size=1, seq_len=40) > 0 and graphs.compile_s > 0 and graphs.capture_s > 0
    prompt = list(range(3, 20))
    assert graphs.generate([prompt], params)[0].tokens == eager.generate([prompt], params)[0].tokens


@pytest.mark.gpu
def test_graph_replay_reads_the_cache_it_was_given_later(gpu_model):
    """A graph captured for one request replays correctly for another at other block addresses."""
    engine = Engine.from_hf(gpu_model.model, cuda_graphs=True, kernels="triton", attention="triton", num_kv_blocks=64)
    reference = Engine.from_hf(gpu_model.model, kernels="triton", attention="triton", num_kv_blocks=64)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, detokenize=False)
    engine.generate([[1, 2, 3]], params)  # captures the 1-row bucket, then frees its blocks
    for prompt in ([9] * 30, list(range(50, 90))):
        assert engine.generate([prompt], params)[0].tokens == reference.generate([prompt], params)[0].tokens


@pytest.mark.gpu
def test_dummy_models_are_built_on_the_device():
    lm = load_model("llama-1b", dummy=True, device="cuda", dtype="bf16")
    assert lm.load_s < 20  # random init on the CPU then a copy took 67 s on an H200
    assert all(p.device.type == "cuda" for p in lm.model.parameters())
    engine = Engine.from_hf(lm.model, cuda_graphs=True, kernels="triton", attention="triton", num_kv_blocks=32)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, detokenize=False)
    mine = engine.generate([list(range(100, 132))], params)[0].tokens
    ref = Engine.from_hf(lm.model, num_kv_blocks=32).generate([list(range(100, 132))], params)[0].tokens
    assert mine[:4] == ref[:4]  # bf16 kernels accumulate in other orders; the first tokens agree
