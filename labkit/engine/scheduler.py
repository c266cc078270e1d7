"""Which requests run in each step, in plain Python: static, dynamic and continuous batching.

- static: request-level batching, as HF `generate` on a list of prompts and FasterTransformer do: a batch is
  taken from the head of the queue when the engine is idle and runs until its slowest request finishes;
  requests that arrive meanwhile wait. With `pad_batches` (the default) the batch is computed as those
  systems compute it: prompts padded to the longest one, and a finished request's row keeps computing padding
  until the batch ends. Without it, finished rows drop out and only the idle slots are lost.
- dynamic: like static, but an idle engine waits until `max_num_seqs` requests are queued or the oldest has
  waited `max_wait_s` (Triton Inference Server's and TF Serving's batcher).
- continuous: iteration-level scheduling (Yu et al. 2022, "Orca"; vLLM): requests join and leave at every
  step. Each step has a token budget: running requests go first, in arrival order, and long prompts are
  prefilled in chunks of what the budget leaves, so decode rows keep moving. When the KV cache runs out, the
  newest running request is preempted: its blocks are freed and it is recomputed later (Kwon et al. 2023).
Every policy admits requests first come, first served; a preempted request goes back to the head of the
queue. Like nano-vllm's scheduler.py, nothing here touches a tensor, so it is tested without a model.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from labkit.checks import check_choice, check_ints, check_positive
from labkit.engine.block_manager import BlockManager
from labkit.model.sampling import SamplingParams

POLICIES = ("continuous", "static", "dynamic")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress. Tokens [0, num_computed_tokens) have their K/V in the cache."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_s: float
    token_ids: list[int] = field(default_factory=list)  # the prompt, then the output
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    num_preemptions: int = 0
    first_scheduled_s: float | None = None

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class SchedulerConfig:
    """Batching policy and limits; validated on creation (one-line errors naming the value)."""

    policy: str = "continuous"
    max_num_seqs: int = 128  # rows in a step: a step's cost grows far slower than its rows (vLLM's CPU default)
    max_num_batched_tokens: int = 2048  # new tokens a step: 128/2048 out-ran 64/1024 and 16/256 (64x64/64, bf16)
    max_wait_s: float = 0.05  # dynamic: start a smaller batch once the oldest request waited this long
    enable_chunked_prefill: bool = True  # continuous: split prompts longer than the step's token budget
    pad_batches: bool = True  # static and dynamic: compute padding as request-level batching does

    def __post_init__(self):
        check_choice("scheduling policy", self.policy, POLICIES)
        check_ints(self, ("max_num_seqs", "max_num_batched_tokens"))
        check_positive("max_wait_s", self.max_wait_s, allow_zero=True)


@dataclass
class ScheduledBatch:
    """One step's work: each row computes `num_new_tokens[i]` tokens of `seqs[i]`, in this order."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the queue by this step
    # computed and thrown away, as request-level batching computes them:
    padding_rows: int = 0  # finished requests' rows of a static batch, a padding token each
    prompt_padding: list[int] = field(default_factory=list)  # tokens padding each shorter prompt to the longest

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """Queues, admission and preemption over one BlockManager; `schedule()` plans a step, `finish()` ends one."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager, clock: Callable[[], float] = time.perf_counter):
        self.config, self.blocks, self.clock = config, blocks, clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self._batch_rows = 0  # rows the current static or dynamic batch started with

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def active_seqs(self) -> list[Sequence]:
        """The running sequences, in admission order (a copy)."""
        return list(self.running)

    def queued_seqs(self) -> list[Sequence]:
        """The queue, head first (a copy): preempted sequences go back to its head."""
        return list(self.waiting)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (finished or aborted), wherever it is, and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        if seq.request_id in self.blocks:
            self.blocks.free(seq.request_id)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def reserve_draft_slots(self, seq: Sequence, num_draft_tokens: int) -> bool:
        """Make room in the cache for num_draft_tokens tokens after a running sequence's own, without preempting
        anyone; False when the blocks are not there (draft fewer)."""
        return self.blocks.grow(seq.request_id, seq.num_tokens + num_draft_tokens)

    def update_from_output(self, batch: ScheduledBatch, num_accepted: dict[str, int]) -> None:
        """Account a step that ran: each row's computed tokens advance; a row that verified drafts keeps the
        accepted ones (num_accepted[request id]) and gives the rejected ones' cache slots back. Full blocks of the
        other rows are registered for prefix caching (a drafted row's once its tokens are appended:
        `cache_blocks`)."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.request_id in num_accepted:
                seq.num_computed_tokens += n + num_accepted[seq.request_id]
                self.blocks.truncate(seq.request_id, seq.num_computed_tokens)
            else:
                seq.num_computed_tokens += n
                self.blocks.cache_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)

    def cache_blocks(self, seqs: list[Sequence]) -> None:
        """Register the full blocks of sequences still running for prefix caching (after their tokens grew)."""
        for seq in seqs:
            if seq.request_id in self.blocks:
                self.blocks.cache_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)

    def is_batch_ready(self) -> bool:
        """Dynamic batching: is the queue full enough, or its head old enough, to start a batch?"""
        if len(self.waiting) >= self.config.max_num_seqs:
            return True
        return bool(self.waiting) and self.clock() - self.waiting[0].arrival_s >= self.config.max_wait_s

    def schedule(self) -> ScheduledBatch | None:
        """Plan the next step; None when there is nothing to run now."""
        policy = self.config.policy
        batch = ScheduledBatch([], [])
        if policy == "continuous":
            budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
            if not batch.preempted:  # after a preemption, memory is short: admit nobody this step
                self._admit(batch, budget, self.config.enable_chunked_prefill)
        elif self.running:  # static and dynamic: the batch runs to its end, nobody joins
            self._schedule_running(batch, math.inf)
            if self.config.pad_batches:  # finished rows still cost a row each, as in a padded batch
                batch.padding_rows = self._batch_rows - len(batch.seqs)
        elif policy == "static" or self.is_batch_ready():
            self._admit(batch, math.inf, chunked=False)
            self._batch_rows = len(batch.seqs)
            if self.config.pad_batches and batch.seqs:  # every prompt padded to the longest
                longest = max(batch.num_new_tokens)
                batch.prompt_padding = [longest - n for n in batch.num_new_tokens if n < longest]
        return batch if batch.seqs else None

    def _schedule_running(self, batch: ScheduledBatch, budget: float) -> float:
        """Give each running sequence its next tokens, preempting the newest ones when blocks run out."""
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = int(min(seq.num_tokens - seq.num_computed_tokens, budget))
            while not self.blocks.grow(seq.request_id, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        return budget

    def _admit(self, batch: ScheduledBatch, budget: float, chunked: bool) -> None:
        """Move waiting sequences to running, first come first served, while rows, budget and blocks allow."""
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq.token_ids)
            num_cached = len(cached) * self.blocks.block_size
            todo = seq.num_tokens - num_cached
            n = int(min(todo, budget))
            if n < todo and not chunked:
                break
            if not self.blocks.allocate(seq.request_id, seq.token_ids, cached, num_cached + n):
                break  # FCFS: nobody behind it may jump ahead
            self.waiting.popleft()
            self.running.append(seq)
            seq.status, seq.num_computed_tokens = Status.RUNNING, num_cached
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = self.clock()
                seq.num_cached_tokens = num_cached
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first, to be recomputed (prompt and output so far)."""
        self.blocks.free(seq.request_id)
        seq.status, seq.num_computed_tokens = Status.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)


__all__ = ["POLICIES", "Status", "Sequence", "SchedulerConfig", "ScheduledBatch", "Scheduler"]
