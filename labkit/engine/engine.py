"""The labkit engine: requests in, tokens out, one step at a time over a paged KV cache.

`add_request` queues a prompt with its own SamplingParams, `step` runs one forward for whatever the scheduler
picked (prefill chunks and decode rows side by side) and returns what each request gained, `abort` drops a
request. `generate`, `stream` and `stream_text`, the server, the benchmarks and every notebook are loops over
`step()`: the lab's one decode loop. Techniques plug in around it: attention and kernel backends in the model,
rewrites (layout, quantization) over the model before the engine gets it, policies in the scheduler, and a
speculator (`labkit.speculative.speculator`) that gives decode rows draft tokens to verify in the same forward.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from labkit.model.attention import AttentionMetadata, KVCache, build_metadata
from labkit.engine.block_manager import BlockManager
from labkit.device import dtype_name, pick_dtype, synchronize
from labkit.model.llama import (PACKED_MAX_ROWS, Linear, Transformer, from_hf, packed_gemm_available, use_kn_layout,
                          use_packed_gemm)
from labkit.model.sampling import SamplingParams, make_generator, sample
from labkit.engine.scheduler import POLICIES, Scheduler, SchedulerConfig, Sequence as Seq
from labkit.engine.text import IncrementalDetokenizer, cut_at_stop, encode_prompt

ENGINES = ("labkit", "hf")
LINEAR_LAYOUTS = ("auto", "nk", "kn")
GEMMS = ("auto", "packed", "plain")  # how fp32 CPU linears run products of several rows (see use_packed_gemm)
KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's activation dtype; int8: codes + a scale per slot and head
DEFAULT_CPU_KV_CACHE_MB = 512  # pages are zeroed lazily by the OS: unused blocks cost no memory
DEFAULT_GPU_KV_CACHE_FRACTION = 0.4  # of the free memory once the weights are on the device
MIN_STATIC_CONTEXT = 128  # a compiled step attends over at least this many positions (fewer recompiles)


@dataclass
class Generation:
    """One finished sequence and its timings (seconds, from the call's start)."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    ttft_s: float  # from the call's start to the first token (queueing and prefill included)
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
class RequestOutput:
    """What one request gained in one step; the last one for a request carries its finish reason."""

    request_id: str
    new_token_ids: list[int]  # a stop token ends the request without being returned
    text: str  # text now safe to show ("" without a tokenizer, or with detokenize=False)
    finish_reason: str | None  # None while running; "stop" or "length" at the end
    num_prompt_tokens: int
    num_output_tokens: int  # so far
    num_cached_tokens: int  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TextDelta:
    """A piece of streamed text; the last one carries the finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class EngineStats:
    """A snapshot of the engine for /metrics, benchmarks and notebooks."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_used_blocks: int
    num_tokens_in_cache: int  # computed tokens of the running requests (shared prefix blocks counted per use)
    num_preemptions: int
    prefix_hit_rate: float | None
    num_steps: int
    last_batch_size: int  # rows in the last step, padding rows included
    last_num_tokens: int  # new tokens in the last step, padding included
    last_num_padding_rows: int  # rows of the last step that only computed padding (static batching)


@dataclass
class EngineConfig:
    """The engine's cache and scheduler settings; validated on creation (one-line errors naming the value)."""

    policy: str = "continuous"  # see labkit.engine.scheduler
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    max_wait_s: float = 0.05
    enable_chunked_prefill: bool = True
    pad_batches: bool = True
    enable_prefix_caching: bool = True
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_mb
    kv_cache_mb: float | None = None  # None: 512 MiB on CPU, 40 % of free memory on a GPU, at most what fits
    compile: bool = False  # torch.compile the decode-only step (static shapes, bucketed batch sizes)
    cuda_graphs: bool = False  # replay the decode-only step from CUDA graphs, one per bucket (labkit.engine.cuda_graphs)
    kv_cache_dtype: str = "auto"  # see KV_CACHE_DTYPES; int8 fits ~3.8x the blocks of fp32 (head_dim 64)

    def __post_init__(self):
        self.scheduler_config()  # validates the scheduler's fields
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}: choose one of "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if self.num_kv_blocks is not None and (isinstance(self.num_kv_blocks, bool)
                                               or not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks must be an integer >= 1, got {self.num_kv_blocks!r}")
        if self.kv_cache_mb is not None and not (isinstance(self.kv_cache_mb, (int, float))
                                                 and 0 < self.kv_cache_mb < math.inf):
            raise ValueError(f"kv_cache_mb must be a number > 0, got {self.kv_cache_mb!r}")
        for name in ("compile", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(policy=self.policy, max_num_seqs=self.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens, max_wait_s=self.max_wait_s,
                               enable_chunked_prefill=self.enable_chunked_prefill, pad_batches=self.pad_batches)


@dataclass(eq=False)
class _Request:
    """The engine's side of a request: its scheduler state, random stream and text."""

    seq: Seq
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    stop_ids: frozenset[int]


class Engine:
    """Generate with the compact model: `Engine.load()`, `Engine.from_hf(hf_model, tokenizer)`, or
    `Engine(model, tokenizer)` over a Transformer already built and rewritten.
    """

    def __init__(self, model: Transformer, tokenizer=None, *, name: str = "model",
                 eos_token_ids: Sequence[int] = (), config: EngineConfig | None = None, speculator=None,
                 **config_kwargs):
        if config is None:
            config = EngineConfig(**config_kwargs)
        elif config_kwargs:
            raise ValueError("pass an EngineConfig or keyword arguments, not both")
        self.model, self.tokenizer, self.name, self.config = model, tokenizer, name, config
        self.speculator = speculator  # a labkit.speculative.speculator.Speculator, or None: one token per decode row
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = model.embed.weight.device
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {self.device}")
        if config.compile and "triton" in (model.attention, model.kernel_backend):
            raise ValueError("compile=True traces the torch backends only; the triton backends run as they are "
                             "(cuda_graphs=True removes their launch overhead)")
        if config.kv_cache_dtype == "int8" and hasattr(model.core, "paged_attention"):
            raise ValueError(f"kv_cache_dtype='int8' is not supported with attention={model.attention!r}: its kernels "
                             f"read float blocks in place; use attention='sdpa' or 'math'")
        self.dtype = model.embed.weight.dtype  # weight storage
        self.act_dtype = model.act_dtype  # activations (and the KV cache unless kv_cache_dtype says otherwise)
        self.kv_dtype = torch.int8 if config.kv_cache_dtype == "int8" else self.act_dtype
        args = model.args
        per_block = KVCache.bytes_per_block(args.num_layers, config.block_size, model.num_kv_heads, args.head_dim,
                                            self.kv_dtype)
        num_blocks = config.num_kv_blocks or self._default_num_blocks(per_block)
        self.cache = KVCache(args.num_layers, num_blocks, config.block_size, model.num_kv_heads, args.head_dim,
                             self.device, self.kv_dtype)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config(), self.blocks)
        self.compile_s: float | None = None
        self._compiled = None
        self._graphs = None  # labkit.engine.cuda_graphs.DecodeGraphs, made on the first static step
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._num_steps, self._last_rows, self._last_tokens, self._last_padding = 0, 0, 0, 0

    def _default_num_blocks(self, bytes_per_block: int) -> int:
        config = self.config
        needed = config.max_num_seqs * -(-self.max_seq_len // config.block_size)  # every row at full context
        if config.kv_cache_mb is not None:
            budget = config.kv_cache_mb * 2**20
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = DEFAULT_GPU_KV_CACHE_FRACTION * free
        else:
            budget = DEFAULT_CPU_KV_CACHE_MB * 2**20
        return max(1, min(needed, int(budget // bytes_per_block)))

    @classmethod
    def load(cls, name: str = "smollm2-135m-instruct", device="auto", dtype="fp32", dummy: bool = False,
             seed: int = 0, **kwargs) -> "Engine":
        """Load an HF model (see `labkit.model.loader.load_model`) and convert it to the compact model."""
        from labkit.model.loader import load_model

        loaded = load_model(name, device=device, dtype=dtype, dummy=dummy, seed=seed)
        return cls.from_hf(loaded.model, loaded.tokenizer, name=loaded.name, **kwargs)

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, dtype=None, attention: str = "sdpa", kernels: str = "torch",
                linear_layout: str = "auto", quantize: str | None = None, gemm: str = "auto",
                **kwargs) -> "Engine":
        """Build the compact model from an HF one, apply the rewrites in order, and wrap it in an engine."""
        dtype = pick_dtype(dtype) if dtype is not None else None
        model = from_hf(hf_model, dtype=dtype, attention=attention, kernels=kernels)
        model = apply_rewrites(model, linear_layout=linear_layout, quantize=quantize, gemm=gemm)
        return cls(model, tokenizer, eos_token_ids=eos_token_ids_of(hf_model, tokenizer), **kwargs)

    @property
    def max_seq_len(self) -> int:
        return self.model.args.max_seq_len

    @property
    def linear_layout(self) -> str:
        return "kn" if "layout:kn" in self.model.rewrites else "nk"

    @property
    def quantize(self) -> str | None:
        return next((r.split(":", 1)[1] for r in self.model.rewrites if r.startswith("quant:")), None)

    def describe(self) -> dict:
        c = self.config
        return {"engine": "labkit", "model": self.name, "device": str(self.device), "dtype": dtype_name(self.dtype),
                "activation_dtype": dtype_name(self.act_dtype),
                "kv_cache_dtype": "int8" if self.kv_dtype == torch.int8 else dtype_name(self.kv_dtype),
                "attention": self.model.attention,
                "kernels": self.model.kernel_backend, "linear_layout": self.linear_layout, "quantize": self.quantize,
                "rewrites": list(self.model.rewrites), "compile": c.compile, "cuda_graphs": c.cuda_graphs,
                "policy": c.policy,
                "max_num_seqs": c.max_num_seqs, "max_num_batched_tokens": c.max_num_batched_tokens,
                "block_size": c.block_size, "num_kv_blocks": self.blocks.num_blocks,
                "prefix_caching": c.enable_prefix_caching,
                "speculative": self.speculator.describe() if self.speculator is not None else None}

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=self.blocks.num_blocks, num_used_blocks=self.blocks.num_used_blocks,
            num_tokens_in_cache=sum(s.num_computed_tokens for s in self.scheduler.running),
            num_preemptions=self.scheduler.num_preemptions, prefix_hit_rate=self.blocks.prefix_hit_rate,
            num_steps=self._num_steps, last_batch_size=self._last_rows, last_num_tokens=self._last_tokens,
            last_num_padding_rows=self._last_padding)

    # -- the open API ------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
                    arrival_s: float | None = None) -> str:
        """Queue a prompt (token ids) with its own sampling parameters; returns the request id."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        vocab = self.model.args.vocab_size
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token {bad!r} is not a token id in [0, {vocab})")
        total = len(prompt) + params.max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's context of {self.max_seq_len} tokens")
        if self.blocks.blocks_for(total) > self.blocks.num_blocks:
            raise ValueError(f"prompt + max_new_tokens ({total} tokens) needs {self.blocks.blocks_for(total)} KV "
                             f"blocks, but the cache has {self.blocks.num_blocks}: raise kv_cache_mb or num_kv_blocks")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Seq(request_id, prompt, params, self.scheduler.clock() if arrival_s is None else arrival_s)
        detok = None
        if self.tokenizer is not None and (params.detokenize or params.stop):
            detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        stop_ids = frozenset() if params.ignore_eos else frozenset(params.stop_token_ids)
        self._requests[request_id] = _Request(seq, make_generator(params, self.device), detok, stop_ids)
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False when it is unknown or already finished."""
        request = self._requests.pop(str(request_id), None)
        if request is None:
            return False
        self.scheduler.finish(request.seq, "abort")
        if self.speculator is not None:
            self.speculator.release(request.seq.request_id)
        return True

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def queued_request_ids(self) -> list[str]:
        """Requests waiting for their first step (preempted ones were admitted once and are not listed)."""
        return [seq.request_id for seq in self.scheduler.waiting
                if seq.first_scheduled_s is None and not seq.num_output_tokens]

    def running_request_ids(self) -> list[str]:
        """Requests that hold KV blocks and run in the next step."""
        return [seq.request_id for seq in self.scheduler.running]

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return an update for every request that got a token or finished."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        spec = self.speculator
        drafts = spec.propose(batch, self) if spec is not None else {}  # request id -> draft tokens to verify
        width = {s.request_id: n + len(drafts[s.request_id].tokens) if s.request_id in drafts else n
                 for s, n in zip(batch.seqs, batch.num_new_tokens)}
        # multi-token rows first, then by context length: attention groups rows of similar shapes
        rows = sorted(zip(batch.seqs, batch.num_new_tokens),
                      key=lambda r: (-width[r[0].request_id], r[0].num_computed_tokens))
        spans = [(s.request_id, s.token_ids + drafts[s.request_id].tokens if s.request_id in drafts else s.token_ids,
                  s.num_computed_tokens, s.num_computed_tokens + width[s.request_id]) for s, _ in rows]
        sampling = [i for i, (s, n) in enumerate(rows) if s.num_computed_tokens + n == s.num_tokens]  # at last token
        padding = sorted(batch.prompt_padding, reverse=True) + [1] * batch.padding_rows  # into scratch slots
        spans += [(None, [0] * n, 0, n) for n in padding]
        requests = [self._requests[rows[i][0].request_id] for i in sampling]
        tokens: list[list[int]] = []
        with torch.inference_mode():
            if spec is None:
                logits = self._forward(spans, sampling)
                if requests:
                    out = sample(logits, [r.seq.params for r in requests], [r.generator for r in requests])
                    tokens = [[t] for t in out.tokens.tolist()]  # the one host sync per step
            else:  # each drafted row gets logits at its last token and at every draft token
                row_drafts = [drafts.get(r.seq.request_id) for r in requests]
                logits, hidden = self._forward(spans, sampling, [1 + len(d.tokens) if d else 1 for d in row_drafts],
                                               return_hidden=spec.needs_hidden)
                tokens = spec.verify(logits, [r.seq for r in requests], row_drafts, [r.generator for r in requests])
                if hidden is not None:  # the target's features at the tokens it kept, for feature-level drafts
                    spec.observe(spans, hidden)
        num_accepted = {r.seq.request_id: len(t) - 1 for r, t in zip(requests, tokens)}
        for seq, n in rows:
            if seq.request_id in drafts:  # the rejected draft tokens' cache slots are given back
                seq.num_computed_tokens += n + num_accepted[seq.request_id]
                self.blocks.truncate(seq.request_id, seq.num_computed_tokens)
                continue  # their blocks are registered for prefix caching once the accepted tokens are appended
            seq.num_computed_tokens += n
            self.blocks.cache_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)
        self._num_steps += 1
        self._last_padding = batch.padding_rows
        self._last_rows, self._last_tokens = len(rows) + batch.padding_rows, batch.num_tokens + sum(padding)
        outputs = [self._append_tokens(request, new) for request, new in zip(requests, tokens)]
        for request in requests:
            seq = request.seq
            if seq.request_id in drafts and seq.request_id in self.blocks:  # still running
                self.blocks.cache_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)
        return outputs

    def _append_tokens(self, request: _Request, tokens: list[int]) -> RequestOutput:
        """Add a row's new tokens (one, or accepted draft tokens and one more) up to where the request ends."""
        out = self._append(request, tokens[0])
        for token in tokens[1:]:
            if out.finished:
                break
            more = self._append(request, token)
            out = RequestOutput(more.request_id, out.new_token_ids + more.new_token_ids, out.text + more.text,
                                more.finish_reason, more.num_prompt_tokens, more.num_output_tokens,
                                more.num_cached_tokens)
        return out

    def _append(self, request: _Request, token: int) -> RequestOutput:
        """Add a sampled token to its request; finish the request on a stop token, stop string or length."""
        seq, detok = request.seq, request.detokenizer
        reason, new, text = None, [], ""
        if token in request.stop_ids:
            reason = "stop"  # the stop token itself is not output
        else:
            seq.token_ids.append(token)
            new = [token]
            if detok is not None:
                text = detok.add(token)
                if detok.stopped:
                    reason = "stop"
            if reason is None and seq.num_output_tokens >= seq.params.max_new_tokens:
                reason = "length"
        if reason is not None:
            if detok is not None and not detok.stopped:
                text += detok.flush()
            self.scheduler.finish(seq, reason)
            del self._requests[seq.request_id]
            if self.speculator is not None:
                self.speculator.release(seq.request_id)
        return RequestOutput(seq.request_id, new, text, reason, seq.num_prompt_tokens, seq.num_output_tokens,
                             seq.num_cached_tokens)

    # -- the model runner --------------------------------------------------------------------------------------
    def _forward(self, spans: list[tuple], sampling: list[int], num_logits: list[int] | None = None,
                 return_hidden: bool = False, embeds: torch.Tensor | None = None):
        """One forward over rows (key, token ids, start, end): tokens [start, end) of each are computed and
        cached; returns logits [len(sampling), V] at the last token of the rows listed in `sampling`.

        num_logits[i]: logits at the last num_logits[i] tokens of row sampling[i] instead (a speculative row
        verifying its drafts), stacked row after row. return_hidden: also return the hidden states [N, dim] of
        every computed token. With either, returns (logits, hidden or None). embeds [N, dim]: the model's input
        in place of the tokens' embeddings (a draft head's own input; see `Transformer.forward`).
        """
        bs = self.config.block_size
        if (self.config.compile or self.config.cuda_graphs) and not return_hidden and embeds is None \
                and all(end - start == 1 for _, _, start, end in spans) and self._static_pays(len(spans)):
            logits = self._forward_static(spans)[sampling]
            return (logits, None) if num_logits is not None else logits
        tokens, slots, query_lens, context_lens, tables = [], [], [], [], []
        for key, ids, start, end in spans:
            table = self._table(key, end)
            tokens.extend(ids[start:end])
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(end - start)
            context_lens.append(end)
            tables.append(table)
        meta = build_metadata(query_lens, context_lens, tables, slots, bs, self.device)
        hidden = self.model(torch.tensor(tokens, device=self.device), meta, self.cache,
                            **({} if embeds is None else {"embeds": embeds}))
        last = list(itertools.accumulate(query_lens))
        counts = num_logits or [1] * len(sampling)
        index = torch.tensor([p for i, c in zip(sampling, counts) for p in range(last[i] - c, last[i])],
                             dtype=torch.long, device=self.device)  # may be empty
        logits = self.model.logits(hidden, index)
        if num_logits is None and not return_hidden:
            return logits
        return logits, hidden if return_hidden else None

    def _static_pays(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows runs faster static (compiled or from CUDA graphs) than eager.
        Always, but for a compiled CPU step over a model with oneDNN-packed weights (`use_packed_gemm`) at 2 to
        PACKED_MAX_ROWS rows: inductor cannot lower the packed linear, so the compiled step runs MKL's GEMM, and
        there the eager packed step measured 2.1x faster at 4 rows (compile saves ~4 ms a step, the GEMM ~50)."""
        return self.config.cuda_graphs or not 1 < rows <= PACKED_MAX_ROWS or "gemm:packed" not in self.model.rewrites

    def _forward_static(self, spans: list[tuple]) -> torch.Tensor:
        """A decode-only step with static shapes (compiled, or replayed from a CUDA graph): rows and block tables
        padded to bucketed sizes, every input in one [rows, 4 + width] tensor (one host-to-device copy)."""
        bs, B = self.config.block_size, len(spans)
        rows = 1 << (B - 1).bit_length()
        tables = [self._table(key, end) for key, _, _, end in spans]
        width = max(MIN_STATIC_CONTEXT // bs, 1 << (max(len(t) for t in tables) - 1).bit_length())
        inputs = []
        for (_, ids, start, _), table in zip(spans, tables):  # token, position, slot, context length, table
            inputs.append([ids[start], start, table[start // bs] * bs + start % bs, start + 1,
                           *table, *[0] * (width - len(table))])
        inputs += [[0, 0, self.cache.scratch_slot, 1, *[0] * width]] * (rows - B)  # padding rows: scratch only
        return self._decode_step()(torch.tensor(inputs, dtype=torch.long, device=self.device), self.cache)

    def _table(self, key, num_tokens: int) -> list[int]:
        """A row's block table; a padding row (key None) reads and writes only the scratch block."""
        if key is None:
            return [self.cache.num_blocks] * self.blocks.blocks_for(num_tokens)
        return self.blocks.block_table(key)

    def _static_step(self, inputs: torch.Tensor, cache) -> torch.Tensor:
        """inputs [rows, 4 + width] (token, position, slot, context length, block table) -> logits [rows, V]."""
        meta = AttentionMetadata(positions=inputs[:, 1], slot_mapping=inputs[:, 2], block_tables=inputs[:, 4:],
                                 context_lens=inputs[:, 3], query_start=None, block_size=self.config.block_size)
        return self.model.logits(self.model(inputs[:, 0], meta, cache))

    def _decode_step(self):
        """The static step: compiled when config.compile, replayed from CUDA graphs when config.cuda_graphs."""
        if self._compiled is None:
            step = self._static_step
            if self.config.compile:
                # only the hot decode step is compiled (gpt-fast); prefill stays eager. Module guards stay on:
                # every engine shares _static_step's code object, so dropping them would let one run another's graph.
                step = torch.compile(step, fullgraph=True, dynamic=False)
            if self.config.cuda_graphs:
                from labkit.engine.cuda_graphs import DecodeGraphs

                self._graphs = DecodeGraphs(step)
                step = self._graphs
            self._compiled = step
        return self._compiled

    @property
    def capture_s(self) -> float | None:
        """Seconds spent capturing CUDA graphs so far (None without cuda_graphs); never inside tokens/s."""
        return self._graphs.capture_s if self._graphs is not None else (0.0 if self.config.cuda_graphs else None)

    def prompt_logits(self, token_ids: Sequence[int], chunk_size: int | None = None) -> torch.Tensor:
        """Logits [T, V] at every position of a prompt, prefilled in chunks of chunk_size (all at once when
        None) through the paged cache; nothing stays cached. For parity tests and perplexity."""
        ids = list(token_ids)
        if not ids or len(ids) > self.max_seq_len:
            raise ValueError(f"a prompt needs 1 to {self.max_seq_len} tokens, got {len(ids)}")
        key = object()
        if not self.blocks.allocate(key, ids, [], len(ids)):
            raise ValueError(f"{len(ids)} tokens do not fit the free KV blocks ({self.blocks.num_free_blocks})")
        chunk = chunk_size or len(ids)
        try:
            with torch.inference_mode():
                out = []
                for start in range(0, len(ids), chunk):
                    end = min(start + chunk, len(ids))
                    meta = build_metadata([end - start], [end], [self.blocks.block_table(key)],
                                          [self._slot(key, p) for p in range(start, end)], self.config.block_size,
                                          self.device)
                    hidden = self.model(torch.tensor(ids[start:end], device=self.device), meta, self.cache)
                    out.append(self.model.logits(hidden))
                return torch.cat(out)
        finally:
            self.blocks.free(key)

    def _slot(self, key, position: int) -> int:
        bs = self.config.block_size
        return self.blocks.block_table(key)[position // bs] * bs + position % bs

    def warmup(self, batch_size: int = 1, seq_len: int = 64) -> float:
        """Generate a few tokens through the real loop (compiling the decode step, capturing its CUDA graph, when
        asked); return seconds. With compile or cuda_graphs, this prepares the bucket of batch_size rows and
        contexts up to seq_len tokens; `compile_s` is this time less `capture_s`, the capture's own."""
        prompt = [0] * max(1, min(seq_len, self.max_seq_len) - 3)
        params = SamplingParams(max_new_tokens=3, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        self.generate([prompt] * batch_size, params)
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        if self.config.compile and self.compile_s is None:
            self.compile_s = elapsed - (self.capture_s or 0.0)
        return elapsed

    # -- loops over step() -------------------------------------------------------------------------------------
    def _check_idle(self) -> None:
        if self._requests:
            raise RuntimeError(f"the engine is serving {len(self._requests)} requests added with add_request(): "
                               f"drive them with step(), or use another engine")

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Generation]:
        """Generate for a list of token-id prompts (ragged lengths allowed; one SamplingParams or one each)."""
        self._check_idle()
        per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_row) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need {len(prompts)} SamplingParams, got {len(per_row)}")
        start = time.perf_counter()
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per_row)]
        got = {rid: ([], [], [], None) for rid in ids}  # tokens, times, text pieces, finish reason
        try:
            while self._requests:
                outputs = self.step()
                now = time.perf_counter() - start
                for out in outputs:
                    tokens, times, text, _ = got[out.request_id]
                    tokens.extend(out.new_token_ids)
                    times.extend([now] * len(out.new_token_ids))
                    text.append(out.text)
                    if out.finished:
                        got[out.request_id] = (tokens, times, text, out.finish_reason)
        finally:
            for rid in list(self._requests):
                self.abort(rid)
        results = []
        for rid, prompt, sp in zip(ids, prompts, per_row):
            tokens, times, text, reason = got[rid]
            has_text = self.tokenizer is not None and (sp.detokenize or sp.stop)
            results.append(Generation(prompt_tokens=list(prompt), tokens=tokens,
                                      text="".join(text) if has_text else None, finish_reason=reason,
                                      ttft_s=times[0] if times else time.perf_counter() - start,
                                      token_times_s=times))
        return results

    def _outputs(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Step one request to its end, yielding its updates; closing the iterator aborts it."""
        self._check_idle()
        rid = self.add_request(prompt, params)
        try:
            while rid in self._requests:
                yield from self.step()
        finally:
            self.abort(rid)

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yield token ids of one prompt as they are generated; closing the iterator stops generation."""
        for out in self._outputs(prompt, params):
            yield from out.new_token_ids

    def stream_text(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[TextDelta]:
        """Yield text deltas; text that could still become a stop string or a split character is held back."""
        if self.tokenizer is None:
            raise ValueError("stream_text needs a tokenizer")
        for out in self._outputs(prompt, params):
            if out.text or out.new_token_ids or out.finished:
                yield TextDelta(out.text, out.new_token_ids, out.finish_reason)

    # -- text helpers ------------------------------------------------------------------------------------------
    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt, through the model's chat template when chat=True."""
        return encode_prompt(self.tokenizer, text, chat)

    def sampling_params(self, **kwargs) -> SamplingParams:
        """SamplingParams that stop at this model's EOS tokens unless told otherwise."""
        kwargs.setdefault("stop_token_ids", self.eos_token_ids)
        return SamplingParams(**kwargs)


def apply_rewrites(model: Transformer, linear_layout: str = "auto", quantize: str | None = None,
                   gemm: str = "auto") -> Transformer:
    """Apply the model rewrites in order: quantization, or else the weight layout ("auto" picks [in, out] for
    fp32 weights on a CPU, where it measured faster, and [out, in] elsewhere) and then the GEMM of few-row
    products ("auto": oneDNN's prepacked copy of fp32 CPU weights where torch has it and the copy fits in half
    the free memory, which halves the linear time of batched decode; "plain": MKL only)."""
    if linear_layout not in LINEAR_LAYOUTS:
        raise ValueError(f"unknown linear layout {linear_layout!r}: choose auto, nk ([out, in]) or kn ([in, out])")
    if gemm not in GEMMS:
        raise ValueError(f"unknown gemm {gemm!r}: choose {', '.join(GEMMS)}")
    if quantize:
        from labkit.model.quantize import quantize as quantize_model

        return quantize_model(model, quantize)
    weight = model.embed.weight
    fp32_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32
    if linear_layout == "kn" or (linear_layout == "auto" and fp32_cpu):
        model = use_kn_layout(model)
    if gemm == "packed" or (gemm == "auto" and fp32_cpu and packed_gemm_available() and _packed_copy_fits(model)):
        model = use_packed_gemm(model)
    return model


def _packed_copy_fits(model: Transformer) -> bool:
    """Whether a second copy of the fp32 linear weights takes at most half of the memory available now."""
    try:
        import psutil
    except ImportError:  # (the GPU machine's bare python) without it, do not risk the copy
        return False
    size = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, Linear))
    return size <= psutil.virtual_memory().available // 2


def eos_token_ids_of(hf_model, tokenizer) -> tuple[int, ...]:
    """The stop tokens of an HF model: its generation config's, its config's and its tokenizer's EOS ids."""
    ids = set()
    for source in (getattr(hf_model, "generation_config", None), hf_model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return tuple(sorted(ids))


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


__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "HFEngine", "Generation", "TextDelta",
           "apply_rewrites", "eos_token_ids_of", "GEMMS", "make_engine", "encode_prompt", "ENGINES", "POLICIES",
           "KV_CACHE_DTYPES"]
