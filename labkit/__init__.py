"""labkit: the support library of the LLM Inference Lab.

A small core (`device`, `model`, `kernels`, `engine`) under the lab bench (`lab`), one package per technique
(`serving`, `speculative`, `quant`, `parallel`), the cross-technique measurements (`bench`) and the command line
(`cli`). Packages are imported on first use, so `import labkit` stays cheap.
"""

import importlib

__version__ = "0.1.0"
_PACKAGES = ("device", "model", "kernels", "engine", "lab", "serving", "speculative", "quant", "parallel", "bench",
             "cli")
_NAMES = {"Engine": "engine", "EngineConfig": "engine", "SamplingParams": "model.sampling",
          "load_model": "model.loader"}
__all__ = [*_PACKAGES, *_NAMES]


def __getattr__(name):
    if name in _PACKAGES:
        return importlib.import_module(f"labkit.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"labkit.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
