"""Measurements that span techniques: baseline (01), decode, batching (05), kernels (04), quantization (07; it
runs the decode benchmark over each scheme), the GPU check."""
