"""The baseline engine: HF transformers' `generate` behind the same call shape and timings as labkit's `Engine`
(not a second engine: no scheduler, no paged cache), and `make_engine`, which builds either by name."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from labkit.device import dtype_name
from labkit.engine.engine import Engine
from labkit.engine.outputs import Generation
from labkit.engine.text import cut_at_stop
from labkit.model.loader import eos_token_ids_of
from labkit.model.sampling import SamplingParams

ENGINES = ("labkit", "hf")


class HFEngine:
    """The baseline: HF `generate` with the same call shape and timings as `Engine` (not a second engine)."""

    def __init__(self, hf_model, tokenizer=None, name: str = "model"):
        self.model, self.tokenizer, self.name = hf_model, tokenizer, name
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        self.eos_token_ids = eos_token_ids_of(hf_model, tokenizer)
        self.max_seq_len = hf_model.config.max_position_embeddings

    def describe(self) -> dict:
        return {"engine": "hf", "model": self.name, "device": str(self.device), "dtype": dtype_name(self.dtype),
                "attention": getattr(self.model.config, "_attn_implementation", None), "kernels": "torch",
                "compile": False}

    encode = Engine.encode
    sampling_params = Engine.sampling_params

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """HF generate: one batched call when the prompts have equal lengths (no padding), else one each."""
        if len(prompts) > 1 and len({len(p) for p in prompts}) == 1:
            return self._generate_batch(prompts, params)
        return [self._generate_batch([p], params)[0] for p in prompts]

    def _generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        from transformers import GenerationConfig

        times: list[float] = []

        class _Clock:  # HF calls put() with the prompt first, then once per new token
            def __init__(self):
                self.calls = 0

            def put(self, value):
                self.calls += 1
                if self.calls > 1:
                    times.append(time.perf_counter() - start)

            def end(self):
                pass

        if params.seed is not None:
            torch.manual_seed(params.seed)
        eos = None if params.ignore_eos else (list(params.stop_token_ids) or None)
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=not params.is_greedy,
            temperature=params.temperature if not params.is_greedy else None,
            top_k=params.top_k or None, top_p=params.top_p if params.top_p < 1 else None,
            eos_token_id=eos, pad_token_id=eos[0] if eos else 0,
            # HF falls back to the model's EOS when given none: forbid stopping instead (ignore_eos)
            min_new_tokens=params.max_new_tokens if params.ignore_eos else None,
            stop_strings=list(params.stop) or None)
        ids = torch.tensor([list(p) for p in prompts], device=self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                      streamer=_Clock(), tokenizer=self.tokenizer if params.stop else None)
        results = []
        for b, prompt in enumerate(prompts):
            new = out[b, ids.shape[1]:].tolist()
            reason = "length"
            if eos:
                ends = [i for i, t in enumerate(new) if t in eos]
                if ends:  # rows that stopped early are padded after their EOS
                    new, reason = new[: ends[0]], "stop"
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if params.stop and cut_at_stop(text, params.stop) != text:
                    text, reason = cut_at_stop(text, params.stop), "stop"
            results.append(Generation(prompt_tokens=list(prompt), tokens=new, text=text, finish_reason=reason,
                                      ttft_s=times[0] if times else time.perf_counter() - start,
                                      token_times_s=times[: len(new)]))
        return results


def make_engine(kind: str, loaded, **kwargs):
    """An engine of the given kind ("labkit" or "hf") over a LoadedModel."""
    if kind == "hf":
        return HFEngine(loaded.model, loaded.tokenizer, name=loaded.name)
    if kind == "labkit":
        return Engine.from_hf(loaded.model, loaded.tokenizer, name=loaded.name, **kwargs)
    raise ValueError(f"unknown engine {kind!r}: choose one of {', '.join(ENGINES)}")


__all__ = ["HFEngine", "make_engine", "ENGINES"]
