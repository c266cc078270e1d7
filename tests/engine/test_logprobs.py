"""The engine's log-probabilities: each new token's equals log_softmax of the model's own logits at its position
(plain, int8-quantized, speculative), prompt logprobs come from one forward, and max_new_tokens=0 only scores."""

import pytest
import torch

from labkit.engine.engine import Engine
from labkit.model.llama import from_hf
from labkit.model.rewrites import apply_rewrites
from labkit.model.sampling import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog, and then"


def _hf_logprobs(tiny, ids: list[int]) -> torch.Tensor:
    """log_softmax of the HF model's logits at every position [T, V], computed directly."""
    with torch.no_grad():
        return torch.log_softmax(tiny.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _run(engine: Engine, prompt: list[int], params: SamplingParams) -> list:
    engine.add_request(prompt, params)
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    engine.blocks.check()
    assert engine.blocks.num_used_blocks == 0
    return outputs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_new_token_logprobs_are_the_models_log_softmax(tiny, temperature):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer)
    prompt = engine.encode(PROMPT)
    outputs = _run(engine, prompt, SamplingParams(max_new_tokens=6, temperature=temperature, seed=1, logprobs=3,
                                                  ignore_eos=True))
    tokens = [t for o in outputs for t in o.new_token_ids]
    entries = [e for o in outputs for e in o.logprobs]
    ref = _hf_logprobs(tiny, prompt + tokens)
    assert [e.token_id for e in entries] == tokens
    for j, entry in enumerate(entries):
        row = ref[len(prompt) - 1 + j]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_prompt_logprobs_and_max_new_tokens_zero(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer)
    prompt = engine.encode(PROMPT)
    (out,) = _run(engine, prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=2))
    assert out.finished and out.new_token_ids == [] and out.num_output_tokens == 0
    ref = _hf_logprobs(tiny, prompt)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
    want = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # with generation the prompt's logprobs ride on the first output only
    outputs = _run(engine, prompt, SamplingParams(max_new_tokens=3, prompt_logprobs=0, ignore_eos=True))
    assert [o.prompt_logprobs is not None for o in outputs] == [True, False, False]
    assert [e.logprob for e in outputs[0].prompt_logprobs[1:]] == pytest.approx(got.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_int8_engine_logprobs_are_its_own_log_softmax(tiny):
    engine = Engine(apply_rewrites(from_hf(tiny.model), quantize="int8"), tiny.tokenizer)
    prompt = engine.encode(PROMPT)
    outputs = _run(engine, prompt, SamplingParams(max_new_tokens=5, logprobs=1, prompt_logprobs=1, ignore_eos=True))
    tokens = [t for o in outputs for t in o.new_token_ids]
    ref = torch.log_softmax(engine.prompt_logits(prompt + tokens).float(), dim=-1)  # the quantized model, one pass
    got = [e.logprob for o in outputs for e in o.logprobs]
    want = [ref[len(prompt) - 1 + j, t].item() for j, t in enumerate(tokens)]
    assert got == pytest.approx(want, abs=1e-4)
    prompt_got = [e.logprob for e in outputs[0].prompt_logprobs[1:]]
    assert prompt_got == pytest.approx([ref[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)], abs=1e-4)


def test_speculative_rows_take_logprobs_from_the_targets_verify_logits(tiny):
    from labkit.engine.config import SpeculativeConfig
    from labkit.engine.spec_decode.proposers import NgramProposer
    from labkit.engine.spec_decode.speculator import Speculator

    target = from_hf(tiny.model)
    speculator = Speculator(NgramProposer(), SpeculativeConfig(num_speculative_tokens=3))
    engine = Engine(target, tiny.tokenizer, speculator=speculator)
    prompt = engine.encode("a b c a b c a b c a b c a b c")
    outputs = _run(engine, prompt, SamplingParams(max_new_tokens=12, logprobs=2, ignore_eos=True))
    assert engine.speculator.stats.num_accepted_tokens > 0  # some steps kept several tokens
    tokens = [t for o in outputs for t in o.new_token_ids]
    got = [e.logprob for o in outputs for e in o.logprobs]
    ref = _hf_logprobs(tiny, prompt + tokens)
    assert got == pytest.approx([ref[len(prompt) - 1 + j, t].item() for j, t in enumerate(tokens)], abs=1e-4)


def test_logit_bias_applies_to_greedy_and_sampled_rows_and_is_checked(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer)
    prompt = engine.encode(PROMPT)
    forced = 1234
    for temperature in (0.0, 0.8):
        params = SamplingParams(max_new_tokens=4, temperature=temperature, logit_bias={forced: 100}, ignore_eos=True)
        assert engine.generate([prompt], params)[0].tokens == [forced] * 4
    with pytest.raises(ValueError, match="logit_bias token"):
        engine.add_request(prompt, SamplingParams(logit_bias={10**7: 1.0}))
    assert not engine.has_unfinished


def test_a_stop_token_that_ends_a_request_keeps_its_logprob(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer)
    eos = engine.eos_token_ids[0]
    prompt = engine.encode(PROMPT)
    outputs = _run(engine, prompt, engine.sampling_params(max_new_tokens=4, logprobs=0, logit_bias={eos: 100}))
    (out,) = outputs
    assert out.finish_reason == "stop" and out.new_token_ids == []  # the stop token is not output...
    assert [e.token_id for e in out.logprobs] == [eos]  # ...but its logprob is, as vLLM's
    assert out.logprobs[0].logprob == pytest.approx(_hf_logprobs(tiny, prompt)[-1, eos].item(), abs=1e-4)
