import pytest
import torch

from labkit.sampling import SamplingParams, sample


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
    assert sample(logits, SamplingParams()).tolist() == [1, 0]


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, params, g)) for _ in range(300)}
    assert drawn == {0, 1}


def test_top_k_and_temperature_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}
    share = (draws == 0).float().mean().item()
    assert abs(share - torch.softmax(torch.tensor([2.0, 1.0]), 0)[0].item()) < 0.04
