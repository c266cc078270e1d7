import pytest
import torch

from labkit.model.sampling import SamplingParams, make_generator, sample


@pytest.mark.parametrize("kwargs, bad", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "-3"),
    (dict(temperature=-0.1), "-0.1"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "1.5"),
    (dict(top_k=-1), "top_k"), (dict(stop=("",)), "stop"),
])
def test_bad_params_name_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        SamplingParams(**kwargs)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample(logits, SamplingParams()).tokens.tolist() == [1, 0]


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, params, g).tokens) for _ in range(300)}
    assert drawn == {0, 1}


def test_top_k_and_temperature_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits, SamplingParams(temperature=1.0, top_k=2), g).tokens for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}
    share = (draws == 0).float().mean().item()
    assert abs(share - torch.softmax(torch.tensor([2.0, 1.0]), 0)[0].item()) < 0.04


def test_tiny_temperatures_are_greedy_not_nan():
    logits = torch.tensor([[0.1, 3.0, 0.2]])
    for t in (1e-40, 1e-9):
        out = sample(logits, SamplingParams(temperature=t, seed=1), return_probs=True)
        assert out.tokens.tolist() == [1] and out.probs.tolist() == [[0.0, 1.0, 0.0]]


def test_each_row_keeps_its_own_parameters_and_seed():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    rows = [SamplingParams(temperature=0.8, seed=3), SamplingParams(),
            SamplingParams(temperature=1.2, top_k=5, seed=9), SamplingParams(temperature=1.0, top_p=0.5, seed=4)]
    batched = []
    gens = [make_generator(p, "cpu") for p in rows]
    for _ in range(20):
        batched.append(sample(logits, rows, gens).tokens.tolist())
    for b, params in enumerate(rows):  # each row alone, with a fresh generator of the same seed
        gen = make_generator(params, "cpu")
        alone = [sample(logits[b:b + 1], params, gen).tokens.item() for _ in range(20)]
        assert alone == [step[b] for step in batched], b
    assert {step[1] for step in batched} == {int(logits[1].argmax())}


def test_probabilities_are_the_distribution_drawn_from():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0]])
    out = sample(logits, [SamplingParams(temperature=0.5, top_k=3, seed=0), SamplingParams()], return_probs=True)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 0.5, 0)
    torch.testing.assert_close(out.probs[0, :3], expected)
    assert out.probs[0, 3] == 0 and out.probs[1].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert out.probs[0, out.tokens[0]] > 0


def test_mismatched_rows_are_refused():
    with pytest.raises(ValueError, match="2 rows"):
        sample(torch.zeros(2, 5), [SamplingParams()])


def test_logit_bias_moves_the_argmax_and_leaves_the_input_alone():
    from labkit.model.sampling import apply_logit_bias

    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    rows = [SamplingParams(logit_bias={2: 10.0}), SamplingParams()]
    assert sample(logits, rows).tokens.tolist() == [2, 0]
    assert logits[0, 2].item() == pytest.approx(0.2)  # a copy was biased
    assert apply_logit_bias(logits, [SamplingParams(), SamplingParams()]) is logits


@pytest.mark.parametrize("kwargs, bad", [
    (dict(logit_bias={1: 101}), "101"), (dict(logit_bias={-1: 1}), "-1"), (dict(logit_bias={"1": 1}), "'1'"),
    (dict(logprobs=21), "21"), (dict(prompt_logprobs=True), "True"),
])
def test_bad_logprob_and_bias_params_name_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        SamplingParams(**kwargs)


def test_token_logprobs_are_log_softmax_with_the_top_k():
    from labkit.model.sampling import token_logprobs

    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    (lp0, top0), (lp1, top1) = token_logprobs(logits, [0, 2], 2)
    ref = torch.log_softmax(logits, -1)
    assert lp0 == pytest.approx(ref[0, 0].item()) and lp1 == pytest.approx(ref[1, 2].item())
    assert [t for t, _ in top0] == [2, 1] and top1[0][0] == 2
    assert token_logprobs(logits, [0, 2], 0)[0][1] == []
