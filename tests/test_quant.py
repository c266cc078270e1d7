import torch

from labkit.generation import Engine
from labkit.quant import Int8WeightOnlyLinear, quantize_int8_ref


def test_int8_reference_round_trip_error_is_bounded():
    w = torch.randn(64, 96)
    q, scale = quantize_int8_ref(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


def test_int8_linear_matches_dequantized_reference():
    lin = torch.nn.Linear(96, 40, bias=True)
    qlin = Int8WeightOnlyLinear(lin)
    x = torch.randn(3, 5, 96)
    q, scale = quantize_int8_ref(lin.weight)
    ref = x @ (q.float() * scale[:, None]).t() + lin.bias
    # the CPU kernel takes bf16 activations and scales: a bf16-sized tolerance
    torch.testing.assert_close(qlin(x), ref, atol=0.05, rtol=0.02)


def test_quantized_engine_keeps_the_embedded_model_close(embedded):
    fp32 = Engine.from_hf(embedded.model, embedded.tokenizer)
    int8 = Engine.from_hf(embedded.model, embedded.tokenizer, quantize="int8")
    assert int8.describe()["quantize"] == "int8"
    ids = fp32.encode("The three primary colors are red, yellow and")
    a, b = fp32.prompt_logits(ids), int8.prompt_logits(ids)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.98
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
