"""The model: Llama-family architecture, attention and KV cache, sampling, loading, rewrites."""
