"""The model: the Llama-family architecture (llama), attention over the paged KV cache (attention, kv_cache,
cpu_attention), the backends chosen by name (backends), sampling, loading (loader, gguf), and rewrites over a
built model (rewrites, quantize)."""
