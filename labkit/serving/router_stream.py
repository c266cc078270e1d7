"""One client stream as the router relays it, and its resumption when the replica serving it dies.

The router asks every replica for token ids (vLLM's `return_token_ids`), so it knows exactly which tokens the
client has seen. When a stream is cut (the connection drops, the stream ends without `data: [DONE]`, or the
replica sends a server error event), `StreamSplice.resume_body` is the completion request that carries on:
the prompt's token ids plus those already streamed, with the tokens still to come as `max_tokens`. A chat
request resumes as a completion over its chat prompt's ids (the template is not applied twice), and its
continuation is rewritten into chat chunks of the client's stream (same id, created, model). Token ids and
`prompt_token_ids` reach the client only when it asked for them.

Text: a continuation decoded on its own can differ from the whole decoded at once (a character split across
the cut, a tokenizer that drops a leading space, a stop string that spans the cut). With the model's tokenizer
(`labkit router --replicas`), the router decodes the continuation itself, after the tokens already streamed,
with the engine's `IncrementalDetokenizer`, so the text and stop strings are exactly those of one uncut stream.
Without one (`--upstream`), the replica's text is spliced as it comes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from labkit.serving.events import DONE_EVENT, sse
from labkit.serving.protocol import DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS
from labkit.serving.responses import usage

logger = logging.getLogger("labkit.serving.router")

# fields whose values give chunks more than one choice's text and ids: such streams are not resumed
_UNRESUMABLE = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
                "echo": (None, False)}
_PROMPT_FIELDS = ("messages", "prompt", "max_tokens", "max_completion_tokens", "stream_options", "return_token_ids")


class StreamCut(Exception):
    """The replica ended the stream with a server error (it is shutting down, or its step failed)."""


def _is_one_of(value, values: tuple) -> bool:
    return any(value is v if v is None or isinstance(v, bool) else type(value) is type(v) and value == v
               for v in values)


def is_resumable(body: Mapping) -> bool:
    """Whether a cut stream of this request can be resumed: a stream of one choice without log-probabilities."""
    return body.get("stream") is True and all(_is_one_of(body.get(k), v) for k, v in _UNRESUMABLE.items())


def upstream_body(body: Mapping) -> bytes:
    """What the router sends a replica for a resumable stream: the body, asking for token ids."""
    return json.dumps({**body, "return_token_ids": True}).encode()


def _choice_text(choice: Mapping, is_chat: bool) -> str:
    text = (choice.get("delta") or {}).get("content") if is_chat else choice.get("text")
    return text if isinstance(text, str) else ""


class StreamSplice:
    """The client's one stream: what it has been sent, its relay of each replica event, and its resumption."""

    def __init__(self, body: Mapping, is_chat: bool, tokenizer=None):
        self.body, self.is_chat, self.tokenizer = body, is_chat, tokenizer
        self.is_resumable = is_resumable(body)
        self.wants_ids = body.get("return_token_ids") is True
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.prompt_ids: list[int] | None = None
        self.token_ids: list[int] = []  # every token the client has been sent
        self.num_chars = 0  # of text the client has been sent
        self.finish_reason: str | None = None
        self.head: dict | None = None  # id, object, created and model of the client's chunks
        self.is_done = False  # the client has its [DONE]
        self.num_resumes = 0
        self._detokenizer = None
        self._has_all_ids = True  # every chunk with text carried its token ids

    # -- relaying -------------------------------------------------------------------------------------------
    def relay(self, data: str) -> list[str]:
        """The client's events for one event of the replica's stream (the first replica's, or a resumed one's)."""
        if data.strip() == "[DONE]":
            return self.finish() if self.num_resumes else self._done()
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return [f"data: {data}\n\n"]  # not ours to judge: passed on as it came
        if not isinstance(event, dict):
            return [f"data: {data}\n\n"]
        if event.get("error") is not None:
            error = event["error"]
            if isinstance(error, dict) and error.get("type") == "server_error" and not self.finish_reason:
                raise StreamCut(str(error.get("message")))
            return [sse(event)]
        return self._continued(event) if self.num_resumes else self._passed(event)

    def _passed(self, event: dict) -> list[str]:
        """An event of the first replica: recorded, its token ids taken out unless the client asked for them."""
        choices = event.get("choices")
        if self.head is None:
            self.head = {k: event.get(k) for k in ("id", "object", "created", "model")}
        if "prompt_token_ids" in event and self.is_chat:
            self.prompt_ids = event["prompt_token_ids"] if self.wants_ids else event.pop("prompt_token_ids")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            if "prompt_token_ids" in choice:
                self.prompt_ids = choice["prompt_token_ids"] if self.wants_ids else choice.pop("prompt_token_ids")
            ids = choice.get("token_ids") if self.wants_ids else choice.pop("token_ids", None)
            text = _choice_text(choice, self.is_chat)
            if isinstance(ids, list):
                self.token_ids.extend(ids)
            elif text:
                self._has_all_ids = False
            self.num_chars += len(text)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return [sse(event)]

    def _continued(self, event: dict) -> list[str]:
        """An event of a resumed completion, rewritten as a chunk of the client's stream."""
        choices = event.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            return []  # its usage: the client's counts the whole completion, at the end
        choice = choices[0]
        ids, text, finish = list(choice.get("token_ids") or ()), choice.get("text") or "", choice.get("finish_reason")
        if self._detokenizer is not None:
            text, ids, finish = self._decode(ids, finish)
        if not (text or ids or finish):
            return []
        self.token_ids.extend(ids)
        self.num_chars += len(text)
        self.finish_reason = finish
        out = [self._chunk(text, ids, finish)]
        if finish == "stop" and choice.get("finish_reason") is None:  # a stop string across the cut: end here
            out += self.finish()
        return out

    def _decode(self, ids: list[int], finish: str | None) -> tuple[str, list[int], str | None]:
        """The continuation's text after the tokens already streamed, cut at a stop string (the engine's rules)."""
        detok, pieces = self._detokenizer, []
        for i, token_id in enumerate(ids):
            pieces.append(detok.add(token_id))
            if detok.stopped:
                return "".join(pieces), ids[: i + 1], "stop"
        if finish is not None:
            pieces.append(detok.flush())
        return "".join(pieces), ids, finish

    def _chunk(self, text: str, ids: list[int], finish: str | None) -> str:
        choice: dict = {"index": 0}
        if self.is_chat:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=finish)
        if self.wants_ids:
            choice["token_ids"] = ids
        return sse({**self.head, "choices": [choice], **({"usage": None} if self.include_usage else {})})

    def end_at_length(self) -> list[str]:
        """The end of a stream cut after its last token but before its finish: the chunk that says so."""
        self.finish_reason = "length"
        return [self._chunk("", [], "length"), *self.finish()]

    def _done(self) -> list[str]:
        self.is_done = True
        return [DONE_EVENT]

    def finish(self) -> list[str]:
        """The end of a stream the router completes itself: its usage (when asked for) and [DONE]."""
        if self.is_done:
            return []
        out = []
        if self.include_usage and self.prompt_ids is not None and self.head is not None:
            out.append(sse({**self.head, "choices": [],
                            "usage": usage(len(self.prompt_ids), len(self.token_ids))}))
        return out + self._done()

    # -- resuming -------------------------------------------------------------------------------------------
    @property
    def can_resume(self) -> bool:
        return (self.is_resumable and self.prompt_ids is not None and self._has_all_ids and self.head is not None
                and self.finish_reason is None)

    @property
    def limit(self) -> int | None:
        """The client's own token budget, if it gave one."""
        limit = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        return limit if isinstance(limit, int) else None

    @property
    def num_left(self) -> int:
        """Tokens still to come: the client's budget, or the server's default for its endpoint (which a replica
        clips to the context's room), less those streamed."""
        limit = self.limit or (DEFAULT_CHAT_MAX_TOKENS if self.is_chat else DEFAULT_COMPLETION_MAX_TOKENS)
        return limit - len(self.token_ids)

    def resume_body(self, with_limit: bool = True) -> bytes:
        """The completion that carries the stream on: prompt and streamed tokens in, the remaining budget out.
        with_limit=False leaves max_tokens out (the replica's default, clipped to the context's room): for a
        request without its own budget whose default no longer fits the context."""
        body = {k: v for k, v in self.body.items() if k not in _PROMPT_FIELDS}
        body.update(prompt=[*self.prompt_ids, *self.token_ids], stream=True, return_token_ids=True)
        if with_limit:
            body["max_tokens"] = self.num_left
        return json.dumps(body).encode()

    def start_resume(self) -> None:
        """Switch to relaying a continuation: rebuild the text decoder over the tokens already streamed."""
        self.num_resumes += 1
        if self.tokenizer is None or self._detokenizer is not None:
            return
        from labkit.engine.text import IncrementalDetokenizer

        stop = self.body.get("stop")
        detok = IncrementalDetokenizer(self.tokenizer, [stop] if isinstance(stop, str) else stop or ())
        for token_id in self.token_ids:
            detok.add(token_id)
        if len(detok.text) < self.num_chars:
            logger.warning("the router's decoding of a cut stream is shorter than the text sent: its replica's "
                           "text is spliced as it comes")
            return
        detok.emitted = self.num_chars
        self._detokenizer = detok


__all__ = ["StreamCut", "StreamSplice", "is_resumable", "upstream_body"]
