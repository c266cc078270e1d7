"""The labkit engine: static KV cache, prefill, single-token decode, batched generation, streaming.

One decode loop (`Engine.steps`) serves `generate`, `stream` and `stream_text`; speculative decoding,
batching, Triton kernels and quantization plug in through the engine's switches, not through a copy of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from labkit.device import dtype_name, pick_device, pick_dtype, synchronize
from labkit.llama import (ATTENTION_BACKENDS, KERNEL_BACKENDS, AttentionMetadata, KVCache, Linear, Transformer,
                          from_hf, visible_mask)
from labkit.sampling import SamplingParams, sample

ENGINES = ("labkit", "hf")


@dataclass
class Generation:
    """One finished sequence and its timings (seconds, from the call's start)."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    ttft_s: float  # prefill + first token
    token_times_s: list[float] = field(default_factory=list)  # when each new token was ready

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, over the time after the first: the steady decode rate."""
        if len(self.token_times_s) < 2:
            return float("nan")
        return (len(self.token_times_s) - 1) / (self.token_times_s[-1] - self.token_times_s[0])


@dataclass
class Step:
    """What one iteration of the decode loop produced: a token per row, and which rows just finished."""

    tokens: list[int]
    finished: list[bool]  # row finished at this step (its token is a stop token, not output)
    time_s: float


@dataclass
class TextDelta:
    """A piece of streamed text; the last one carries the finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


class Engine:
    """Generate with the compact model: `Engine.load()` or `Engine(from_hf(hf_model), tokenizer)`."""

    def __init__(self, model: Transformer, tokenizer=None, *, attention: str = "sdpa", kernels: str = "torch",
                 compile: bool = False, linear_layout: str = "auto", quantize: str | None = None,
                 name: str = "model"):
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
        if kernels not in KERNEL_BACKENDS:
            raise ValueError(f"unknown kernel backend {kernels!r}: choose one of {', '.join(KERNEL_BACKENDS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.attention = attention
        self.kernel_backend = kernels
        if linear_layout not in ("auto", "nk", "kn"):
            raise ValueError(f"unknown linear layout {linear_layout!r}: choose auto, nk ([out, in]) or kn ([in, out])")
        model.attend = ATTENTION_BACKENDS[attention]
        model.kernels = KERNEL_BACKENDS[kernels]
        weight_dtype = model.embed.weight.dtype
        if linear_layout == "auto":
            # measured (labkit bench decode): fp32 matrix-vector products stream weights faster from [in, out]
            # on CPU; bf16 and GPU kernels want [out, in]
            linear_layout = "kn" if model.embed.weight.device.type == "cpu" and weight_dtype == torch.float32 \
                and not quantize else "nk"
        if quantize:
            from labkit.quant import quantize as quantize_model

            quantize_model(model, quantize)
        elif linear_layout == "kn":
            for module in model.modules():
                if isinstance(module, Linear):
                    module.to_kn()
        self.linear_layout = linear_layout
        self.quantize = quantize
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype  # weight storage
        self.act_dtype = model.act_dtype  # activations and KV cache
        self.use_compile = compile
        self.compile_s: float | None = None
        self._compiled = None
        self._cache: KVCache | None = None

    @classmethod
    def load(cls, name: str = "smollm2-135m-instruct", device="auto", dtype="fp32", dummy: bool = False,
             seed: int = 0, **kwargs) -> "Engine":
        """Load an HF model (see `labkit.models.load_model`) and convert it to the compact model."""
        from labkit.models import load_model

        loaded = load_model(name, device=device, dtype=dtype, dummy=dummy, seed=seed)
        return cls.from_hf(loaded.model, loaded.tokenizer, name=loaded.name, **kwargs)

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, dtype=None, **kwargs) -> "Engine":
        dtype = pick_dtype(dtype) if dtype is not None else None
        engine = cls(from_hf(hf_model, dtype=dtype), tokenizer, **kwargs)
        engine.eos_token_ids = _eos_ids(hf_model, tokenizer)
        return engine

    eos_token_ids: tuple[int, ...] = ()

    @property
    def max_seq_len(self) -> int:
        return self.model.args.max_seq_len

    def describe(self) -> dict:
        return {"engine": "labkit", "model": self.name, "device": str(self.device), "dtype": dtype_name(self.dtype),
                "activation_dtype": dtype_name(self.act_dtype), "attention": self.attention,
                "kernels": self.kernel_backend, "linear_layout": self.linear_layout, "quantize": self.quantize,
                "compile": self.use_compile}

    # -- the model calls -------------------------------------------------------------------------------------
    def _get_cache(self, batch_size: int, seq_len: int) -> KVCache:
        if self.use_compile:
            # static shapes: round the length up so a few sizes cover all calls (each size compiles once)
            seq_len = min(self.max_seq_len, max(128, 1 << (seq_len - 1).bit_length()))
        cache = self._cache
        if cache is None or cache.max_batch_size != batch_size or cache.max_seq_len < seq_len \
                or (not self.use_compile and cache.max_seq_len > 4 * seq_len):
            cache = KVCache(self.model.args, batch_size, seq_len, self.device, self.act_dtype)
            self._cache = cache
        return cache

    def prefill(self, tokens: Sequence[int], row: int, cache: KVCache, start: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        """Run a prompt (or a chunk of it starting at `start`) into one cache row; return logits [T or 1, V]."""
        T = len(tokens)
        ids = torch.tensor([list(tokens)], device=self.device)
        positions = torch.arange(start, start + T, device=self.device)[None]
        kv_len = start + T
        mask = None
        if start:  # a chunk after earlier tokens: causal within the chunk, everything before it
            mask = visible_mask(positions, kv_len)
        meta = AttentionMetadata(rows=torch.tensor([row], device=self.device), row_slice=slice(row, row + 1),
                                 positions=positions, kv_len=kv_len, mask=mask, is_causal=start == 0 and T > 1,
                                 write_start=start)
        index = None if all_logits else slice(-1, None)
        return self.model(ids, meta, cache, logits_index=index)[0]

    def _prefill_equal(self, prompts: Sequence[Sequence[int]], cache: KVCache) -> torch.Tensor:
        """Prefill B prompts of one length into cache rows 0..B-1 in one forward; logits [B, V]."""
        B, T = len(prompts), len(prompts[0])
        ids = torch.tensor([list(p) for p in prompts], device=self.device)  # [B, T]
        positions = torch.arange(T, device=self.device).expand(B, T)
        meta = AttentionMetadata(rows=torch.arange(B, device=self.device), row_slice=slice(0, B),
                                 positions=positions, kv_len=T, is_causal=T > 1, write_start=0)
        return self.model(ids, meta, cache, logits_index=slice(-1, None))[:, -1]

    def _decode_eager(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, kv_len: int,
                      cache: KVCache, mask: torch.Tensor | None, write_start: int | None = None) -> torch.Tensor:
        meta = AttentionMetadata(rows=rows, row_slice=slice(0, tokens.shape[0]), positions=positions, kv_len=kv_len,
                                 mask=mask, write_start=write_start)
        return self.model(tokens, meta, cache)[:, -1]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               kv_len: int | None = None) -> torch.Tensor:
        """One token per row: tokens, positions [B, 1] -> logits [B, V]. kv_len: max(positions) + 1, known."""
        B = tokens.shape[0]
        rows = torch.arange(B, device=self.device)
        if self.use_compile:
            # static shapes for the compiled graph: attend over the whole cache, masked
            kv_len = cache.max_seq_len
            mask = visible_mask(positions, kv_len)
            return self._compiled_step()(tokens, positions, rows, kv_len, cache, mask)
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        ragged = B > 1 and bool((positions != positions[0]).any())
        mask, write_start = None, kv_len - 1
        if ragged:
            mask = visible_mask(positions, kv_len)
            write_start = None
        return self._decode_eager(tokens, positions, rows, kv_len, cache, mask, write_start)

    def _compiled_step(self):
        if self._compiled is None:
            # only the hot decode step is compiled (gpt-fast); prefill stays eager. Inductor's freezing option
            # was slower here (oneDNN's packed fp32 GEMV on AVX2), so the default options stand.
            # Module guards stay on: every engine shares _decode_eager's code object, so dropping them
            # (guard_filter_fn) would let an engine run another engine's graph.
            self._compiled = torch.compile(self._decode_eager, fullgraph=True, dynamic=False)
        return self._compiled

    def warmup(self, batch_size: int = 1, seq_len: int = 64) -> float:
        """Generate a few tokens through the real loop (compiling the decode step when asked); return seconds.

        With compile, the cache is sized for seq_len, so later calls of that batch size and up to that length
        reuse the compiled graph.
        """
        prompt = [0] * max(1, min(seq_len, self.max_seq_len) - 3)
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        start = time.perf_counter()
        self.generate([prompt] * batch_size, params)
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        if self.use_compile and self.compile_s is None:
            self.compile_s = elapsed
        return elapsed

    # -- the decode loop -------------------------------------------------------------------------------------
    def steps(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[Step]:
        """The one decode loop: prefill (per row, or batched when lengths agree: never padded), then decode
        all rows together, yielding each step's tokens."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B = len(prompts)
        lens = [len(p) for p in prompts]
        total = max(lens) + params.max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({max(lens)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's context of {self.max_seq_len} tokens")
        generator = None
        if not params.is_greedy and params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = set() if params.ignore_eos else set(params.stop_token_ids)
        with torch.inference_mode():
            cache = self._get_cache(B, total)
            if B > 1 and len(set(lens)) == 1:  # equal lengths: one batched prefill, still no padding
                logits = self._prefill_equal(prompts, cache)
            else:
                logits = torch.cat([self.prefill(p, row, cache) for row, p in enumerate(prompts)])  # [B, V]
            positions = torch.tensor(lens, device=self.device)[:, None]  # [B, 1] next position per row
            done = [False] * B
            for step in range(params.max_new_tokens):
                next_tokens = sample(logits, params, generator)  # [B]
                token_list = next_tokens.tolist()  # the only host sync per step
                finished = [not done[b] and token_list[b] in stop_ids for b in range(B)]
                yield Step(tokens=token_list, finished=finished, time_s=time.perf_counter())
                done = [d or f for d, f in zip(done, finished)]
                if all(done) or step == params.max_new_tokens - 1:
                    break
                kv_len = max(lens) + step + 1
                logits = self.decode(next_tokens[:, None], positions, cache, kv_len=kv_len)
                positions = positions + 1

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """Generate for a batch of token-id prompts (ragged lengths allowed)."""
        start = time.perf_counter()
        B = len(prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        times: list[list[float]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        active = [True] * B
        for step in self.steps(prompts, params):
            for b in range(B):
                if not active[b]:
                    continue
                if step.finished[b]:
                    active[b], reasons[b] = False, "stop"
                    continue
                out[b].append(step.tokens[b])
                times[b].append(step.time_s - start)
                if params.stop and self.tokenizer is not None:
                    text = self.tokenizer.decode(out[b], skip_special_tokens=True)
                    if any(s in text for s in params.stop):
                        active[b], reasons[b] = False, "stop"
            if not any(active):
                break
        results = []
        for b in range(B):
            text = None
            if self.tokenizer is not None:
                text = _cut_at_stop(self.tokenizer.decode(out[b], skip_special_tokens=True), params.stop)
            results.append(Generation(prompt_tokens=list(prompts[b]), tokens=out[b], text=text,
                                      finish_reason=reasons[b], ttft_s=times[b][0] if times[b] else
                                      time.perf_counter() - start, token_times_s=times[b]))
        return results

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yield token ids of one prompt as they are generated; closing the iterator stops generation."""
        for step in self.steps([prompt], params):
            if step.finished[0]:
                return
            yield step.tokens[0]

    def stream_text(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[TextDelta]:
        """Yield text deltas, holding back text that could still become a stop string or a split character."""
        if self.tokenizer is None:
            raise ValueError("stream_text needs a tokenizer")
        tokens: list[int] = []
        pending: list[int] = []
        emitted = ""
        finish = "length"
        for token in _with_end(self.stream(prompt, params)):
            if token is None:  # the stream ended: by a stop token, or at max_new_tokens
                finish = "stop" if len(tokens) < params.max_new_tokens else "length"
                break
            tokens.append(token)
            pending.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = _cut_at_stop(text, params.stop)
            if cut != text:
                yield TextDelta(cut[len(emitted):], pending, "stop")
                return
            safe = len(text) - _held_back(text, params.stop)
            if safe > len(emitted):
                yield TextDelta(text[len(emitted):safe], pending)
                emitted, pending = text[:safe], []
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        yield TextDelta(text[len(emitted):], pending, finish)

    # -- text helpers ----------------------------------------------------------------------------------------
    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt, through the model's chat template when chat=True."""
        return encode_prompt(self.tokenizer, text, chat)

    def sampling_params(self, **kwargs) -> SamplingParams:
        """SamplingParams that stop at this model's EOS tokens unless told otherwise."""
        kwargs.setdefault("stop_token_ids", self.eos_token_ids)
        return SamplingParams(**kwargs)


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass token ids")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: run without the chat template")
        messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _eos_ids(hf_model, tokenizer) -> tuple[int, ...]:
    ids = set()
    for source in (getattr(hf_model, "generation_config", None), hf_model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return tuple(sorted(ids))


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to hold: a partial stop string or an incomplete UTF-8 character."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def _with_end(iterator):
    yield from iterator
    yield None


class HFEngine:
    """The baseline: HF `generate` with the same call shape and timings as `Engine` (not a second engine)."""

    def __init__(self, hf_model, tokenizer=None, name: str = "model"):
        self.model, self.tokenizer, self.name = hf_model, tokenizer, name
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        self.eos_token_ids = _eos_ids(hf_model, tokenizer)
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
                if params.stop and _cut_at_stop(text, params.stop) != text:
                    text, reason = _cut_at_stop(text, params.stop), "stop"
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


__all__ = ["Engine", "HFEngine", "Generation", "Step", "TextDelta", "make_engine", "encode_prompt",
           "pick_device"]
