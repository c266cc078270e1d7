"""labkit: the support library of the LLM Inference Lab.

Modules (imported on first use, so `import labkit` stays cheap): device, models, llama, attention,
block_manager, scheduler, sampling, text, generation, quant, bench, results, plots, runner, workloads,
baseline, bench_decode, bench_batching, protocol, metrics, serve, client, loadgen, arguments, cli, kernels (the
Triton kernels; needs Triton), cuda_graphs, bench_kernels, gpu_check, distributed, tp, launch, bench_tp,
scaling, router, speculative,
drafts, draft_training, bench_spec, quality.
"""

import importlib

__version__ = "0.1.0"
_MODULES = ("device", "models", "llama", "attention", "block_manager", "scheduler", "sampling", "text", "generation",
            "quant", "bench", "results", "plots", "runner", "workloads", "baseline", "bench_decode", "bench_batching",
            "protocol", "metrics", "serve", "client", "loadgen", "arguments", "cli", "kernels", "cuda_graphs",
            "bench_kernels", "gpu_check", "distributed",
            "tp", "launch", "bench_tp", "scaling", "router",
            "speculative", "drafts", "draft_training", "bench_spec", "quality")
__all__ = [*_MODULES, "Engine", "EngineConfig", "SamplingParams", "load_model"]
_NAMES = {"Engine": "generation", "EngineConfig": "generation", "SamplingParams": "sampling", "load_model": "models"}


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"labkit.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"labkit.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
