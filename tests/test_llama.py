"""The compact model's backends: swapping them shares the weights and keeps the outputs."""

import pytest
import torch

from labkit.llama import TorchKernels, from_hf, with_backends
from labkit.models import load_model


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


def test_add_rms_norm_is_the_unfused_add_then_norm():
    gen = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.randn(8, generator=gen)
    out, total = TorchKernels.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(total, r + x) and torch.equal(out, TorchKernels.rms_norm(r + x, w, 1e-6))
