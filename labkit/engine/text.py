"""Text in and out: prompts through the tokenizer (and chat template), and output text built token by token.

`IncrementalDetokenizer` decodes only a short window per new token (vLLM's prefix/read offsets) instead of
the whole output, checks stop strings only where new text could complete one, and holds back text that might
still turn into a stop string or is half a UTF-8 character, so streamed pieces never need to be taken back.
"""

from __future__ import annotations

from collections.abc import Sequence


def encode_prompt(tokenizer, text, chat: bool = False) -> list[int]:
    """Token ids of a prompt (a string, or chat messages with chat=True) through the model's chat template."""
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


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """text up to the earliest stop string (all of it when none occurs)."""
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to hold: a partial stop string or an incomplete UTF-8 character."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


class IncrementalDetokenizer:
    """The output text of one request, grown a token at a time; `add` returns the text now safe to show."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one appears)
        self.emitted = 0  # characters of text already returned
        self.stopped = False  # a stop string appeared
        self._prefix, self._read = 0, 0  # token window: decode [prefix, read) is text already appended

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one token; return newly safe text (maybe ""). After a stop string, `stopped` is set."""
        self.token_ids.append(token_id)
        if not self._advance(final=False):
            return ""
        if self.stopped:
            return self.flush()
        safe = len(self.text) - held_back(self.text, self.stops)
        if safe <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:safe], safe
        return piece

    def flush(self) -> str:
        """At the end of the request: the rest of the text, held-back characters and pending tokens included."""
        if not self.stopped:
            self._advance(final=True)
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece

    def _advance(self, final: bool) -> bool:
        """Decode the tokens after the last complete character; False when there is no new text yet."""
        before = self._decode(self.token_ids[self._prefix:self._read])
        after = self._decode(self.token_ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return False  # no complete character yet: wait for the next token
        start = len(self.text)
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.token_ids)
        if self.stops:
            window = max(0, start - self.max_stop + 1)  # only a stop string ending in the new text is new
            tail = self.text[window:]
            cut = cut_at_stop(tail, self.stops)
            if cut != tail:
                self.text, self.stopped = self.text[:window] + cut, True
        return True


__all__ = ["encode_prompt", "cut_at_stop", "held_back", "IncrementalDetokenizer"]
