"""Backends are resolved by name, without string imports, and the kernels package imports nothing from the model."""

import ast
from pathlib import Path

import pytest
import torch

import labkit
from labkit.model.attention import math_core, sdpa_core
from labkit.model.backends import ATTENTION_BACKENDS, KERNEL_BACKENDS, TorchKernels, attention_backend, kernel_backend


def test_torch_backends_resolve_to_their_objects():
    assert attention_backend("sdpa") is sdpa_core and attention_backend("math") is math_core
    assert kernel_backend("torch") is TorchKernels
    assert set(ATTENTION_BACKENDS) == {"sdpa", "math", "triton"} and set(KERNEL_BACKENDS) == {"torch", "triton"}


@pytest.mark.parametrize("resolve, kind", [(attention_backend, "attention"), (kernel_backend, "kernel")])
def test_unknown_names_list_the_choices(resolve, kind):
    with pytest.raises(ValueError, match=f"unknown {kind} backend 'cuda': choose one of"):
        resolve("cuda")


def test_kernels_import_nothing_from_the_model():
    for path in (Path(labkit.__file__).parent / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("labkit.model") for n in names), f"{path.name} imports {names}"


def test_add_rms_norm_is_the_unfused_add_then_norm():
    gen = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.randn(8, generator=gen)
    out, total = TorchKernels.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(total, r + x) and torch.equal(out, TorchKernels.rms_norm(r + x, w, 1e-6))
