"""Paged attention for the CPU that reads the KV cache's blocks in place, and the decoder's small bfloat16 ops
fused one pass each: a small C++ extension (csrc/), built by torch on first use and cached (under
TORCH_EXTENSIONS_DIR).

The torch path (`labkit.model.attention`) gathers every decode row's context into a new tensor before two batched
matmuls: at 48 rows of 300 tokens that gather and the matmuls cost more than the step's linears. The extension
walks each row's block table instead, one (token, KV head) pair per task, scores, softmax and the weighted sum in
float32, as vLLM's CPU paged attention does. A prompt's tokens go through it too, each over the slots up to its
own position (causal attention token by token, after the step's keys are written; consecutive tokens share each
tile of keys, read and transposed once for up to 16 of them, the same sums bit for bit): at 32 prompts of 64 tokens
that is 2.5x faster than SDPA's flash kernel, and a token's output no longer depends on how its prompt was
chunked or how much of it the prefix cache held. It serves a bfloat16 cache; the float32 path stays torch's (its
outputs are what the greedy-identity tests compare with HF). Where no C++ compiler or ninja is found,
`paged_decode_op()` is None and the torch path serves everything.

The row ops (csrc/cpu_ops.cpp: the residual add with the RMSNorm after it, RMSNorm, SiLU-and-multiply, RoPE, the
KV write) replace three to seven torch ops each, each of which walks the rows once and, for bfloat16, converts
them to float32 and back; they round where torch's sequence rounds. `TorchKernels` and `write_kv` use them for
bfloat16 rows on a CPU (RoPE reads the fused projection's q and k heads in place). `csrc/gguf_linear.cpp` is the
GGUF-block linear (`labkit.model.gguf_linear.GGUFLinear`).

Eager steps call the kernels through the module's Python bindings (a microsecond each); a compiled decode step
calls the same kernels as operators registered in C++ (`torch.ops.labkit.*`), the KV write and the attention as one
operator that mutates the cache, so a compiled step and an eager one (a prefill, a step verifying draft tokens)
compute every row alike, bit for bit, and speculation over a compiled step stays token-identical.

The build is cached in a folder named by a hash of the source, the flags, torch, Python and the CPU's
instruction sets, so checkouts at different paths share one build and a `-march=native` build never runs on
another CPU; a built extension is imported without running ninja. Builds take an flock, which the kernel drops
when its holder dies: a process killed mid-build (a replica stopped while it loads) leaves no lock behind that
would make every later process wait forever (torch's own lock file would).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

logger = logging.getLogger("labkit.model")
CSRC = Path(__file__).parent / "csrc"  # paged_decode.cpp the attention kernel, cpu_ops.cpp the row ops and bindings
DISABLE_ENV = "LABKIT_CPU_ATTENTION"  # "torch": never build or use the extension


CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math")
LDFLAGS = ("-fopenmp",)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build_directory() -> Path:
    """Where this source, built with these flags for this torch, Python and CPU, lives."""
    from torch.utils.cpp_extension import get_default_build_root

    parts = [*(f.read_text() for f in _sources()), *CFLAGS, *LDFLAGS, torch.__version__, sys.version,
             platform.machine(), _cpu_flags()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"labkit_paged_decode_{key}"


def _sources() -> list[Path]:
    """The extension's files (.cpp and headers), in a fixed order."""
    return sorted(f for f in CSRC.iterdir() if f.suffix in (".cpp", ".h"))


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_or_import():
    import fcntl  # POSIX; elsewhere the ImportError means the torch ops serve

    directory = build_directory()
    name = directory.name
    library = directory / f"{name}.so"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "labkit.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then import its library
        if library.exists():
            return _import(name, library)
        from torch.utils.cpp_extension import load

        (directory / "lock").unlink(missing_ok=True)  # torch's lock, left by a builder that died holding ours
        for f in _sources():  # paths that stay the same for every checkout
            shutil.copyfile(f, directory / f.name)
        logger.info("building the CPU kernels extension in %s (once, about 40 s)", directory)
        return load(name=name, sources=[str(directory / f.name) for f in _sources() if f.suffix == ".cpp"],
                    build_directory=str(directory), extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                    verbose=False)


@functools.cache
def cpu_ops():
    """The extension module (`paged_decode`, and the bfloat16 row ops `add_rms_norm`, `rms_norm`, `silu_mul`,
    `write_kv`), or None where it cannot be built or LABKIT_CPU_ATTENTION=torch."""
    if os.environ.get(DISABLE_ENV, "").lower() == "torch":
        return None
    try:
        return _build_or_import()
    except Exception as exc:  # no compiler, no ninja, an unsupported platform: the torch path serves
        logger.warning("the CPU kernels extension is not available (%s); the torch ops serve instead",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def paged_decode_op():
    """The extension's `paged_decode(q [N, H, D], k_heads, v_heads [Hkv, slots, D], block_tables [B, M] int64,
    context_lens [N] int64, block_size, scale, token_rows=None) -> [N, H, D]`, or None where it cannot be built:
    query token n attends over the first context_lens[n] slots of block table token_rows[n] (n when None)."""
    ops = cpu_ops()
    return None if ops is None else ops.paged_decode


def takes_rows(x: torch.Tensor) -> bool:
    """Whether the extension's row ops take x: contiguous bfloat16 rows on a CPU, where the extension is built,
    outside torch.compile (inside it `compiles_rows` hands the same rows to the same kernel, as an operator)."""
    return _bf16_rows(x) and not torch.compiler.is_compiling() and cpu_ops() is not None


def takes_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the extension's `rope` takes x [N, H, D] (any row and head strides: the fused projection's q and k
    heads) with cos, sin [N, 1, D]: bfloat16 on a CPU, where the extension is built, outside torch.compile (inside
    it: `compiles_rope`)."""
    return _rope_inputs(x, cos, sin) and not torch.compiler.is_compiling() and cpu_ops() is not None


def _bf16_rows(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2 and x.is_contiguous()


def _rope_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (x.dtype == cos.dtype == sin.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 3
            and x.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
            and cos.numel() == sin.numel() == x.shape[0] * x.shape[-1])


def writes_kv(k: torch.Tensor, k_cache, slot_mapping: torch.Tensor) -> bool:
    """Whether the extension's `write_kv` stores these keys (and values): bfloat16 into a heads-major bfloat16
    cache on a CPU, outside torch.compile (a compiled decode step writes them in `write_and_attend`)."""
    return (k.dtype == torch.bfloat16 and k.device.type == "cpu" and _bf16_heads_major(k_cache)
            and slot_mapping.dtype == torch.int64 and not torch.compiler.is_compiling() and cpu_ops() is not None)


def serves(q: torch.Tensor, k_cache) -> bool:
    """Whether the extension takes this step's attention: a CPU bfloat16 cache stored heads-major (a KVCache layer)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and _bf16_heads_major(k_cache)
            and paged_decode_op() is not None)


def _bf16_heads_major(cache) -> bool:
    """A KVCache layer the extension reads and writes: a bfloat16 tensor stored [Hkv, slots, D] (an Int8KV is not)."""
    return isinstance(cache, torch.Tensor) and cache.dtype == torch.bfloat16 and cache.transpose(0, 1).is_contiguous()


# ---- the same kernels inside torch.compile -------------------------------------------------------------------
# A compiled decode step (EngineConfig.compile) calls each kernel whole, as the operator `torch.ops.labkit.<name>`
# (registered in C++): the step runs the eager step's kernels, bit for bit, without its Python. The attention
# operator writes the step's keys and values and attends in one call, declared as mutating the cache (vLLM's
# pattern): a graph that wrote the cache with one op and read it with another would hand the reader a functional
# copy in another layout.

@torch.compiler.assume_constant_result  # torch.compile asks once, at trace time, and keeps the answer
def compiled_ops() -> bool:
    """Whether the extension is built, with its kernels as operators `torch.ops.labkit.*` that torch.compile
    can trace (their output shapes registered)."""
    return cpu_ops() is not None and _register_ops()


def compiles_rows(x: torch.Tensor) -> bool:
    """Inside torch.compile, whether x's row op is the extension's operator (`takes_rows`' rows, traced)."""
    return torch.compiler.is_compiling() and _bf16_rows(x) and compiled_ops()


def compiles_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Inside torch.compile, whether RoPE of x is the extension's operator (`takes_rope`' inputs, traced)."""
    return torch.compiler.is_compiling() and _rope_inputs(x, cos, sin) and compiled_ops()


def compiles_attention(q: torch.Tensor, k_cache) -> bool:
    """Inside torch.compile, whether a static decode step writes its keys and attends with the extension's
    `write_and_attend` operator (a heads-major bf16 cache on a CPU, as `serves` asks)."""
    return (torch.compiler.is_compiling() and q.device.type == "cpu" and q.dtype == torch.bfloat16
            and _bf16_heads_major(k_cache) and compiled_ops())


@functools.cache
def _register_ops() -> bool:
    """The output shapes of the extension's operators (registered in C++, csrc/cpu_ops.cpp), for tracing."""
    fake = torch.library.register_fake
    fake("labkit::gguf_linear")(lambda x, codes, d, m, bits: x.new_empty(x.shape[0], codes.shape[0]))
    fake("labkit::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    fake("labkit::add_rms_norm")(lambda x, residual, weight, eps: (torch.empty_like(x), torch.empty_like(x)))
    fake("labkit::silu_mul")(lambda gate_up: gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2))
    fake("labkit::rope")(lambda x, cos, sin: x.new_empty(x.shape))
    fake("labkit::write_and_attend")(lambda q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                                     block_size, scale: q.new_empty(q.shape))
    return True


__all__ = ["cpu_ops", "paged_decode_op", "takes_rows", "writes_kv", "serves", "compiled_ops", "compiles_rows",
           "compiles_rope", "compiles_attention", "build_directory", "CSRC", "DISABLE_ENV"]
