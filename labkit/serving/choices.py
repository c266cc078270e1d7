"""One request's choices (OpenAI's `n` and `best_of`): a job each, sharing the prompt's KV blocks, read as one
stream of (choice, output) pairs; and what each choice has gathered (text, token ids, log-probabilities).

The first choice is sent to the engine alone; the others follow once it has its first token, when its prompt's
full blocks are in the prefix cache, so they prefill only the prompt's last partial block (vLLM forks the
sequence instead; the blocks shared are the same). Choice i > 0 samples from a seed derived from the request's,
so a seeded request repeats exactly and its choices differ.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labkit.serving.protocol import GenerationRequest
from labkit.serving.responses import TokenTexts, chat_logprobs, completion_logprobs
from labkit.serving.worker import Job, next_output

if TYPE_CHECKING:
    from labkit.engine.outputs import RequestOutput
    from labkit.model.sampling import SamplingParams


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index`: the request's own for the first, a 63-bit hash of (seed, index) for others."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    return params if index == 0 else dataclasses.replace(params, seed=choice_seed(params.seed, index))


@dataclass
class Choice:
    """One choice: its job and what it has gathered so far."""

    index: int
    job: Job
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob per token id (and a stop token), when asked
    prompt_logprobs: list | None = None
    finish_reason: str = "length"
    text_offset: int = 0  # of the next token, in the text streamed so far
    num_chunks: int = 0  # stream chunks sent

    @property
    def cumulative_logprob(self) -> float:
        return sum(entry.logprob for entry in self.logprobs)

    def add(self, out: RequestOutput) -> None:
        self.texts.append(out.text)
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.logprobs or ())
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.finish_reason = out.finish_reason or self.finish_reason


class Choices:
    """The best_of jobs of one request, read together; `submit(job)` hands a job to the engine's worker (raising
    the APIError to answer when it cannot), `cancel(job)` withdraws one."""

    def __init__(self, req: GenerationRequest, loop, submit: Callable[[Job], None], cancel: Callable[[Job], None]):
        self.req, self._submit, self._cancel = req, submit, cancel
        self.choices = [Choice(i, Job(req.prompt_ids, choice_params(req.params, i), loop))
                        for i in range(req.best_of)]
        submit(self.choices[0].job)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def num_completion_tokens(self) -> int:
        """Tokens generated over all choices (best_of of them: all were generated)."""
        return sum(len(c.token_ids) for c in self.choices)

    @property
    def is_done(self) -> bool:
        return all(c.job.is_done for c in self.choices)

    def cancel(self) -> None:
        for choice in self.choices:
            if not choice.job.is_done:
                self._cancel(choice.job)

    async def outputs(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Each choice's outputs as they come, gathered into its Choice; an error of any choice is raised."""
        first, *others = self.choices
        out = await next_output(first.job)  # an error here comes before any event: answered with its status
        try:
            for choice in others:  # the prompt's blocks are cached now: the others share them
                self._submit(choice.job)
        except BaseException:
            self.cancel()
            raise
        reading: dict[asyncio.Future, Choice] = {}
        try:
            if out is not None:
                first.add(out)
                yield first, out
                reading[asyncio.ensure_future(next_output(first.job))] = first
            for choice in others:
                reading[asyncio.ensure_future(next_output(choice.job))] = choice
            while reading:
                done, _ = await asyncio.wait(reading, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: reading[t].index):
                    choice = reading.pop(task)
                    out = task.result()
                    if out is not None:
                        choice.add(out)
                        yield choice, out
                        reading[asyncio.ensure_future(next_output(choice.job))] = choice
        finally:
            for task in reading:
                task.cancel()


class LogprobView:
    """OpenAI's `logprobs` of a choice, in the request's shape (None when it asked for none)."""

    def __init__(self, req: GenerationRequest, texts: TokenTexts, prompt_text: str):
        self.req, self.texts, self.prompt_text = req, texts, prompt_text

    def _format(self, entries: list, text_offset: int) -> dict | None:
        if self.req.logprobs is None:
            return None
        if self.req.is_chat:
            return chat_logprobs(entries, self.texts)
        return completion_logprobs(entries, self.texts, text_offset)

    def _entries(self, choice: Choice, logprobs: list, with_prompt: bool) -> list:
        entries = [(entry.token_id, entry) for entry in logprobs]  # a stop token that ended the choice included
        if with_prompt and self.req.echo and choice.prompt_logprobs is not None:
            entries = list(zip(self.req.prompt_ids, choice.prompt_logprobs)) + entries
        return entries

    def delta(self, choice: Choice, out: RequestOutput) -> tuple[str, dict | None]:
        """A stream chunk's text and logprobs for out (the echoed prompt leads a choice's first chunk)."""
        is_first = not choice.num_chunks
        choice.num_chunks += 1
        text = (self.prompt_text if self.req.echo and is_first else "") + out.text
        logprobs = self._format(self._entries(choice, out.logprobs or [], is_first),
                                choice.text_offset)
        if logprobs is not None and not self.req.is_chat:
            choice.text_offset += sum(len(token) for token in logprobs["tokens"])
        return text, logprobs

    def whole(self, choice: Choice) -> tuple[str, dict | None]:
        """A choice's whole text and logprobs (the echoed prompt first)."""
        text = (self.prompt_text if self.req.echo else "") + "".join(choice.texts)
        return text, self._format(self._entries(choice, choice.logprobs, True), 0)


def best(choices: list[Choice], n: int) -> list[Choice]:
    """The n choices to return: all, in order, when there are n; else the n of highest cumulative logprob."""
    if len(choices) == n:
        return choices
    return sorted(choices, key=lambda c: -c.cumulative_logprob)[:n]


__all__ = ["choice_seed", "choice_params", "Choice", "Choices", "LogprobView", "best"]
