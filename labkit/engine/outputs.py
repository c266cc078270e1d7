"""What the engine hands back: per-step request updates, finished generations, text deltas, a stats snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field


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
class TokenLogprob:
    """A token's log-probability under the model's raw distribution at its position, and the most likely
    alternatives there ((token id, log-probability), best first; as many as the request asked for)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


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
    # one per new token id (and, last, the stop token that ended the request: vLLM's), when asked for
    logprobs: list[TokenLogprob] | None = None
    # every prompt token's (the first None: nothing precedes it), on a request's first output, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None

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
    # the last step as vLLM's --enable-logging-iteration-details splits it: rows of requests with no output yet
    # (their prompt or its last chunk) or recomputing after a preemption, and their tokens; the rest are
    # generation rows, one token each (drafts verified beside it not counted)
    last_num_context_rows: int = 0
    last_num_context_tokens: int = 0
    last_step_s: float = 0.0  # the last step's wall time, scheduling to outputs
    last_num_padding_tokens: int = 0  # of last_num_tokens: a static batch's padding (shorter prompts, finished rows)


__all__ = ["Generation", "RequestOutput", "TokenLogprob", "TextDelta", "EngineStats"]
