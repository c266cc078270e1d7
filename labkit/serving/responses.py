"""OpenAI's response bodies: one request's stream chunks and whole response, sharing its id, model and time."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from labkit.serving.events import sse


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

    def delta_event(self, text: str, finish_reason: str | None, token_ids: Sequence[int]) -> str:
        choice: dict = {"index": 0}
        if self.is_chat:  # a chunk without new text (token ids held back, or the end) has an empty delta
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=finish_reason)
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return self._chunk([choice])

    def usage_event(self, num_prompt: int, num_completion: int) -> str:
        return self._chunk([], usage=usage(num_prompt, num_completion))

    def response(self, text: str, finish_reason: str, token_ids: Sequence[int], num_prompt: int) -> dict:
        """The whole (non-streamed) response body."""
        choice: dict = {"index": 0}
        if self.is_chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=finish_reason)
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        extra: dict = {}
        self._with_prompt_ids([choice], extra)
        return {**self._head(self.object), "choices": [choice], **extra, "usage": usage(num_prompt, len(token_ids))}


__all__ = ["usage", "Reply"]
