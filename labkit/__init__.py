"""labkit: the support library of the LLM Inference Lab."""

__version__ = "0.1.0"
