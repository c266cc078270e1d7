"""Speculative decoding: the speculator, proposers, draft training, the lossless check, bench (notebook 03)."""
