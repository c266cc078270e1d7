"""Tensor parallelism: process groups, the TP split, launch, the scaling model, bench (notebook 06)."""
