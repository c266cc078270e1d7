"""Incremental detokenization: streamed pieces add up to the full decode; stop strings found where they end."""

import random

import pytest

from labkit.engine.text import IncrementalDetokenizer, cut_at_stop, held_back


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny.tokenizer


def stream(tokenizer, ids, stops=()):
    detok = IncrementalDetokenizer(tokenizer, stops)
    pieces = []
    for t in ids:
        pieces.append(detok.add(t))
        if detok.stopped:
            break
    else:
        pieces.append(detok.flush())
    return pieces, detok


@pytest.mark.parametrize("text", ["Hello, world! How are you today?", "naïve café — 日本語のテキスト 🙂🙃 done",
                                  "def f(x):\n    return x ** 2\n\n\nprint(f(3))"])
def test_pieces_add_up_to_the_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == detok.text
    assert all("\ufffd" not in p for p in pieces)  # a multi-byte character is never split across pieces


def test_random_token_runs_match_the_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        pieces, _ = stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_the_text_and_holds_back_its_prefix(tokenizer):
    ids = tokenizer("The answer is 42. END of story", add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, ids, stops=("END",))
    assert detok.stopped and "".join(pieces) == "The answer is 42. "
    # no piece ever showed text that later turned out to be the stop string
    shown = ""
    for p in pieces:
        shown += p
        assert "E" not in shown


def test_a_stop_string_split_across_tokens_is_found(tokenizer):
    text = "alpha beta gamma delta"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, ids, stops=("ta gam",))
    assert detok.stopped and "".join(pieces) == "alpha be"


def test_helpers():
    assert cut_at_stop("abcXYdef", ["XY", "d"]) == "abc"
    assert cut_at_stop("abc", ["z"]) == "abc"
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("caf\ufffd", []) == 1
