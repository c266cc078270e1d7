"""OpenAI request validation and bodies, without a server: default lengths, template errors, events that the
client side parses back."""

import copy
import json

import pytest

from labkit.serving.events import DONE, chunk_text, read_events
from labkit.serving.protocol import (DEFAULT_COMPLETION_MAX_TOKENS, MAX_JSON_DEPTH, APIError, error_message,
                                     parse_generation_request, parse_json_object, validate_body)
from labkit.serving.responses import Reply

CONTEXT = 2048  # tiny-smollm2's


def _parse(tiny, body: dict, is_chat: bool, **kwargs):
    return parse_generation_request(body, is_chat=is_chat, tokenizer=tiny.tokenizer, eos_token_ids=(2,),
                                    max_seq_len=CONTEXT, vocab_size=tiny.model.config.vocab_size, **kwargs)


def test_default_reply_length_is_clipped_to_the_room_left(tiny):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert _parse(tiny, chat, True, default_max_tokens=40).params.max_new_tokens == 40
    assert _parse(tiny, {"prompt": "hi"}, False).params.max_new_tokens == DEFAULT_COMPLETION_MAX_TOKENS
    long = {"messages": [{"role": "user", "content": "word " * 2000}]}
    req = _parse(tiny, long, True, default_max_tokens=512)
    assert req.params.max_new_tokens == CONTEXT - len(req.prompt_ids) < 512
    near_end = {"prompt": list(range(CONTEXT - 3))}
    assert _parse(tiny, near_end, False).params.max_new_tokens == 3
    with pytest.raises(APIError) as caught:  # an explicit length is never clipped silently
        _parse(tiny, {**near_end, "max_tokens": 4}, False)
    assert (caught.value.status, caught.value.code) == (400, "context_length_exceeded")


def test_chat_template_errors_are_400_and_template_bugs_are_not(tiny):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    rejecting = copy.deepcopy(tiny.tokenizer)
    rejecting.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(APIError) as caught:
        parse_generation_request(chat, is_chat=True, tokenizer=rejecting, eos_token_ids=(), max_seq_len=CONTEXT,
                                 vocab_size=100)
    assert caught.value.status == 400 and "roles must alternate" in caught.value.message
    broken = copy.deepcopy(tiny.tokenizer)
    broken.chat_template = "{{ 1 // 0 }}"  # the server's own template is wrong: not the request's fault
    with pytest.raises(ZeroDivisionError):
        parse_generation_request(chat, is_chat=True, tokenizer=broken, eos_token_ids=(), max_seq_len=CONTEXT,
                                 vocab_size=100)


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000,  # past the parser's recursion limit
                                 b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                 b'{"n": ' + b'{"a": ' * MAX_JSON_DEPTH + b"1" + b"}" * MAX_JSON_DEPTH + b"}"])
def test_deeply_nested_bodies_are_400(raw):
    with pytest.raises(APIError) as caught:
        parse_json_object(raw)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")


def test_bodies_up_to_the_depth_limit_parse():
    nested = b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1)
    assert parse_json_object(b'{"a": ' + nested + b"}")["a"] is not None
    assert parse_json_object(b'{"prompt": [1, 2, 3], "stop": ["x"]}') == {"prompt": [1, 2, 3], "stop": ["x"]}


@pytest.mark.parametrize("body, is_chat, param", [
    ({"prompt": "hi \ud800"}, False, "prompt"),
    ({"prompt": ["hi \udfff"]}, False, "prompt"),
    ({"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "\ud800"}]}, True,
     "messages[1].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]}, True, "messages[0].content"),
])
def test_lone_surrogates_are_400_naming_the_field(tiny, body, is_chat, param):
    with pytest.raises(APIError) as caught:
        _parse(tiny, body, is_chat)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert "surrogate" in caught.value.message


def test_tiny_temperatures_are_accepted(tiny):
    params = _parse(tiny, {"prompt": "hi", "temperature": 1e-40}, False).params
    assert params.is_greedy


@pytest.mark.parametrize("is_chat", [False, True])
def test_events_parse_back_on_the_client_side(is_chat):
    reply = Reply("m", is_chat, return_token_ids=True, include_usage=True)
    events = ([reply.role_event()] if is_chat else []) + [reply.delta_event("Hel", None, [1]),
                                                          reply.delta_event("lo", "stop", [2, 3]),
                                                          reply.usage_event(4, 3), "data: [DONE]\n\n"]
    parsed = list(read_events(events))
    assert parsed[-1] is DONE
    chunks = [chunk_text(p, is_chat) for p in parsed[:-1]]
    assert "".join(text for text, _, _ in chunks) == "Hello"
    assert [ids for _, ids, _ in chunks if ids] == [[1], [2, 3]]
    assert [reason for _, _, reason in chunks if reason] == ["stop"]
    assert parsed[-2]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert all(p["usage"] is None for p in parsed[:-2]) and len({p["id"] for p in parsed[:-1]}) == 1
    whole = reply.response("Hello", "stop", [1, 2, 3], num_prompt=4)
    assert whole["object"] == ("chat.completion" if is_chat else "text_completion")
    assert whole["usage"]["total_tokens"] == 7 and whole["choices"][0]["token_ids"] == [1, 2, 3]


def test_error_bodies_read_back_as_one_line():
    error = APIError(429, "busy", type="rate_limit_exceeded", code="queue_full")
    assert error_message(429, json.dumps(error.body()).encode()) == "HTTP 429: busy"
    assert error_message(502, b"<html>bad gateway</html>") == "HTTP 502: <html>bad gateway</html>"


@pytest.mark.parametrize("body, param, code", [
    ({"prompt": "hi", "max_tokens": "3"}, "max_tokens", None),  # strict: JSON's "3" is not 3
    ({"prompt": "hi", "temperature": float("inf")}, "temperature", None),  # json.loads takes Infinity
    ({"prompt": "hi", "ignore_eos": 1}, "ignore_eos", None),  # 1 is not true
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x",
     "unsupported_parameter"),
    ({"prompt": "hi", "suffix": "x"}, "suffix", "unsupported_parameter"),
    ({}, "prompt", "missing_required_parameter"),
])
def test_request_models_name_the_field_and_code(body, param, code):
    with pytest.raises(APIError) as caught:
        validate_body(body, is_chat=False)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, param, code)
    assert param in caught.value.message


def test_chat_messages_are_validated_into_models():
    request = validate_body({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                             {"type": "text", "text": "b"}]}],
                             "stop": "x"}, is_chat=True)
    assert request.messages[0].content == "ab" and request.stop == ["x"]
    with pytest.raises(APIError) as caught:
        validate_body({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                      is_chat=True)
    assert (caught.value.param, caught.value.code) == ("messages[0].content", "unsupported_parameter")
