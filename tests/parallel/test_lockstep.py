"""Lockstep in one process: rank 0's LockstepEngine records adds and aborts; a second engine that replays them
step by step holds the same requests and gives the same outputs (what every other rank of a TP server does), and
the group's digest check turns a drift into one failure. Real engines over the tiny model, no process group."""

import pytest

from labkit.engine import EngineConfig
from labkit.engine.engine import Engine
from labkit.model.sampling import SamplingParams
from labkit.parallel.lockstep import AbortRequest, AddRequest, LockstepEngine, digest, replay, with_seed
from labkit.parallel.serve import RankGroup, RankSpec, check_spec


class Recorder:
    """A Channel that keeps what rank 0 sent and its digests."""

    def __init__(self):
        self.sent, self.digests, self.failures = [], [], []
        self.failure = None

    def send(self, inputs):
        self.sent.append(inputs)

    def record(self, rank, number, step_digest):
        self.digests.append((number, step_digest))

    def fail(self, message):
        self.failures.append(message)
        self.failure = self.failure or message


def _engine(tiny, **config):
    return Engine.from_hf(tiny.model, tiny.tokenizer, name="tiny-smollm2", num_kv_blocks=64, max_num_seqs=2,
                          **config)


def test_a_replaying_engine_gives_rank_0s_outputs_step_by_step(tiny):
    channel = Recorder()
    driver, follower = LockstepEngine(_engine(tiny), channel), _engine(tiny)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=9, temperature=0.9, ignore_eos=True)  # no seed: rank 0 draws one
    driver.add_request([5, 17, 42, 7], greedy, request_id="a")
    driver.add_request([400, 2, 9], sampled, request_id="b")
    driver.add_request([3, 3, 3, 3, 3], greedy, request_id="c")  # waits: 2 rows a step
    with pytest.raises(ValueError, match="exceeds the model's context"):  # refused on rank 0: never sent
        driver.add_request([1], SamplingParams(max_new_tokens=10 ** 6), request_id="d")
    steps = 0
    while driver.has_unfinished:
        if steps == 2:
            assert driver.abort("b") and not driver.abort("b")  # an abort is sent once
        outputs = driver.step()
        assert digest(replay(follower, channel.sent[-1])) == digest(outputs)
        assert follower.running_request_ids() == driver.running_request_ids()
        steps += 1
    assert not follower.has_unfinished and follower.blocks.num_used_blocks == 0
    ops = [op for inputs in channel.sent for op in inputs.ops]
    assert [type(op) for op in ops] == [AddRequest, AddRequest, AddRequest, AbortRequest]
    assert [op.request_id for op in ops] == ["a", "b", "c", "b"]
    assert ops[1].params.seed is not None and ops[0].params.seed is None
    assert [inputs.number for inputs in channel.sent] == list(range(steps))
    assert [number for number, _ in channel.digests] == list(range(steps)) and not channel.failures


def test_with_seed_seeds_only_sampled_requests_without_one():
    greedy, seeded = SamplingParams(), SamplingParams(temperature=0.7, seed=4)
    assert with_seed(greedy) is greedy and with_seed(seeded) is seeded
    unseeded = SamplingParams(temperature=0.7)
    drawn = with_seed(unseeded)
    assert drawn.seed is not None and unseeded.seed is None  # a copy: the request's own params are not changed


def test_a_failed_step_on_rank_0_fails_the_group(tiny):
    channel = Recorder()
    driver = LockstepEngine(_engine(tiny), channel)
    driver.add_request([5, 6], SamplingParams(max_new_tokens=2))

    def broken():
        raise RuntimeError("out of memory")

    driver.engine.step = broken
    with pytest.raises(RuntimeError, match="^rank 0 failed in step 0: RuntimeError: out of memory$"):
        driver.step()
    assert channel.failures == ["rank 0 failed in step 0: RuntimeError: out of memory"]


def test_the_group_compares_every_ranks_digest_of_a_step():
    failures = []
    group = RankGroup(RankSpec(world_size=3, model="tiny-smollm2", dummy=True), on_failure=failures.append)
    group.record(0, 0, (("a", (5,), None),))
    group.record(2, 0, (("a", (5,), None),))
    group.record(1, 1, (("a", (6,), None),))  # a rank may be a step ahead of rank 0's report
    assert not failures
    group.record(1, 0, (("a", (5,), None),))
    group.record(0, 1, (("a", (6,), None),))
    group.record(2, 1, (("a", (7,), "length"),))
    assert failures == ["ranks [2] computed other tokens than rank 0 in step 1: the ranks' logits differ, so the "
                        "server stops rather than serve them"]
    assert group.failure == failures[0]
    group.record(0, 2, ())  # one failure, one message
    group.fail("later")
    assert len(failures) == 1


@pytest.mark.parametrize("spec, message", [
    (RankSpec(world_size=3, model="tiny-smollm2", dummy=True), r"cannot be split over 3 ranks.*work: 1, 2, 4"),
    (RankSpec(world_size=2, model="tiny-smollm2", dummy=True, quantize="int4"), "--quantization int4 cannot be split"),
    (RankSpec(world_size=2, model="tiny-smollm2", dummy=True, device="mps"), "MPS is not available|not 'mps'"),
    (RankSpec(world_size=2, model="tiny-smollm2", dummy=True, engine_config=EngineConfig.from_kwargs(
        policy="dynamic")), "the dynamic policy waits on each rank's clock"),
])
def test_what_the_ranks_cannot_serve_is_refused_before_they_start(spec, message):
    with pytest.raises(ValueError, match=message):
        check_spec(spec)


def test_a_split_that_works_is_described():
    assert check_spec(RankSpec(world_size=2, model="tiny-smollm2", dummy=True)) == \
        "2 ranks, heads 2q/1kv + 2q/1kv (even)"
