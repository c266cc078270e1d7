"""The router's splice of a cut stream (plain Python, the embedded tokenizer): what the client is sent, the
request that resumes it, and the continuation's text decoded as one uncut stream's; and `return_token_ids`'
`prompt_token_ids` on labkit serve's answers."""

import json

import httpx
import pytest

from labkit.engine.engine import Engine
from labkit.engine.text import IncrementalDetokenizer, encode_prompt
from labkit.serving.app import create_app
from labkit.serving.events import SSEReader
from labkit.serving.responses import Reply
from labkit.serving.router_stream import StreamCut, StreamSplice, is_resumable
from labkit.serving.server import ServerThread


def _datas(events):
    reader = SSEReader()
    return [d for e in events for d in reader.feed(e)]


def _replica_events(tokenizer, ids, is_chat, prompt_ids, stops=(), per_chunk=1, finish="length"):
    """What labkit serve streams for these generated ids (with return_token_ids), one data string per event."""
    reply = Reply("m", is_chat, return_token_ids=True, prompt_token_ids=prompt_ids)
    detok, events = IncrementalDetokenizer(tokenizer, stops), [reply.role_event()] if is_chat else []
    for start in range(0, len(ids), per_chunk):
        piece = "".join(detok.add(t) for t in ids[start:start + per_chunk])
        last = start + per_chunk >= len(ids)
        events.append(reply.delta_event(piece + (detok.flush() if last else ""), finish if last else None,
                                        ids[start:start + per_chunk]))
    return _datas(events + ["data: [DONE]\n\n"])


def _client_text(events, is_chat):
    out = []
    for data in _datas(events):
        if data.strip() == "[DONE]":
            continue
        chunk = json.loads(data)
        for choice in chunk["choices"]:
            out.append((choice.get("delta") or {}).get("content") or "" if is_chat else choice["text"])
    return "".join(out)


@pytest.mark.parametrize("is_chat", [False, True])
@pytest.mark.parametrize("wants_ids", [False, True])
def test_splice_strips_token_ids_unless_asked_and_records_them(tiny, is_chat, wants_ids):
    ids = tiny.tokenizer("Hello there, friend", add_special_tokens=False)["input_ids"]
    body = {"stream": True, "max_tokens": 10, **({"return_token_ids": True} if wants_ids else {})}
    splice = StreamSplice(body, is_chat)
    sent = [e for data in _replica_events(tiny.tokenizer, ids, is_chat, [1, 2, 3]) for e in splice.relay(data)]
    chunks = [json.loads(d) for d in _datas(sent) if d != "[DONE]"]
    assert splice.is_done and splice.token_ids == ids and splice.prompt_ids == [1, 2, 3]
    assert splice.num_chars == len("Hello there, friend") == len(_client_text(sent, is_chat))
    has_ids = any("token_ids" in c["choices"][0] for c in chunks)
    has_prompt = any("prompt_token_ids" in c or "prompt_token_ids" in c["choices"][0] for c in chunks)
    assert has_ids == has_prompt == wants_ids


def test_a_chat_stream_resumes_as_a_completion_over_its_prompt_ids():
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10, "temperature": 0,
            "stream_options": {"include_usage": True}, "stop": ["x"], "ignore_eos": True}
    splice = StreamSplice(body, is_chat=True)
    splice.relay(json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                             "prompt_token_ids": [5, 6], "choices": [{"index": 0, "delta": {"content": "ab"},
                                                                      "token_ids": [7, 8], "finish_reason": None}]}))
    assert splice.can_resume and splice.num_left == 8
    resumed = json.loads(splice.resume_body())
    assert resumed == {"prompt": [5, 6, 7, 8], "max_tokens": 8, "stream": True, "return_token_ids": True,
                       "temperature": 0, "stop": ["x"], "ignore_eos": True}
    assert "max_tokens" not in json.loads(splice.resume_body(with_limit=False))


@pytest.mark.parametrize("body, expected", [
    ({"stream": True}, True), ({"stream": True, "n": 1, "logprobs": False, "echo": False}, True),
    ({"stream": False}, False), ({"stream": True, "n": 2}, False), ({"stream": True, "logprobs": 1}, False),
    ({"stream": True, "logprobs": True}, False), ({"stream": True, "echo": True}, False),
    ({"stream": True, "n": True}, False)])
def test_only_single_choice_streams_without_logprobs_resume(body, expected):
    assert is_resumable(body) is expected


def test_a_server_error_event_cuts_the_stream_and_a_client_error_passes():
    splice = StreamSplice({"stream": True}, is_chat=False)
    with pytest.raises(StreamCut, match="shutting down"):
        splice.relay(json.dumps({"error": {"message": "the server is shutting down", "type": "server_error"}}))
    assert splice.relay(json.dumps({"error": {"message": "bad", "type": "invalid_request_error"}}))


@pytest.mark.parametrize("is_chat", [False, True])
@pytest.mark.parametrize("text, stops", [("Café 🙂 au lait, déjà vu 😀!", ()), ("one two\n\nthree", ("\n\n",))])
def test_a_resumed_stream_has_the_text_of_one_uncut_stream(tiny, is_chat, text, stops):
    """Every cut point: a character split across the cut, a stop string spanning it. The continuation's replica
    decodes its tokens alone (so its own text is wrong there); the router decodes after the streamed ones."""
    tok = tiny.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    whole, pieces = IncrementalDetokenizer(tok, stops), []
    for stop_at, token_id in enumerate(ids, 1):  # the engine's text: up to a stop string, or all of it
        pieces.append(whole.add(token_id))
        if whole.stopped:
            break
    expected = "".join(pieces) + whole.flush()
    assert expected == (text.split("\n\n")[0] if stops else text)
    body = {"stream": True, "max_tokens": len(ids) + 5, "stop": list(stops), "stream_options": {"include_usage": True}}
    for cut in range(1, stop_at):
        splice = StreamSplice(body, is_chat, tokenizer=tok)
        first = _replica_events(tok, ids, is_chat, [1], stops)[: cut + is_chat]  # cut after `cut` tokens
        sent = [e for data in first for e in splice.relay(data)]
        assert splice.can_resume and not splice.is_done
        assert json.loads(splice.resume_body())["prompt"] == [1, *ids[:cut]]
        splice.start_resume()
        rest = _replica_events(tok, ids[cut:], False, [1, *ids[:cut]], per_chunk=2)
        for data in rest:
            sent += splice.relay(data)
            if splice.is_done:
                break
        assert _client_text(sent, is_chat) == expected, f"cut after {cut} tokens"
        assert splice.token_ids == ids[:stop_at] and splice.finish_reason == ("stop" if stops else "length")
        datas = _datas(sent)
        assert datas.count("[DONE]") == 1 and datas[-1] == "[DONE]"
        assert json.loads(datas[-2])["usage"]["completion_tokens"] == stop_at
        chunks = [json.loads(d) for d in datas[:-1]]
        assert len({c["id"] for c in chunks}) == 1
        assert {c["object"] for c in chunks} == {"chat.completion.chunk" if is_chat else "text_completion"}


# -- return_token_ids on labkit serve: token ids on every chunk, the prompt's once ----------------------------
@pytest.fixture(scope="module")
def server(tiny):
    with ServerThread(create_app(Engine.from_hf(tiny.model, tiny.tokenizer, name="tiny"))) as s:
        yield s


@pytest.mark.parametrize("is_chat", [False, True])
def test_return_token_ids_sends_the_prompt_ids_once(server, tiny, is_chat):
    path = "/v1/chat/completions" if is_chat else "/v1/completions"
    prompt = {"messages": [{"role": "user", "content": "Hi"}]} if is_chat else {"prompt": "Hello there"}
    expected = encode_prompt(tiny.tokenizer, [{"role": "user", "content": "Hi"}] if is_chat else "Hello there",
                             chat=is_chat)
    body = {**prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    whole = httpx.post(server.url + path, json=body, trust_env=False).json()
    assert (whole if is_chat else whole["choices"][0])["prompt_token_ids"] == list(expected)
    assert len(whole["choices"][0]["token_ids"]) == 4
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, trust_env=False) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    carriers = [c for c in chunks if "prompt_token_ids" in c or "prompt_token_ids" in c["choices"][0]]
    assert carriers == chunks[:1]  # the first chunk only
    assert (chunks[0] if is_chat else chunks[0]["choices"][0])["prompt_token_ids"] == list(expected)
    plain = httpx.post(server.url + path, json={**body, "return_token_ids": False}, trust_env=False).json()
    assert "prompt_token_ids" not in plain and "prompt_token_ids" not in plain["choices"][0]
