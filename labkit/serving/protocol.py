"""OpenAI's completion and chat protocol, shared by `labkit serve` and its clients (`labkit ping`, `bench serve`).

Server side: request bodies validated by pydantic models, then into token ids and SamplingParams (a 400 naming
the field otherwise), and OpenAI's error body `{"error": {"message", "type", "param", "code"}}`. Client side:
reading error bodies and the model list. Stream events are in `labkit.serving.events`, response bodies in
`labkit.serving.responses`. Importing this module does not import torch, so clients stay light.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from labkit.checks import is_int, is_number

if TYPE_CHECKING:
    from labkit.model.sampling import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512  # a chat request without max_tokens: a reply, not the rest of the context
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
MAX_JSON_DEPTH = 64  # OpenAI bodies nest a handful of levels; deeper ones only cost stack
REPLICA_HEADER = "x-labkit-replica"  # the replica that answered, on every answer of `labkit router`

MAX_N = 16  # choices (n, best_of) per request: each is a sequence in the batch
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on alternatives per token
MAX_LOGIT_BIAS = 100  # OpenAI's range is [-100, 100]

# Parameters OpenAI defines that labkit accepts only at their no-op value: anything else is a named 400.
NO_OP_PARAMS: dict[str, tuple] = {
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "min_tokens": (None, 0),
}
CHAT_NO_OP_PARAMS: dict[str, tuple] = {"echo": (None, False), "best_of": (None, 1)}  # completions' only
COMPLETION_NO_OP_PARAMS: dict[str, tuple] = {"top_logprobs": (None, 0)}  # chat's only: completions' is `logprobs`
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# -- errors --------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered with OpenAI's error body and an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 naming the offending field."""
    return APIError(400, message, param=param, code=code)


class ServerError(RuntimeError):
    """The server could not be reached, or answered with an error (its message is kept)."""


MAX_ERROR_CHARS = 200  # of a non-OpenAI error body (an HTML page) quoted in a one-line error


def error_message(status: int, body: bytes) -> str:
    """`HTTP 400: <message>` on one line, from an OpenAI error body, or from the raw text of any other body (an
    HTML page: its whitespace folded, cut at MAX_ERROR_CHARS with an ellipsis)."""
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError, RecursionError):
        message = None
    if not isinstance(message, str) or not message.strip():
        message = body.decode("utf-8", "replace")
    message = " ".join(message.split()) or "(empty body)"
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS - 1].rstrip() + "…"
    return f"HTTP {status}: {message}"


# -- requests ------------------------------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    """A validated completion or chat request."""

    prompt_ids: list[int]
    params: SamplingParams
    is_chat: bool
    is_stream: bool
    include_usage: bool
    return_token_ids: bool
    n: int = 1  # choices returned
    best_of: int = 1  # choices generated (>= n): the n with the highest cumulative logprob are returned
    echo: bool = False  # completions: the prompt leads each choice's text (and its logprobs, with logprobs)
    logprobs: int | None = None  # alternatives per token; None: no logprobs in the answer
    prompt_text: str = ""  # with echo: the prompt as sent (token-id prompts decoded)


def parse_json_object(body: bytes) -> dict:
    """A request body as a JSON object; 400 (invalid_json) for anything else, or one nested deeper than
    MAX_JSON_DEPTH (which would otherwise fail later, as a RecursionError, wherever it is walked)."""
    too_deep = bad_request(f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    try:
        data = json.loads(body)
    except RecursionError:
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    depth, level = 1, [data]  # walked a level at a time, without recursion
    while level:
        if depth > MAX_JSON_DEPTH:
            raise too_deep
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
        depth += 1
    return data


def _check_text(text: str, param: str) -> None:
    """400 for text that is not Unicode the tokenizer can take: JSON's `\\ud800` escape decodes to a lone
    surrogate, which no UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode: a lone surrogate at character {exc.start}",
                          param=param) from None


def _is_no_op(value, no_ops: tuple) -> bool:
    for no_op in no_ops:
        if no_op is None or isinstance(no_op, bool):
            if value is no_op:  # False must not match 0, nor None match a missing dict
                return True
        elif isinstance(no_op, (int, float)):
            if is_number(value) and value == no_op:
                return True
        elif value == no_op:
            return True
    return False


NonEmptyStr = Annotated[str, Field(min_length=1)]


class _Body(BaseModel):
    """OpenAI's request bodies, checked as JSON gives them: no coercion ("3" is not 3, 1 is not true), no
    unknown fields, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str  # content parts are joined into one string on the way in: labkit takes text parts only

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content):
        if not isinstance(content, list):
            return content
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   and set(p) == {"type", "text"} for p in content):
            raise PydanticCustomError("unsupported_parameter", "only text parts are supported")
        return "".join(p["text"] for p in content)


class _GenerationBody(_Body):
    """What completions and chat requests share."""

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo (the prompt scored, nothing generated)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 (vLLM's spelling) and 0 are "off"
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[NonEmptyStr] | None = None
    ignore_eos: bool | None = None
    return_token_ids: bool | None = None
    user: str | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = None  # token id (as JSON's string key) -> bias; checked by the server
    # OpenAI's parameters labkit takes only at their no-op value (NO_OP_PARAMS)
    suffix: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    min_tokens: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, stop):
        return [stop] if isinstance(stop, str) else stop

    @field_validator(*NO_OP_PARAMS)
    @classmethod
    def _only_no_ops(cls, value, info: ValidationInfo):
        return _only_no_op(value, info.field_name, NO_OP_PARAMS[info.field_name])


def _only_no_op(value, name: str, no_ops: tuple):
    if not _is_no_op(value, no_ops):
        raise PydanticCustomError(
            "unsupported_parameter", "{name}={value} is not supported by labkit serve (accepted: {accepted})",
            {"name": name, "value": json.dumps(value), "accepted": " or ".join(json.dumps(v) for v in no_ops)})
    return value


class CompletionRequest(_GenerationBody):
    """A /v1/completions body. The prompt is checked against the tokenizer and vocabulary by the server."""

    prompt: Any  # a string, token ids, or a list of one of those
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token
    top_logprobs: Any = None  # chat's spelling: a no-op here

    @field_validator(*COMPLETION_NO_OP_PARAMS)
    @classmethod
    def _only_no_ops_here(cls, value, info: ValidationInfo):
        return _only_no_op(value, info.field_name, COMPLETION_NO_OP_PARAMS[info.field_name])


class ChatCompletionRequest(_GenerationBody):
    """A /v1/chat/completions body."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token, with logprobs
    echo: Any = None  # completions' only: no-ops here
    best_of: Any = None

    @field_validator(*CHAT_NO_OP_PARAMS)
    @classmethod
    def _only_no_ops_here(cls, value, info: ValidationInfo):
        return _only_no_op(value, info.field_name, CHAT_NO_OP_PARAMS[info.field_name])


def _param(loc: tuple) -> str | None:
    """OpenAI's `param` for a pydantic error location: ("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or None


def _api_error(exc: ValidationError) -> APIError:
    """A 400 in OpenAI's shape for the first problem pydantic found, naming its field."""
    error = exc.errors(include_url=False)[0]
    param, kind = _param(error["loc"]), error["type"]
    if kind == "extra_forbidden":  # OpenAI's own wording
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param,
                           code="unsupported_parameter")
    code = {"missing": "missing_required_parameter", "unsupported_parameter": "unsupported_parameter"}.get(kind)
    got = "" if kind in ("missing", "unsupported_parameter") else f" (got {json.dumps(error.get('input'))[:80]})"
    return bad_request(f"{param}: {error['msg']}{got}" if param else f"{error['msg']}{got}", param=param, code=code)


def _completion_prompt(prompt, tokenizer, vocab_size: int) -> list[int]:
    from labkit.engine.text import encode_prompt  # the engine package brings torch: only the server needs it

    # OpenAI accepts a string, a list of one string, token ids, or a list of one token-id list
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request(f"a batch of {len(prompt)} prompts is not supported: send one prompt per request",
                          param="prompt", code="unsupported_parameter")
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        _check_text(prompt, "prompt")
        ids = encode_prompt(tokenizer, prompt)
    elif isinstance(prompt, list):
        if not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        if not all(is_int(t) and 0 <= t < vocab_size for t in prompt):
            raise bad_request(f"token-id prompts must hold integers in [0, {vocab_size})", param="prompt")
        ids = list(prompt)
    else:
        raise bad_request("prompt must be a string, a list of token ids, or a list of one of those", param="prompt")
    if not ids:
        raise bad_request("prompt must not be empty (it encodes to no tokens)", param="prompt")
    return ids


def _chat_prompt(messages: Sequence[ChatMessage], tokenizer) -> list[int]:
    from jinja2 import TemplateError

    from labkit.engine.text import encode_prompt

    for i, message in enumerate(messages):
        _check_text(message.content, f"messages[{i}].content")
    plain = [{"role": CHAT_ROLES[m.role], "content": m.content} for m in messages]
    try:
        return encode_prompt(tokenizer, plain, chat=True)
    except (TemplateError, ValueError) as exc:  # a template may reject an order of roles: the request's fault
        raise bad_request(f"the chat template rejected these messages: {exc}", param="messages") from None


def _max_tokens(request: _GenerationBody, num_prompt: int, max_seq_len: int, default: int, prompt_param: str) -> int:
    """The request's token budget: its own (checked against the context), else the default clipped to the room."""
    room = max_seq_len - num_prompt
    if room < 1:
        raise bad_request(f"the prompt has {num_prompt} tokens, which leaves no room in the model's context of "
                          f"{max_seq_len} tokens", param=prompt_param, code="context_length_exceeded")
    name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(request, name)
    if max_tokens is None:
        return min(default, room)
    if max_tokens == 0 and not getattr(request, "echo", False):
        raise bad_request(f"{name} must be >= 1 (0 is only for echo=true: the prompt scored, nothing generated)",
                          param=name)
    if max_tokens > room:
        raise bad_request(f"the prompt ({num_prompt} tokens) + {name} ({max_tokens}) exceeds the model's context "
                          f"of {max_seq_len} tokens", param=name, code="context_length_exceeded")
    return max_tokens


def validate_body(body: Mapping, is_chat: bool) -> CompletionRequest | ChatCompletionRequest:
    """The body as a pydantic request model; APIError(400) naming the first bad field otherwise."""
    for name in body:  # pydantic cannot even name a key that is not Unicode (a lone surrogate): no model has one
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"Unrecognized request argument supplied: {name!r}", param=name,
                              code="unsupported_parameter") from None
    try:
        return (ChatCompletionRequest if is_chat else CompletionRequest).model_validate(body)
    except ValidationError as exc:
        raise _api_error(exc) from None


def parse_generation_request(body: Mapping, *, is_chat: bool, tokenizer, eos_token_ids: Sequence[int],
                             max_seq_len: int, vocab_size: int,
                             default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> GenerationRequest:
    """Validate an OpenAI request body into token ids and SamplingParams; raise APIError(400) naming the field.

    The body's shape and types are checked by the pydantic models above; what needs the model (the prompt's
    tokens, the room left in the context) is checked here. Without max_tokens, a completion gets OpenAI's 16
    tokens and a chat request default_max_tokens, each clipped to the room the prompt leaves in the context.
    """
    from labkit.model.sampling import SamplingParams

    request = validate_body(body, is_chat)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if request.user is not None:
        _check_text(request.user, "user")
    for i, stop in enumerate(request.stop or ()):
        _check_text(stop, f"stop[{i}]")
    if is_chat:
        prompt_ids = _chat_prompt(request.messages, tokenizer)
    else:
        prompt_ids = _completion_prompt(request.prompt, tokenizer, vocab_size)
    max_tokens = _max_tokens(request, len(prompt_ids), max_seq_len,
                             default_max_tokens if is_chat else DEFAULT_COMPLETION_MAX_TOKENS,
                             "messages" if is_chat else "prompt")
    temperature = 1.0 if request.temperature is None else request.temperature
    choices = _choices(request, is_chat)
    shown = _num_logprobs(request, is_chat)  # what the answer shows
    logprobs = 0 if shown is None and choices.best_of > choices.n else shown  # best_of ranks by cumulative logprob
    # echo shows the prompt's logprobs with logprobs; max_tokens=0 scores the prompt whatever it shows
    prompt_logprobs = (shown or 0) if choices.echo and (shown is not None or max_tokens == 0) else None
    try:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature),
                                top_k=max(request.top_k or 0, 0), top_p=1.0 if request.top_p is None else request.top_p,
                                seed=request.seed, stop=tuple(request.stop or ()),
                                stop_token_ids=tuple(eos_token_ids), ignore_eos=bool(request.ignore_eos),
                                logprobs=logprobs, logit_bias=_logit_bias(request.logit_bias, vocab_size),
                                prompt_logprobs=prompt_logprobs)
    except ValueError as exc:  # the models above should make this unreachable; never a 500 for bad input
        raise bad_request(str(exc)) from None
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    echo_text = _echo_text(request, prompt_ids, tokenizer) if choices.echo else ""
    return GenerationRequest(prompt_ids, params, is_chat, bool(request.stream), include_usage,
                             bool(request.return_token_ids), n=choices.n, best_of=choices.best_of, echo=choices.echo,
                             logprobs=shown, prompt_text=echo_text)


def _echo_text(request, prompt_ids: list[int], tokenizer) -> str:
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)


@dataclass
class _Choices:
    n: int
    best_of: int
    echo: bool


def _choices(request, is_chat: bool) -> _Choices:
    """n, best_of and echo, checked together: best_of >= n, and not streamed when best_of > n (the choices are
    picked at the end)."""
    n = request.n or 1
    best_of = n if is_chat or request.best_of is None else request.best_of
    if best_of < n:
        raise bad_request(f"best_of ({best_of}) must be >= n ({n})", param="best_of")
    if best_of > n and request.stream:
        raise bad_request(f"best_of ({best_of}) > n ({n}) cannot be streamed: the best choices are known at the end",
                          param="best_of")
    return _Choices(n, best_of, not is_chat and bool(request.echo))


def _num_logprobs(request, is_chat: bool) -> int | None:
    """Alternatives per token the answer carries: None for no logprobs (chat: top_logprobs with logprobs=true)."""
    if not is_chat:
        return request.logprobs
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    return (request.top_logprobs or 0) if request.logprobs else None


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} as {token id: bias}; 400 naming a key that is not a token id or a bias out of
    [-100, 100]."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        token = int(key) if key.isascii() and key.isdigit() and len(key) < 12 else None
        if token is None or token >= vocab_size:
            raise bad_request(f"logit_bias key {json.dumps(key)[:40]} is not a token id in [0, {vocab_size})",
                              param="logit_bias")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias[{key}]={value} is outside [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]",
                              param="logit_bias")
        out[token] = float(value)
    return out


def json_excerpt(value) -> str:
    """A parsed JSON value as a short one-line excerpt for an error message."""
    return json.dumps(value)[:100]


def model_ids(url: str, status: int, body: bytes) -> list[str]:
    """The model ids of a `/v1/models` answer from `url`; ServerError naming `url` for an error status or a
    body that is not OpenAI's {"data": [{"id": ...}, ...]}."""
    if status != 200:
        raise ServerError(f"{url}: {error_message(status, body)}")
    try:
        listing = json.loads(body)
    except (ValueError, RecursionError):
        raise ServerError(f"{url}: the answer is not JSON: {body[:100]!r}") from None
    if isinstance(listing, dict) and listing.get("data") is None:
        return []
    models = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in models):
        raise ServerError(f'{url}: expected {{"data": [{{"id": ...}}, ...]}}, got {json_excerpt(listing)}')
    return [m["id"] for m in models]


__all__ = ["REPLICA_HEADER", "DEFAULT_COMPLETION_MAX_TOKENS", "DEFAULT_CHAT_MAX_TOKENS", "ENDPOINTS",
           "NO_OP_PARAMS", "CHAT_NO_OP_PARAMS", "COMPLETION_NO_OP_PARAMS", "MAX_N", "MAX_TOP_LOGPROBS",
           "MAX_LOGIT_BIAS", "CHAT_ROLES", "StreamOptions", "ChatMessage", "CompletionRequest", "ChatCompletionRequest",
           "validate_body", "APIError", "bad_request", "ServerError", "error_message", "MAX_JSON_DEPTH",
           "parse_json_object", "GenerationRequest", "parse_generation_request", "json_excerpt", "model_ids"]
