"""Quantization quality (notebook 07); the quantizing rewrites live in labkit.model.quantize and the benchmark
in labkit.bench.quant."""
