"""Measurements that span techniques: baseline (01), decode, batching (05), kernels (04), the GPU check."""
