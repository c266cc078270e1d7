"""The public model runner: one return type, typed rows, one slot formula, blocks given back."""

import dataclasses

import pytest
import torch

from labkit.engine.config import EngineConfig
from labkit.engine.model_runner import ForwardOutput, ModelRunner, RowSpan, slot_of
from labkit.model.llama import from_hf


@pytest.fixture(scope="module")
def runner(tiny):
    return ModelRunner(from_hf(tiny.model), EngineConfig(block_size=4, num_kv_blocks=16))


def test_slot_of_is_block_then_offset():
    table = [3, 7, 1]
    assert [slot_of(table, p, 4) for p in (0, 3, 4, 9)] == [12, 15, 28, 5]


def test_row_span_is_a_typed_record():
    row = RowSpan("a", [5, 6, 7, 8], start=1, length=2)
    assert (row.end, row.new_token_ids) == (3, [6, 7])
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.start = 0


def test_forward_returns_one_type_whatever_is_asked(runner):
    ids = list(range(3, 13))
    assert runner.reserve("r", len(ids))
    try:
        with torch.inference_mode():
            vocab, dim = runner.model.args.vocab_size, runner.model.args.dim
            plain = runner.forward([RowSpan("r", ids, 0, 6)], [0])
            assert isinstance(plain, ForwardOutput) and plain.hidden is None
            assert plain.logits.shape == (1, vocab)
            verify = runner.forward([RowSpan("r", ids, 6, 4)], [0], num_logits=[3], return_hidden=True)
            assert isinstance(verify, ForwardOutput) and verify.logits.shape == (3, vocab)
            assert verify.hidden.shape == (4, dim)
    finally:
        runner.release("r")
    assert runner.blocks.num_used_blocks == 0
    whole = runner.prompt_logits(ids)  # the same tokens in one pass: the chunked rows' logits match
    torch.testing.assert_close(plain.logits[0], whole[5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(verify.logits, whole[7:10], atol=1e-5, rtol=1e-5)


def test_reserve_keeps_a_prefix_and_release_frees_everything(runner):
    assert runner.reserve("d", 9)
    first = runner.blocks.block_table("d")
    assert runner.reserve("d", 12, keep=4)  # the first block kept, room made for 12 tokens
    assert runner.blocks.block_table("d")[0] == first[0] and len(runner.blocks.block_table("d")) == 3
    runner.release("d")
    runner.release("d")  # twice is harmless
    assert runner.blocks.num_used_blocks == 0
    runner.blocks.check()
