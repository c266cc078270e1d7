"""Triton kernels for the decoder's hot paths, one module per op, each with its launcher, float32 reference and
cost: `rms_norm` (fused with the residual add), `swiglu`, `softmax`, `rope`, `flash_attention` (prefill, dense or
paged) and `decode_attention` (paged, split-K). `backend` plugs them into the model as the kernel backend
"triton" and the attention backend "triton". Importing a kernel module needs Triton; on a CPU the kernels run
under TRITON_INTERPRET=1 (set before Python starts)."""

import importlib

OPS = ("rms_norm", "swiglu", "softmax", "rope", "flash_attention", "decode_attention")
_MODULES = (*OPS, "common", "backend")
__all__ = [*_MODULES, "OPS"]


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"labkit.kernels.{name}")
    raise AttributeError(f"module 'labkit.kernels' has no attribute {name!r}")
