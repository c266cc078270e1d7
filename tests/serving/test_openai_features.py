"""OpenAI's n, best_of, logprobs, top_logprobs, echo, logit_bias and seed through `labkit serve`: logprobs equal
the model's own log_softmax, echo with max_tokens=0 scores the prompt (as lm-evaluation-harness asks), n choices
share the prompt's KV blocks, seeded choices repeat, and bad values are 400s naming the field."""

import asyncio
import json

import httpx
import pytest
import torch

from labkit.engine.engine import Engine
from labkit.model.llama import from_hf
from labkit.model.rewrites import apply_rewrites
from labkit.serving import ServerThread, create_app
from labkit.serving.events import DONE, read_events

PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_hf(tiny.model, tiny.tokenizer, name="tiny-smollm2")


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, served_model_name="tiny")) as running:
        yield running


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
        yield client


def _post(http, path: str, body: dict) -> dict:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _stream(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        events = list(read_events(response.iter_bytes()))
    assert events[-1] is DONE
    return events[:-1]


def _hf_logprobs(tiny, ids: list[int]) -> torch.Tensor:
    """log_softmax of the HF model's own logits at every position [T, V], computed directly."""
    with torch.no_grad():
        return torch.log_softmax(tiny.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completion_logprobs_are_the_models_log_softmax(tiny, engine, http):
    body = {"prompt": PROMPT, "max_tokens": 5, "logprobs": 3, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    choice = _post(http, "/v1/completions", body)["choices"][0]
    prompt, tokens, lp = engine.encode(PROMPT), choice["token_ids"], choice["logprobs"]
    ref = _hf_logprobs(tiny, prompt + tokens)
    want = [ref[len(prompt) - 1 + j, t].item() for j, t in enumerate(tokens)]
    assert lp["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert lp["tokens"] == [tiny.tokenizer.decode([t]) for t in tokens]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:j]) for j in range(len(tokens))]
    for j, top in enumerate(lp["top_logprobs"]):
        best = torch.topk(ref[len(prompt) - 1 + j], 3)
        expected = {tiny.tokenizer.decode([t]): v for t, v in zip(best.indices.tolist(), best.values.tolist())}
        expected.setdefault(lp["tokens"][j], want[j])  # the chosen token too, as vLLM
        assert top == pytest.approx(expected, abs=1e-4)
    # the stream carries the same logprobs, chunk by chunk
    streamed = [e["choices"][0]["logprobs"] for e in _stream(http, "/v1/completions", body) if e["choices"]]
    assert sum((s["token_logprobs"] for s in streamed if s), []) == pytest.approx(want, abs=1e-6)
    assert sum((s["text_offset"] for s in streamed if s), []) == lp["text_offset"]


def test_chat_logprobs_have_openais_shape(tiny, engine, http):
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "logprobs": True,
            "top_logprobs": 2, "ignore_eos": True, "return_token_ids": True}
    choice = _post(http, "/v1/chat/completions", body)["choices"][0]
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [tiny.tokenizer.decode([t]) for t in choice["token_ids"]]
    prompt = engine.encode([{"role": "user", "content": "Name a colour."}], chat=True)
    ref = _hf_logprobs(tiny, prompt + choice["token_ids"])
    for j, (c, t) in enumerate(zip(content, choice["token_ids"])):
        assert c["logprob"] == pytest.approx(ref[len(prompt) - 1 + j, t].item(), abs=1e-4)
        assert bytes(c["bytes"]).decode() == c["token"] and len(c["top_logprobs"]) == 2
        assert set(c["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    without = _post(http, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert without["choices"][0]["logprobs"] is None


def test_echo_with_max_tokens_zero_scores_the_prompt(tiny, engine, http):
    prompt = engine.encode(PROMPT)
    for sent in (PROMPT, prompt):  # text, and token ids as lm-evaluation-harness sends them
        out = _post(http, "/v1/completions", {"prompt": sent, "echo": True, "logprobs": 1, "max_tokens": 0})
        choice = out["choices"][0]
        assert choice["text"] == PROMPT and out["usage"]["completion_tokens"] == 0
        token_logprobs = choice["logprobs"]["token_logprobs"]
        assert token_logprobs[0] is None and len(token_logprobs) == len(prompt)
        ref = _hf_logprobs(tiny, prompt)
        assert token_logprobs[1:] == pytest.approx([ref[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)],
                                                   abs=1e-4)
    # echo with generation: the prompt's logprobs, then the new tokens'; the text starts with the prompt
    out = _post(http, "/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 3,
                                          "temperature": 0, "ignore_eos": True})
    choice = out["choices"][0]
    assert choice["text"].startswith(PROMPT) and len(choice["logprobs"]["tokens"]) == len(prompt) + 3
    streamed = _stream(http, "/v1/completions", {"prompt": PROMPT, "echo": True, "max_tokens": 3, "temperature": 0,
                                                 "ignore_eos": True})
    assert "".join(e["choices"][0]["text"] for e in streamed if e["choices"]) == choice["text"]


def test_greedy_n_gives_identical_choices_sharing_the_prompts_blocks(tiny):
    engine = Engine.from_hf(tiny.model, tiny.tokenizer, block_size=16)
    prompt = engine.encode(PROMPT * 3)  # several full blocks
    with ServerThread(create_app(engine, served_model_name="tiny")) as server:
        out = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "n": 4, "max_tokens": 5,
                                                               "temperature": 0, "ignore_eos": True}, timeout=60).json()
        hits = engine.blocks.num_hit_tokens
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3] and len(set(texts)) == 1
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 20, "total_tokens": len(prompt) + 20}
    # the three later choices found every full block before the prompt's last token in the prefix cache
    assert hits == 3 * ((len(prompt) - 1) // 16) * 16


def test_seeded_sampled_choices_repeat_and_differ(http):
    body = {"prompt": PROMPT, "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 7, "ignore_eos": True,
            "logprobs": 0}
    first, again = (_post(http, "/v1/completions", body) for _ in range(2))
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]] and len(set(texts)) == 3
    # best_of=3, n=1 generates the same three choices and returns the one of highest cumulative logprob
    cumulative = [sum(c["logprobs"]["token_logprobs"]) for c in first["choices"]]
    best = _post(http, "/v1/completions", {**body, "n": 1, "best_of": 3, "logprobs": None})
    assert [c["text"] for c in best["choices"]] == [texts[cumulative.index(max(cumulative))]]
    assert best["choices"][0]["logprobs"] is None and best["usage"]["completion_tokens"] == 24


def test_a_seeded_request_repeats_whatever_shares_its_batch(server, http):
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    alone = _post(http, "/v1/completions", body)["choices"][0]["text"]

    async def crowd():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, trust_env=False) as client:
            others = [client.post("/v1/completions", json={**body, "seed": None, "prompt": f"Other {i}."})
                      for i in range(3)]
            answers = await asyncio.gather(client.post("/v1/completions", json=body), *others)
        return answers[0].json()["choices"][0]["text"]

    assert asyncio.run(crowd()) == alone


def test_streamed_choices_interleave_with_their_index_and_usage_counts_all(http):
    events = _stream(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2,
                                                    "max_tokens": 4, "temperature": 1.0, "seed": 1,
                                                    "ignore_eos": True, "stream_options": {"include_usage": True}})
    texts, finishes = {0: "", 1: ""}, {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {0: "length", 1: "length"} and all(texts.values())
    assert events[-1]["usage"]["completion_tokens"] == 8


def test_logit_bias_forces_a_token(tiny, http):
    forced = tiny.tokenizer.encode(" blue")[0]
    for temperature in (0, 1.0):
        out = _post(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": temperature,
                                              "logit_bias": {str(forced): 100}, "return_token_ids": True,
                                              "ignore_eos": True})
        assert out["choices"][0]["token_ids"] == [forced] * 3


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": "x"}}, "logit_bias.5"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "best_of": 2}, "best_of"),
])
def test_bad_values_are_400s_naming_the_field(http, path, body, param):
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# -- lm-evaluation-harness's loglikelihood, over the OpenAI completions API ---------------------------------------
ITEMS = [  # (context, continuations): hand-written multiple choice
    ("Question: What colour is the sky on a clear day?\nAnswer:", [" blue", " green", " red"]),
    ("Question: How many legs does a spider have?\nAnswer:", [" six", " eight", " four"]),
    ("The opposite of hot is", [" cold", " warm", " loud"]),
]


def _loglikelihood_over_http(http, engine, context: str, continuation: str, **extra) -> float:
    """As lm-eval 0.4.13's `local-completions` model: token ids of context + continuation, echo=true, logprobs=1,
    max_tokens=1, temperature 0; the continuation's logprob is token_logprobs[ctxlen:-1] summed (the last entry
    is the generated token's, a stop token's included)."""
    ctx = engine.encode(context)
    whole = ctx + engine.encode(context + continuation)[len(ctx):]
    out = _post(http, "/v1/completions", {"model": "tiny", "prompt": [whole], "temperature": 0, "max_tokens": 1,
                                          "logprobs": 1, "seed": 1234, "echo": True, **extra})
    logprobs = sorted(out["choices"], key=lambda c: c["index"])[0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(whole) + 1
    assert all(max(top.values()) >= lp for lp, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]))
    return sum(logprobs["token_logprobs"][len(ctx):-1])


def _loglikelihood_direct(engine, context: str, continuation: str) -> float:
    ctx = engine.encode(context)
    whole = ctx + engine.encode(context + continuation)[len(ctx):]
    logp = torch.log_softmax(engine.prompt_logits(whole).float(), dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_multiple_choice_scored_like_lm_eval_matches_the_engines_own_scoring(http, engine):
    served = [[_loglikelihood_over_http(http, engine, c, a) for a in answers] for c, answers in ITEMS]
    direct = [[_loglikelihood_direct(engine, c, a) for a in answers] for c, answers in ITEMS]
    for over_http, own in zip(served, direct):
        assert over_http == pytest.approx(own, abs=1e-3)
        assert over_http.index(max(over_http)) == own.index(max(own))
    # a context whose next token is a stop token (EOS, forced here) still gets its entry: [ctxlen:-1] stays right
    context, answers = ITEMS[0]
    eos = {str(engine.eos_token_ids[0]): 100}
    assert _loglikelihood_over_http(http, engine, context, answers[0], logit_bias=eos) == pytest.approx(direct[0][0],
                                                                                                      abs=1e-3)


def test_int8_server_logprobs_are_its_models_own(tiny):
    engine = Engine(apply_rewrites(from_hf(tiny.model), quantize="int8"), tiny.tokenizer, name="tiny-int8")
    prompt = engine.encode(PROMPT)
    with ServerThread(create_app(engine, served_model_name="tiny")) as server:
        body = {"prompt": prompt, "max_tokens": 4, "echo": True, "logprobs": 1, "ignore_eos": True,
                "return_token_ids": True}
        choice = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    ids = prompt + choice["token_ids"]
    ref = torch.log_softmax(engine.prompt_logits(ids).float(), dim=-1)  # the quantized model over the whole text
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [ref[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)
    assert json.dumps(choice)  # plain JSON: no NaN or infinity
