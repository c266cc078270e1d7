"""Quantization quality and benchmarks (notebook 07); the quantizing rewrites live in labkit.model.quantize."""
