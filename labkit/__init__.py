"""labkit: the support library of the LLM Inference Lab.

Modules (imported on first use, so `import labkit` stays cheap): device, models, llama, sampling,
generation, quant, bench, results, plots, runner, baseline, bench_decode, serve, client, loadgen, cli.
"""

import importlib

__version__ = "0.1.0"
_MODULES = ("device", "models", "llama", "sampling", "generation", "quant", "bench", "results", "plots", "runner",
            "baseline", "bench_decode", "serve", "client", "loadgen", "cli")
__all__ = [*_MODULES, "Engine", "SamplingParams", "load_model"]
_NAMES = {"Engine": "generation", "SamplingParams": "sampling", "load_model": "models"}


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"labkit.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"labkit.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
