"""The labkit engine: requests in, tokens out, one step at a time over a paged KV cache.

`add_request` queues a prompt with its own SamplingParams, `step` runs one forward for whatever the scheduler
picked (prefill chunks and decode rows side by side) and returns what each request gained, `abort` drops a
request. `generate`, `stream` and `stream_text`, the server, the benchmarks and every notebook are loops over
`step()`: the lab's one decode loop. Techniques plug in around it: attention and kernel backends in the model,
rewrites (layout, quantization) over the model before the engine gets it, policies in the scheduler, and a
speculator (`labkit.engine.spec_decode.speculator`) that gives decode rows draft tokens to verify in the same
forward. The model runs through `labkit.engine.model_runner.ModelRunner`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from labkit.device import dtype_name, pick_dtype, synchronize
from labkit.engine.build import build_model, resolve_config
from labkit.engine.combinations import check_engine
from labkit.engine.config import KV_CACHE_DTYPES, EngineConfig
from labkit.engine.model_runner import ModelRunner, RowSpan
from labkit.engine.outputs import EngineStats, Generation, RequestOutput, TextDelta, TokenLogprob
from labkit.engine.scheduler import POLICIES, ScheduledBatch, Scheduler, SchedulerConfig, Sequence as Seq
from labkit.engine.spec_decode.build import build_speculator
from labkit.engine.text import IncrementalDetokenizer, encode_prompt
from labkit.model.llama import Transformer
from labkit.model.loader import eos_token_ids_of
from labkit.model.sampling import SamplingParams, make_generator, sample, token_logprobs


@dataclass(eq=False)
class _Request:
    """The engine's side of a request: its scheduler state, random stream and text."""

    seq: Seq
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    stop_ids: frozenset[int]
    prompt_logprobs: list | None = None  # sent with the request's first output, then dropped


@dataclass
class _StepRows:
    """One step's forward laid out: the rows (requests', then padding), which of them sample, and for those
    their requests and drafts."""

    rows: list[RowSpan]
    sample_rows: list[int]
    requests: list[_Request]
    drafts: list  # per sampled request: its Draft (labkit.engine.spec_decode.speculator) or None
    num_padding_tokens: int
    context: tuple[int, int]  # rows of prompts (no output yet) or recomputes (preempted), and their tokens


class Engine:
    """Generate with the compact model: `Engine.load()`, `Engine.from_hf(hf_model, tokenizer)`, or
    `Engine(model, tokenizer)` over a Transformer already built and rewritten. Keyword arguments build the
    EngineConfig (`EngineConfig.from_kwargs`: SchedulerConfig's fields included).
    """

    def __init__(self, model: Transformer, tokenizer=None, *, name: str = "model",
                 eos_token_ids: Sequence[int] = (), config: EngineConfig | None = None, speculator=None,
                 **config_kwargs):
        if config is None:
            config = EngineConfig.from_kwargs(**config_kwargs)
        elif config_kwargs:
            raise ValueError("pass an EngineConfig or keyword arguments, not both")
        if speculator is not None and config.speculative is not None:
            raise ValueError("pass a speculator or config.speculative, not both")
        self.model, self.tokenizer, self.name, self.config = model, tokenizer, name, config
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = model.embed.weight.device
        check_engine(model, config, self.device)  # combinations of the built model and config that cannot work
        # a labkit.engine.spec_decode Speculator (given, or built from config.speculative), or None: one token per
        # decode row
        self.speculator = speculator if speculator is not None else build_speculator(config, model)
        self.dtype = model.embed.weight.dtype  # weight storage
        self.act_dtype = model.act_dtype  # activations (and the KV cache unless kv_cache_dtype says otherwise)
        self.runner = ModelRunner(model, config)
        self.kv_dtype, self.cache, self.blocks = self.runner.kv_dtype, self.runner.cache, self.runner.blocks
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.compile_s: float | None = None
        self._requests: dict[str, _Request] = {}
        self._prompt_only: list[_Request] = []  # max_new_tokens=0: scored at add_request, answered at the next step
        self._ids = itertools.count()
        self._num_steps, self._last_rows, self._last_tokens, self._last_padding = 0, 0, 0, 0
        self._last_context, self._last_padding_tokens = (0, 0), 0  # (rows, tokens) of prompts; padding tokens
        self._last_step_s = 0.0

    @classmethod
    def load(cls, name: str | None = None, device=None, dtype=None, dummy: bool | None = None,
             seed: int | None = None, *, config: EngineConfig | None = None, speculator=None,
             **kwargs) -> "Engine":
        """Load a model (see `labkit.model.loader.load_model`) as config.model says, build the compact model with
        its rewrites, and wrap it in an engine with the config's cache, compile, scheduler and speculator.

        `Engine.load(config=EngineConfig(...))`, or `Engine.load("tiny-smollm2", dummy=True, max_num_seqs=4,
        quantization="int8")`: arguments given set the config's model fields; keywords build the config
        (`EngineConfig.from_kwargs`)."""
        from labkit.model.loader import load_model

        config = resolve_config(config, kwargs, model=name, device=device, dtype=dtype, dummy=dummy, seed=seed)
        m = config.model
        loaded = load_model(m.model, device=m.device, dtype=m.dtype, dummy=m.dummy, seed=m.seed)
        return cls(build_model(loaded.model, m), loaded.tokenizer, name=loaded.name,
                   eos_token_ids=eos_token_ids_of(loaded.model, loaded.tokenizer), config=config,
                   speculator=speculator)

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, dtype=None, attention: str | None = None, kernels: str | None = None,
                linear_layout: str | None = None, quantize: str | None = None, gemm: str | None = None, *,
                config: EngineConfig | None = None, name: str = "model", speculator=None, **kwargs) -> "Engine":
        """Build the compact model from an HF one, apply the rewrites in order, and wrap it in an engine.

        dtype: convert the weights (None: keep the HF model's); the backend and rewrite arguments given set the
        config's model fields (None: the config's, by default sdpa, torch, auto layout, no quantization)."""
        config = resolve_config(config, kwargs, attention=attention, kernels=kernels, linear_layout=linear_layout,
                                quantization=quantize, gemm=gemm)
        device = next(hf_model.parameters()).device
        model = build_model(hf_model, config.model, pick_dtype(dtype, device) if dtype is not None else None)
        config = resolve_config(config, {}, dtype=model.embed.weight.dtype)  # what the weights are, as built
        return cls(model, tokenizer, name=name, eos_token_ids=eos_token_ids_of(hf_model, tokenizer), config=config,
                   speculator=speculator)

    @property
    def max_seq_len(self) -> int:
        """The longest prompt + output: the model's context, or config.model.max_model_len when shorter."""
        return self.config.model.max_model_len or self.model.args.max_seq_len

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
                "policy": c.scheduler.policy, "max_num_seqs": c.scheduler.max_num_seqs,
                "max_num_batched_tokens": c.scheduler.max_num_batched_tokens,
                "block_size": c.block_size, "num_kv_blocks": self.blocks.num_blocks,
                "prefix_caching": c.enable_prefix_caching,
                "speculative": self.speculator.describe() if self.speculator is not None else None}

    def techniques(self) -> dict[str, str]:
        """Which techniques run, as short labels (the server's start-up line and its /metrics info metric)."""
        c, s = self.config, self.config.scheduler
        spec = "none" if self.speculator is None else (
            c.speculative.describe() if c.speculative is not None else self.speculator.proposer.name)
        step = [name for name, on in (("compiled", c.compile), ("cuda_graphs", c.cuda_graphs)) if on]
        chunked = s.policy == "continuous" and s.enable_chunked_prefill
        return {"dtype": dtype_name(self.dtype), "quantization": self.quantize or "none",
                "kv_cache_dtype": self.describe()["kv_cache_dtype"], "speculative": spec,
                "prefix_caching": "on" if c.enable_prefix_caching else "off",
                "chunked_prefill": f"{s.max_num_batched_tokens} tokens a step" if chunked else "off",
                "batching": f"{s.policy} up to {s.max_num_seqs}", "decode_step": "+".join(step) or "eager",
                "backends": f"{self.model.attention} attention, {self.model.kernel_backend} kernels",
                "rewrites": " ".join(self.model.rewrites) or "none",
                "tensor_parallel_size": str(c.parallel.tensor_parallel_size)}

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.active_seqs()), num_waiting=len(self.scheduler.queued_seqs()),
            num_kv_blocks=self.blocks.num_blocks, num_used_blocks=self.blocks.num_used_blocks,
            num_tokens_in_cache=sum(s.num_computed_tokens for s in self.scheduler.active_seqs()),
            num_preemptions=self.scheduler.num_preemptions, prefix_hit_rate=self.blocks.prefix_hit_rate,
            num_steps=self._num_steps, last_batch_size=self._last_rows, last_num_tokens=self._last_tokens,
            last_num_padding_rows=self._last_padding, last_num_context_rows=self._last_context[0],
            last_num_context_tokens=self._last_context[1], last_step_s=self._last_step_s,
            last_num_padding_tokens=self._last_padding_tokens)

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
        self._check_vocab(params)
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
        request = _Request(seq, make_generator(params, self.device), detok, stop_ids)
        if params.prompt_logprobs is not None:  # one forward over the prompt, outside the batch
            request.prompt_logprobs = self._prompt_logprobs(prompt, params.prompt_logprobs)
        self._requests[request_id] = request
        if params.max_new_tokens == 0:
            self._prompt_only.append(request)
        else:
            self.scheduler.add(seq)
        return request_id

    def _check_vocab(self, params: SamplingParams) -> None:
        vocab = self.model.args.vocab_size
        bad = next((t for t in params.logit_bias or () if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token {bad} is not a token id in [0, {vocab})")

    def _prompt_logprobs(self, prompt: list[int], num_top: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability after the tokens before it (the first: None), from one forward."""
        logits = self.prompt_logits(prompt)[:-1]  # [T - 1, V]: position t predicts token t + 1
        pairs = token_logprobs(logits, prompt[1:], num_top) if len(prompt) > 1 else []
        return [None] + [TokenLogprob(t, lp, top) for t, (lp, top) in zip(prompt[1:], pairs)]

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False when it is unknown or already finished."""
        request = self._requests.pop(str(request_id), None)
        if request is None:
            return False
        if request in self._prompt_only:  # never scheduled
            self._prompt_only.remove(request)
            return True
        self.scheduler.finish(request.seq, "abort")
        if self.speculator is not None:
            self.speculator.release(request.seq.request_id)
        return True

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    @property
    def has_unfinished(self) -> bool:
        return self.num_unfinished > 0

    def request_generator(self, request_id: str) -> torch.Generator | None:
        """The random stream a running request samples from (None: the global one), for drafts that sample."""
        return self._requests[request_id].generator

    def queued_request_ids(self) -> list[str]:
        """Requests waiting for their first step (preempted ones were admitted once and are not listed)."""
        return [seq.request_id for seq in self.scheduler.queued_seqs()
                if seq.first_scheduled_s is None and not seq.num_output_tokens]

    def running_request_ids(self) -> list[str]:
        """Requests that hold KV blocks and run in the next step."""
        return [seq.request_id for seq in self.scheduler.active_seqs()]

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return an update for every request that got a token or finished."""
        scored = [self._finish_prompt_only(r) for r in self._prompt_only]
        self._prompt_only.clear()
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:
            return scored
        drafts = self.speculator.propose(batch, self) if self.speculator is not None else {}  # id -> Draft
        step = self._lay_out(batch, drafts)
        with torch.inference_mode():
            tokens, logprobs = self._run(step)
        num_accepted = {r.seq.request_id: len(t) - 1 for r, t in zip(step.requests, tokens)
                        if r.seq.request_id in drafts}
        self.scheduler.update_from_output(batch, num_accepted)
        self._record_step(batch, step)
        outputs = [self._append_tokens(*row) for row in zip(step.requests, tokens, logprobs)]
        self.scheduler.cache_blocks([seq for seq in batch.seqs if seq.request_id in drafts])
        self._last_step_s = time.perf_counter() - started
        return scored + outputs

    def _finish_prompt_only(self, request: _Request) -> RequestOutput:
        """A request for no new tokens (its prompt scored at add_request) ends at once, at "length"."""
        seq = request.seq  # never scheduled: it holds no blocks
        del self._requests[seq.request_id]
        return RequestOutput(seq.request_id, [], "", "length", seq.num_prompt_tokens, 0, 0, logprobs=[],
                             prompt_logprobs=request.prompt_logprobs)

    def _lay_out(self, batch: ScheduledBatch, drafts: dict) -> _StepRows:
        """The step's rows: multi-token rows first, then by context length (attention groups rows of similar
        shapes; the batch is reordered to match), each drafted row extended by its drafts, padding rows last."""
        width = {s.request_id: n + len(drafts[s.request_id].tokens) if s.request_id in drafts else n
                 for s, n in zip(batch.seqs, batch.num_new_tokens)}
        order = sorted(zip(batch.seqs, batch.num_new_tokens),
                       key=lambda r: (-width[r[0].request_id], r[0].num_computed_tokens))
        batch.seqs, batch.num_new_tokens = [s for s, _ in order], [n for _, n in order]
        rows = [RowSpan(s.request_id, s.token_ids + drafts[s.request_id].tokens if s.request_id in drafts
                        else s.token_ids, s.num_computed_tokens, width[s.request_id]) for s in batch.seqs]
        sample_rows = [i for i, (s, n) in enumerate(order) if s.num_computed_tokens + n == s.num_tokens]  # at last
        padding = sorted(batch.prompt_padding, reverse=True) + [1] * batch.padding_rows  # into scratch slots
        rows += [RowSpan(None, [0] * n, 0, n) for n in padding]
        requests = [self._requests[order[i][0].request_id] for i in sample_rows]
        context = [n for s, n in order if not s.num_output_tokens or s.num_computed_tokens < s.num_tokens - 1]
        return _StepRows(rows, sample_rows, requests, [drafts.get(r.seq.request_id) for r in requests], sum(padding),
                         (len(context), sum(context)))

    def _run(self, step: _StepRows) -> tuple[list[list[int]], list]:
        """The forward, then each sampled row's new tokens (one sampled token, or what verification keeps) and,
        for requests that ask for them, those tokens' log-probabilities."""
        spec, requests = self.speculator, step.requests
        generators = [r.generator for r in requests]
        if spec is None:
            logits = self.runner.forward(step.rows, step.sample_rows).logits
            if not requests:
                return [], []
            out = sample(logits, [r.seq.params for r in requests], generators)
            tokens = [[t] for t in out.tokens.tolist()]  # the one host sync per step
            return tokens, self._logprobs(requests, logits, tokens, [1] * len(requests))
        # each drafted row gets logits at its last token and at every draft token
        sizes = [1 + len(d.tokens) if d else 1 for d in step.drafts]
        out = self.runner.forward(step.rows, step.sample_rows, sizes, return_hidden=spec.needs_hidden)
        tokens = spec.verify(out.logits, [r.seq for r in requests], step.drafts, generators)
        if out.hidden is not None:  # the target's features at the tokens it kept, for feature-level drafts
            spec.observe(step.rows, out.hidden)
        return tokens, self._logprobs(requests, out.logits, tokens, sizes)

    @staticmethod
    def _logprobs(requests: list[_Request], logits: torch.Tensor, tokens: list[list[int]],
                  sizes: list[int]) -> list[list[TokenLogprob] | None]:
        """Per sampled row, its new tokens' log-probabilities (None unless its request asked): logits [sum(sizes),
        V] hold each row's `size` positions in turn; new token j was drawn at position j of its row (a verified
        row keeps draft tokens, then one more; its logits are the target's)."""
        found, offset = [], 0
        for request, new, size in zip(requests, tokens, sizes):
            num_top = request.seq.params.logprobs
            if num_top is None:
                found.append(None)
            else:
                pairs = token_logprobs(logits[offset:offset + len(new)], new, num_top)
                found.append([TokenLogprob(t, lp, top) for t, (lp, top) in zip(new, pairs)])
            offset += size
        return found

    def _record_step(self, batch: ScheduledBatch, step: _StepRows) -> None:
        self._num_steps += 1
        self._last_padding = batch.padding_rows
        self._last_rows = len(batch.seqs) + batch.padding_rows
        self._last_tokens = batch.num_tokens + step.num_padding_tokens
        self._last_context, self._last_padding_tokens = step.context, step.num_padding_tokens

    def _append_tokens(self, request: _Request, tokens: list[int],
                       logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        """Add a row's new tokens (one, or accepted draft tokens and one more) up to where the request ends."""
        prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None
        out, num_used = self._append(request, tokens[0]), 1
        for token in tokens[1:]:
            if out.finished:
                break
            more, num_used = self._append(request, token), num_used + 1
            out = RequestOutput(more.request_id, out.new_token_ids + more.new_token_ids, out.text + more.text,
                                more.finish_reason, more.num_prompt_tokens, more.num_output_tokens,
                                more.num_cached_tokens)
        if logprobs is not None:  # a stop token that ended the request is not output, but keeps its logprob (vLLM's)
            out.logprobs = logprobs[:num_used]
        out.prompt_logprobs = prompt_logprobs
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

    @property
    def capture_s(self) -> float | None:
        """Seconds spent capturing CUDA graphs so far (None without cuda_graphs); never inside tokens/s."""
        return self.runner.capture_s

    def prompt_logits(self, token_ids: Sequence[int], chunk_size: int | None = None) -> torch.Tensor:
        """Logits [T, V] at every position of a prompt, prefilled in chunks of chunk_size (all at once when
        None) through the paged cache; nothing stays cached. For parity tests and perplexity."""
        return self.runner.prompt_logits(token_ids, chunk_size)

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


__all__ = ["Engine", "EngineConfig", "SchedulerConfig", "EngineStats", "RequestOutput", "Generation", "TextDelta",
           "encode_prompt", "POLICIES", "KV_CACHE_DTYPES"]
