"""OpenAI's response bodies: one request's stream chunks and whole response, sharing its id, model and time;
and OpenAI's two shapes of log-probabilities (completions' parallel lists, chat's list of token objects)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from labkit.serving.events import sse

MIN_LOGPROB = -9999.0  # JSON has no -inf: a token the model rules out gets this (as vLLM does)


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class TokenTexts:
    """Each token id's text (decoded alone, as OpenAI's `tokens` show it), remembered once decoded."""

    def __init__(self, tokenizer):
        self.tokenizer, self._texts = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


def completion_logprobs(entries: Sequence, texts: TokenTexts, text_offset: int = 0) -> dict:
    """Completions' `logprobs` for (token id, TokenLogprob or None) pairs: tokens, token_logprobs, top_logprobs
    (the token itself and its alternatives, as vLLM) and each token's offset in the text from text_offset."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in entries:
        text = texts(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
        if entry is None:  # a prompt's first token: nothing before it to predict it
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_finite(entry.logprob))
        top = {texts(t): _finite(lp) for t, lp in entry.top}
        top.setdefault(text, _finite(entry.logprob))
        out["top_logprobs"].append(top)
    return out


def _chat_token(token_id: int, logprob: float, texts: TokenTexts) -> dict:
    text = texts(token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence, texts: TokenTexts) -> dict:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    return {"content": [{**_chat_token(entry.token_id, entry.logprob, texts),
                         "top_logprobs": [_chat_token(t, lp, texts) for t, lp in entry.top]}
                        for _, entry in entries]}


def usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


@dataclass
class Reply:
    """The bodies of one request's answer: stream chunks and the whole response share its id, model and time."""

    model: str
    is_chat: bool
    return_token_ids: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""
    prompt_token_ids: Sequence[int] = ()  # with return_token_ids: sent once, on the first chunk or the response
    _is_prompt_sent: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if not self.id:
            self.id = f"{'chatcmpl' if self.is_chat else 'cmpl'}-{uuid.uuid4().hex}"

    @property
    def object(self) -> str:
        return "chat.completion" if self.is_chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _with_prompt_ids(self, choices: list[dict], extra: dict) -> None:
        """vLLM's `return_token_ids`: the prompt's ids once, in a chat body's top level or a completion's choice."""
        if not self.return_token_ids or self._is_prompt_sent or not choices:
            return
        self._is_prompt_sent = True
        (extra if self.is_chat else choices[0])["prompt_token_ids"] = list(self.prompt_token_ids)

    def _chunk(self, choices: list[dict], **extra) -> str:
        obj = f"{self.object}.chunk" if self.is_chat else self.object
        self._with_prompt_ids(choices, extra)
        if self.include_usage:  # OpenAI: `usage: null` on every chunk but the last, when usage was asked for
            extra.setdefault("usage", None)
        return sse({**self._head(obj), "choices": choices, **extra})

    def role_event(self) -> str:
        """A chat stream's first event: the assistant's role, no content yet."""
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def role_events(self, n: int) -> list[str]:
        """The role event of each of n choices."""
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(n)]

    def delta_event(self, text: str, finish_reason: str | None, token_ids: Sequence[int], index: int = 0,
                    logprobs: dict | None = None) -> str:
        choice: dict = {"index": index}
        if self.is_chat:  # a chunk without new text (token ids held back, or the end) has an empty delta
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text
        choice.update(logprobs=logprobs, finish_reason=finish_reason)
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return self._chunk([choice])

    def usage_event(self, num_prompt: int, num_completion: int) -> str:
        return self._chunk([], usage=usage(num_prompt, num_completion))

    def choice(self, index: int, text: str, finish_reason: str, token_ids: Sequence[int],
               logprobs: dict | None = None) -> dict:
        """One choice of a whole response."""
        choice: dict = {"index": index}
        if self.is_chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=logprobs, finish_reason=finish_reason)
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def response(self, text: str, finish_reason: str, token_ids: Sequence[int], num_prompt: int) -> dict:
        """The whole (non-streamed) response body of one choice."""
        return self.responses([self.choice(0, text, finish_reason, token_ids)], num_prompt, len(token_ids))

    def responses(self, choices: list[dict], num_prompt: int, num_completion: int) -> dict:
        """The whole (non-streamed) response body of several choices (`choice`'s)."""
        extra: dict = {}
        self._with_prompt_ids(choices, extra)
        return {**self._head(self.object), "choices": choices, **extra, "usage": usage(num_prompt, num_completion)}


__all__ = ["usage", "Reply", "TokenTexts", "completion_logprobs", "chat_logprobs", "MIN_LOGPROB"]
