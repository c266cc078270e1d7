"""Tensor parallelism: process groups, the TP split, launch, the scaling model, bench (notebook 06), and the ranks
of a tensor-parallel server (serve, lockstep)."""
