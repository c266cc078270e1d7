"""`labkit bench decode`'s runners: one timed pass over a workload's prompts, for a torch engine (HF or labkit,
speculative or not) and for llama.cpp (llama-cpp-python, plain or with its own prompt-lookup draft).

Every runner gets the same prompt token ids and generates exactly `max_tokens` greedy tokens per prompt, EOS
included and not stopped at (labkit's `ignore_eos`; llama-cpp-python's `Llama.generate`, which has no stop
condition), and hands back a `Sample`: decode tokens/s over the pass, the median TTFT, and every row's tokens
(for the lossless check of speculative runners against their plain twins).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from labkit.lab.stats import weight_bytes_per_token
from labkit.model.loader import embedded_gguf_path


@dataclass(frozen=True)
class LookupSettings:
    """Prompt-lookup (n-gram) speculation, in vLLM's speculative-config names; validated on creation."""

    num_speculative_tokens: int = 8  # drafts per step (gamma); llama.cpp's num_pred_tokens
    prompt_lookup_max: int = 4  # the longest n-gram looked up; llama.cpp's max_ngram_size
    prompt_lookup_min: int = 1  # the shortest (llama.cpp's lookup always goes down to 1)

    def __post_init__(self):
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")

    def to_dict(self) -> dict:
        return {"method": "ngram", "num_speculative_tokens": self.num_speculative_tokens,
                "prompt_lookup_max": self.prompt_lookup_max, "prompt_lookup_min": self.prompt_lookup_min}


@dataclass
class Sample:
    """One timed pass over a workload's prompts."""

    tokens_per_s: float  # all rows' decode tokens (after each prompt's first) over the decode seconds
    ttft_ms: float  # median over the prompts
    tokens: list[list[list[int]]]  # [prompt][row] -> the generated token ids


class TorchRunner:
    """An HF or labkit engine (a labkit one may carry a Speculator)."""

    def __init__(self, engine, weights, max_tokens: int):
        self.engine = engine
        self.bytes_per_step = weight_bytes_per_token(weights)
        self.params = engine.sampling_params(max_new_tokens=max_tokens, ignore_eos=True)
        self.speculator = getattr(engine, "speculator", None)

    def warmup(self, batch_size: int, prompts: list[list[int]]) -> None:
        self.engine.generate([prompts[0]] * batch_size, self.engine.sampling_params(max_new_tokens=8,
                                                                                    ignore_eos=True))

    def reset_stats(self) -> None:
        if self.speculator is not None:
            self.speculator.reset_stats()

    def stats(self) -> dict:
        return {} if self.speculator is None else self.speculator.stats.to_dict()

    def __call__(self, batch_size: int, prompts: list[list[int]]) -> Sample:
        tokens, seconds, ttfts, all_tokens = 0, 0.0, [], []
        for ids in prompts:
            gens = self.engine.generate([ids] * batch_size, self.params)
            times = gens[0].token_times_s  # one batch: every row ends at the same step
            tokens += batch_size * (len(times) - 1)
            seconds += times[-1] - times[0]
            ttfts.append(gens[0].ttft_s * 1e3)
            all_tokens.append([list(g.tokens) for g in gens])
        return Sample(tokens / seconds, statistics.median(ttfts), all_tokens)


def _counting_lookup(settings: LookupSettings):
    """llama-cpp-python's own LlamaPromptLookupDecoding, counting its calls: one per decode forward."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    class CountingLookup(LlamaPromptLookupDecoding):
        calls = 0

        def __call__(self, input_ids, /, **kwargs):
            self.calls += 1
            return super().__call__(input_ids, **kwargs)

    return CountingLookup(max_ngram_size=settings.prompt_lookup_max,
                          num_pred_tokens=settings.num_speculative_tokens)


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on the embedded model's GGUF file, batch 1, `threads` threads for decode and
    prefill alike; with `lookup`, its own prompt-lookup decoding as the draft model."""

    def __init__(self, max_tokens: int, threads: int, n_ctx: int, lookup: LookupSettings | None = None):
        from llama_cpp import Llama

        self.draft = _counting_lookup(lookup) if lookup is not None else None
        self.llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, verbose=False, seed=0, draft_model=self.draft)
        self.max_tokens, self.threads = max_tokens, threads
        self.bytes_per_step = embedded_gguf_path().stat().st_size
        self._forwards = self._tokens = 0

    def warmup(self, batch_size: int, prompts: list[list[int]]) -> None:
        self._generate(prompts[0], 8)

    def reset_stats(self) -> None:
        self._forwards = self._tokens = 0

    def stats(self) -> dict:
        if self.draft is None:
            return {}
        return {"decode_forwards": self._forwards,
                "tokens_per_forward": self._tokens / self._forwards if self._forwards else None}

    def _generate(self, ids: list[int], num_tokens: int) -> tuple[list[int], list[float], float]:
        # llama-cpp-python keeps the last prompt's KV and skips the prefix a new prompt shares with it: forget
        # it, or TTFT would time that reuse (as a prefix cache would)
        self.llm.reset()
        calls = self.draft.calls if self.draft is not None else 0
        out, stamps, start = [], [], time.perf_counter()
        for token in self.llm.generate(ids, temp=0.0):  # greedy; generate() never stops at EOS
            out.append(token)
            stamps.append(time.perf_counter())
            if len(out) == num_tokens:
                break
        if self.draft is not None:
            self._forwards += self.draft.calls - calls
            self._tokens += len(out) - 1
        return out, stamps, start

    def __call__(self, batch_size: int, prompts: list[list[int]]) -> Sample:
        tokens, seconds, ttfts, all_tokens = 0, 0.0, [], []
        for ids in prompts:
            out, stamps, start = self._generate(ids, self.max_tokens)
            tokens += len(stamps) - 1
            seconds += stamps[-1] - stamps[0]
            ttfts.append((stamps[0] - start) * 1e3)
            all_tokens.append([out])
        return Sample(tokens / seconds, statistics.median(ttfts), all_tokens)


__all__ = ["LookupSettings", "Sample", "TorchRunner", "LlamaCppRunner"]
