"""The scheduler alone, driven by a model-free loop: limits, FCFS, chunked prefill, preemption, policies."""

import random

import pytest

from labkit.engine.block_manager import BlockManager
from labkit.model.sampling import SamplingParams
from labkit.engine.scheduler import Scheduler, SchedulerConfig, Sequence, Status


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make_seq(i: int, prompt_len: int, output_len: int, arrival: float = 0.0, prefix=()) -> Sequence:
    prompt = list(prefix) + [1000 + i * 7 + j for j in range(prompt_len - len(prefix))]
    return Sequence(str(i), prompt, SamplingParams(max_new_tokens=output_len), arrival)


def run(scheduler: Scheduler, seqs, arrivals=None, clock=None, max_steps=10_000):
    """Drive the scheduler like the engine does, checking its promises after every step."""
    config, blocks = scheduler.config, scheduler.blocks
    pending = sorted(seqs, key=lambda s: s.arrival_s)
    admitted, steps = [], []
    for _ in range(max_steps):
        if clock is not None:
            while pending and pending[0].arrival_s <= clock.now:
                scheduler.add(pending.pop(0))
        elif pending:
            for s in pending:
                scheduler.add(s)
            pending = []
        if not scheduler.has_unfinished and not pending:
            return admitted, steps
        batch = scheduler.schedule()
        if clock is not None:
            clock.now += 0.01
        if batch is None:
            continue
        assert len(batch.seqs) <= config.max_num_seqs and len(scheduler.active_seqs()) <= config.max_num_seqs
        if config.policy == "continuous":
            assert batch.num_tokens <= config.max_num_batched_tokens
        assert blocks.num_used_blocks <= blocks.num_blocks
        blocks.check()
        for s in batch.seqs:
            if s not in admitted:
                admitted.append(s)
        steps.append([(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)])
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            assert s.status is Status.RUNNING
            assert len(blocks.block_table(s.request_id)) * blocks.block_size >= s.num_computed_tokens + n
            s.num_computed_tokens += n
            blocks.cache_blocks(s.request_id, s.token_ids, s.num_computed_tokens)
            if s.num_computed_tokens == s.num_tokens:  # sampled: a new token
                s.token_ids.append(1)
                if s.num_output_tokens == s.params.max_new_tokens:
                    scheduler.finish(s, "length")
    raise AssertionError("the run did not finish")


def workload(n=12, seed=0):
    rng = random.Random(seed)
    return [make_seq(i, rng.randint(3, 60), rng.choice([1, 2, 5, 30, 80])) for i in range(n)]


@pytest.mark.parametrize("policy", ["continuous", "static", "dynamic"])
def test_every_request_finishes_and_every_block_comes_back(policy):
    seqs = workload()
    blocks = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(policy=policy, max_num_seqs=4, max_num_batched_tokens=32,
                                          max_wait_s=0.0), blocks)
    admitted, _ = run(scheduler, seqs)
    assert all(s.is_finished and s.num_output_tokens == s.params.max_new_tokens for s in seqs)
    assert blocks.num_free_blocks == blocks.num_blocks
    assert [s.request_id for s in admitted] == [s.request_id for s in seqs]  # first come, first served


def test_continuous_chunks_long_prompts_while_decode_rows_keep_moving():
    blocks = BlockManager(num_blocks=128, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), blocks)
    short = make_seq(0, 4, 40)
    scheduler.add(short)
    scheduler.schedule()  # prefill of the short one
    short.num_computed_tokens = 4
    short.token_ids.append(1)
    long = make_seq(1, 100, 2)
    scheduler.add(long)
    chunks = []
    while long.num_computed_tokens < long.num_tokens:
        batch = scheduler.schedule()
        plan = dict(zip((s.request_id for s in batch.seqs), batch.num_new_tokens))
        assert plan["0"] == 1  # the decode row runs in every step of the long prefill
        chunks.append(plan["1"])
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            s.num_computed_tokens += n
        short.token_ids.append(1)
    assert chunks == [15] * 6 + [10]


def test_continuous_admits_as_soon_as_a_row_frees():
    blocks = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), blocks)
    seqs = [make_seq(0, 4, 1), make_seq(1, 4, 10), make_seq(2, 4, 10)]
    _, steps = run(scheduler, seqs)
    # request 0 leaves after its first step; request 2 joins in the second, while 1 keeps decoding
    assert {rid for rid, _ in steps[1]} == {"1", "2"}


def test_static_lets_nobody_join_a_running_batch():
    blocks = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(policy="static", max_num_seqs=2), blocks)
    seqs = [make_seq(0, 4, 1), make_seq(1, 4, 10), make_seq(2, 4, 10)]
    _, steps = run(scheduler, seqs)
    first_two = [s for s in steps if any(rid in ("0", "1") for rid, _ in s)]
    assert all("2" not in {rid for rid, _ in s} for s in first_two)
    assert len(steps) == 10 + 10  # the batch waits for its slowest request, then request 2 runs alone


def test_dynamic_waits_for_a_full_batch_or_the_deadline():
    clock = FakeClock()
    blocks = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(policy="dynamic", max_num_seqs=3, max_wait_s=0.1), blocks, clock=clock)
    scheduler.add(make_seq(0, 4, 2, arrival=0.0))
    assert scheduler.schedule() is None  # one request, young: wait
    clock.now = 0.05
    scheduler.add(make_seq(1, 4, 2, arrival=0.05))
    assert scheduler.schedule() is None
    clock.now = 0.1  # the oldest has waited max_wait_s: go with what is there
    batch = scheduler.schedule()
    assert [s.request_id for s in batch.seqs] == ["0", "1"]
    scheduler2 = Scheduler(SchedulerConfig(policy="dynamic", max_num_seqs=2, max_wait_s=10.0),
                           BlockManager(num_blocks=64, block_size=4), clock=FakeClock())
    for i in range(3):
        scheduler2.add(make_seq(i, 4, 2))
    assert [s.request_id for s in scheduler2.schedule().seqs] == ["0", "1"]  # full batch: no wait


def test_preemption_under_memory_pressure_recomputes_and_keeps_order():
    seqs = [make_seq(i, 10, 40) for i in range(6)]
    blocks = BlockManager(num_blocks=24, block_size=4)  # room for about two full sequences
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=64), blocks)
    admitted, _ = run(scheduler, seqs)
    assert scheduler.num_preemptions > 0
    assert all(s.is_finished for s in seqs) and blocks.num_free_blocks == blocks.num_blocks
    assert [s.request_id for s in admitted] == [str(i) for i in range(6)]
    # the oldest request is never the victim while younger ones run
    assert seqs[0].num_preemptions == 0


def test_preempted_requests_go_back_to_the_head_of_the_queue():
    blocks = BlockManager(num_blocks=6, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64), blocks)
    a, b, c = make_seq(0, 8, 20), make_seq(1, 8, 20), make_seq(2, 8, 20)
    for s in (a, b, c):
        scheduler.add(s)
    batch = scheduler.schedule()
    assert [s.request_id for s in batch.seqs] == ["0", "1", "2"]
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        s.token_ids.append(1)
    batch = scheduler.schedule()  # each needs a third block; only 0 free: the newest go back
    assert batch.preempted and batch.preempted[0] is c
    assert scheduler.queued_seqs()[0] is batch.preempted[-1]
    assert c.status is Status.WAITING and c.num_computed_tokens == 0 and c.output_ids == [1]


def test_shared_prefixes_are_computed_once():
    prefix = list(range(500, 532))  # 8 blocks of 4
    seqs = [make_seq(i, 40, 3, prefix=prefix) for i in range(4)]
    blocks = BlockManager(num_blocks=128, block_size=4)
    scheduler = Scheduler(SchedulerConfig(policy="static", max_num_seqs=1), blocks)
    run(scheduler, seqs)
    assert [s.num_cached_tokens for s in seqs] == [0, 32, 32, 32]
    assert blocks.prefix_hit_rate == pytest.approx(96 / 160)


def test_aborting_frees_blocks_wherever_the_request_is():
    blocks = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1), blocks)
    a, b = make_seq(0, 8, 5), make_seq(1, 8, 5)
    scheduler.add(a)
    scheduler.add(b)
    scheduler.schedule()
    scheduler.finish(b, "abort")  # waiting
    scheduler.finish(a, "abort")  # running
    assert not scheduler.has_unfinished and blocks.num_free_blocks == 32
    assert a.finish_reason == b.finish_reason == "abort"


@pytest.mark.parametrize("kwargs, bad", [(dict(policy="lifo"), "lifo"), (dict(max_num_seqs=0), "max_num_seqs"),
                                         (dict(max_num_batched_tokens=-1), "-1"), (dict(max_wait_s=-1), "max_wait_s")])
def test_bad_config_names_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        SchedulerConfig(**kwargs)


def test_static_batches_compute_padding_as_request_level_batching_does():
    def plan(pad):
        blocks = BlockManager(num_blocks=64, block_size=4)
        scheduler = Scheduler(SchedulerConfig(policy="static", max_num_seqs=3, pad_batches=pad), blocks)
        seqs = [make_seq(0, 4, 1), make_seq(1, 8, 5), make_seq(2, 6, 2)]
        for s in seqs:
            scheduler.add(s)
        out = []
        while scheduler.has_unfinished:
            batch = scheduler.schedule()
            out.append((len(batch.seqs), batch.padding_rows, batch.prompt_padding))
            for s, n in zip(batch.seqs, batch.num_new_tokens):
                s.num_computed_tokens += n
                s.token_ids.append(1)
                if s.num_output_tokens == s.params.max_new_tokens:
                    scheduler.finish(s, "length")
        return out

    # prompts padded to 8 tokens; every finished request keeps its row until the slowest one ends
    assert plan(True) == [(3, 0, [4, 2]), (2, 1, []), (1, 2, []), (1, 2, []), (1, 2, [])]
    assert plan(False) == [(3, 0, []), (2, 0, []), (1, 0, []), (1, 0, []), (1, 0, [])]
