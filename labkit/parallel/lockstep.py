"""Ranks in lockstep: rank 0's engine records what changes the requests it holds, and every other rank replays it.

Under tensor parallelism every rank runs the same Engine over its shard of the model, and each step's forward
meets the other ranks' at its all-reduces, so every rank must schedule the same rows in every step. vLLM's driver
broadcasts each step's scheduler output; here, more simply, rank 0 sends each step's inputs (the requests added
since the last step, with their token ids, SamplingParams and ids, and the aborts, in the order they happened)
and every rank's scheduler, holding the same requests and as many KV blocks (`tp.make_engine`), makes the same
choices. The ranks compute the same logits after the all-reduce and sample with the same per-request generators
(rank 0 seeds a sampled request that came without a seed), so they agree token for token; each step's outputs
(`digest`) are compared, so that a rank that drifts takes the server down instead of serving other text.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from labkit.engine.outputs import RequestOutput
from labkit.model.sampling import SamplingParams

STOP = "stop"  # rank 0's last message: the ranks leave their loop


@dataclass(frozen=True)
class AddRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    request_id: str


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class StepInputs:
    """What rank 0 sends before its step `number`: the adds and aborts since the previous step, in order."""

    number: int
    ops: tuple[AddRequest | AbortRequest, ...]


def digest(outputs: Sequence[RequestOutput]) -> tuple:
    """What a step gave each request (its id, new tokens, finish reason): equal on ranks that agree."""
    return tuple((out.request_id, tuple(out.new_token_ids), out.finish_reason) for out in outputs)


def replay(engine, inputs: StepInputs) -> list[RequestOutput]:
    """Apply rank 0's adds and aborts to this rank's engine, then run the same step."""
    for op in inputs.ops:
        if isinstance(op, AddRequest):
            engine.add_request(op.prompt_ids, op.params, request_id=op.request_id)
        else:
            engine.abort(op.request_id)
    return engine.step()


def follow(engine, commands, reports) -> None:
    """A rank's loop: replay each step rank 0 sends and report its digest, until rank 0 says stop or is gone.
    commands, reports: the two ends of multiprocessing pipes (recv / send)."""
    while True:
        try:
            message = commands.recv()
        except EOFError:  # rank 0 is gone: nothing more will come
            return
        if message == STOP:
            return
        reports.send(("step", message.number, digest(replay(engine, message))))


class Channel(Protocol):
    """Rank 0's line to the other ranks (`labkit.parallel.serve.RankGroup`)."""

    failure: str | None  # the first failure's message, once there is one

    def send(self, inputs: StepInputs) -> None: ...  # to every other rank; raises once the group has failed

    def record(self, rank: int, number: int, step_digest: tuple) -> None: ...  # compared with the others' digests

    def fail(self, message: str) -> None: ...  # the ranks may no longer agree: stop serving (the first one counts)


def with_seed(params: SamplingParams) -> SamplingParams:
    """A sampled request without a seed gets one, drawn here, so that every rank draws the same tokens for it
    (unseeded rows would sample from each rank's global generator)."""
    if params.is_greedy or params.seed is not None:
        return params
    return dataclasses.replace(params, seed=secrets.randbits(63))


class LockstepEngine:
    """Rank 0's engine under tensor parallelism: the Engine's API (what the server's worker calls), with
    `add_request` and `abort` recorded and sent to the other ranks, with the step number, before each `step`.
    Everything else is the engine's own."""

    def __init__(self, engine, channel: Channel):
        self.engine, self.channel = engine, channel
        self._ops: list[AddRequest | AbortRequest] = []
        self._num_steps = 0

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
                    arrival_s: float | None = None) -> str:
        params = with_seed(params)
        request_id = self.engine.add_request(prompt_ids, params, request_id=request_id, arrival_s=arrival_s)
        self._ops.append(AddRequest(tuple(prompt_ids), params, request_id))  # only what rank 0 accepted
        return request_id

    def abort(self, request_id: str) -> bool:
        is_aborted = self.engine.abort(request_id)
        if is_aborted:
            self._ops.append(AbortRequest(str(request_id)))
        return is_aborted

    def step(self) -> list[RequestOutput]:
        inputs = StepInputs(self._num_steps, tuple(self._ops))
        self.channel.send(inputs)  # the other ranks step with this one, meeting it at each all-reduce
        self._ops.clear()
        self._num_steps += 1
        try:
            outputs = self.engine.step()
        except Exception as exc:  # the other ranks may have finished their step: they no longer agree with this one
            self.channel.fail(f"rank 0 failed in step {inputs.number}: {type(exc).__name__}: {exc}")
            raise RuntimeError(self.channel.failure) from None  # the cause (e.g. a rank that died), not gloo's
        self.channel.record(0, inputs.number, digest(outputs))
        return outputs


__all__ = ["AddRequest", "AbortRequest", "StepInputs", "STOP", "digest", "replay", "follow", "with_seed",
           "Channel", "LockstepEngine"]
