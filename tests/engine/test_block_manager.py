"""The block manager alone: exact free counts, reference-counted prefix sharing, eviction, rollback."""

import pytest

from labkit.engine.block_manager import BlockManager


def test_allocate_grow_free_keeps_an_exact_count():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", list(range(10)), [], 10)  # 3 blocks
    assert bm.num_free_blocks == 5 and len(bm.block_table("a")) == 3
    assert bm.grow("a", 12) and bm.num_free_blocks == 5  # still fits block 3
    assert bm.grow("a", 13) and bm.num_free_blocks == 4
    assert not bm.grow("a", 13 + 4 * 5)  # needs 5 more: refused, nothing changed
    assert bm.num_free_blocks == 4 and len(bm.block_table("a")) == 4
    bm.check()
    bm.free("a")
    assert bm.num_free_blocks == 8
    bm.check()


def test_allocation_that_does_not_fit_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.allocate("a", [1] * 8, [], 8)
    assert not bm.allocate("b", [2] * 12, [], 12)
    assert "b" not in bm and bm.num_free_blocks == 2
    bm.check()


def test_identical_prefixes_share_blocks_until_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    assert bm.match_prefix(prompt) == []
    assert bm.allocate("a", prompt, [], len(prompt))
    bm.cache_blocks("a", prompt, len(prompt))  # computed: its 2 full blocks are registered
    assert bm.num_cached_blocks == 2
    other = prompt[:8] + [7, 7, 7]
    hits = bm.match_prefix(other)
    assert hits == bm.block_table("a")[:2]
    assert bm.allocate("b", other, hits, len(other))
    assert bm.block_table("b")[:2] == hits and bm.ref_counts[hits[0]] == 2
    assert bm.num_used_blocks == 3 + 1  # a: 3 blocks, b: shares 2 and owns 1
    # a prompt that is exactly the cached blocks still computes its last token in a block of its own
    assert len(bm.match_prefix(prompt[:8])) == 1
    bm.check()
    bm.free("a")
    assert bm.ref_counts[hits[0]] == 1
    bm.free("b")
    assert bm.num_free_blocks == 16 and bm.num_cached_blocks == 2  # free, but still reusable
    assert bm.match_prefix(prompt) == hits
    bm.check()
    assert bm.prefix_hit_rate == pytest.approx(8 / (10 + 11))


def test_a_different_earlier_block_changes_every_later_key():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert bm.allocate("a", a, [], 9)
    bm.cache_blocks("a", a, 9)
    b = [0, 2, 3, 4, 5, 6, 7, 8, 9]  # same second block, other first block
    assert bm.match_prefix(b) == []


def test_cached_free_blocks_are_reused_before_they_are_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    p = [5, 6, 7, 8, 9]
    assert bm.allocate("a", p, [], 5)
    bm.cache_blocks("a", p, 5)
    bm.free("a")
    hits = bm.match_prefix(p)
    assert len(hits) == 2
    # 4 free blocks, 2 of them cached: a request reusing both needs only 1 more
    assert bm.allocate("b", p, hits, 5) and bm.num_free_blocks == 1
    bm.check()
    bm.free("b")
    # a stranger takes all four blocks: the cached content is evicted
    assert bm.allocate("c", [1] * 8, [], 8)
    assert bm.num_cached_blocks == 0 and bm.match_prefix(p) == []
    bm.free("c")
    bm.check()


def test_eviction_takes_the_least_recently_freed_and_tails_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    p = [1, 2, 3, 4, 5, 6, 7]
    assert bm.allocate("a", p, [], 7)  # 4 blocks
    bm.cache_blocks("a", p, 7)  # 3 full blocks registered
    bm.free("a")
    assert bm.allocate("b", [9] * 4, [], 4)  # 2 fresh blocks: the never-used ones go first
    assert len(bm.match_prefix(p)) == 3
    assert bm.allocate("c", [8] * 2, [], 2)  # next: a's tail (its partial block), not its prefix
    assert len(bm.match_prefix(p)) == 3
    assert bm.allocate("d", [7] * 2, [], 2)  # then a's last full block
    assert len(bm.match_prefix(p)) == 2
    bm.check()


def test_truncate_rolls_back_and_unregisters_rewritten_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    ids = list(range(20, 33))  # 13 tokens
    assert bm.allocate("a", ids, [], 13)
    bm.cache_blocks("a", ids, 13)  # 3 full blocks
    assert bm.num_cached_blocks == 3
    bm.truncate("a", 6)  # keep 2 blocks; block 1 is now partial and will be rewritten
    assert len(bm.block_table("a")) == 2 and bm.num_free_blocks == 6
    assert bm.num_cached_blocks == 2  # the dropped third block stays cached (its content is intact)
    assert len(bm.match_prefix(ids)) == 1  # block 1 no longer matches: it is being rewritten
    bm.check()
    new = ids[:6] + [1, 1, 1, 1, 1]
    assert bm.grow("a", 11)
    bm.cache_blocks("a", new, 11)
    assert bm.match_prefix(new + [0]) == bm.block_table("a")[:2]
    bm.free("a")
    bm.check()


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    p = [1, 2, 3, 4, 5]
    assert bm.allocate("a", p, [], 5)
    bm.cache_blocks("a", p, 5)
    assert bm.match_prefix(p) == [] and bm.num_cached_blocks == 0


@pytest.mark.parametrize("kwargs, bad", [(dict(num_blocks=0, block_size=4), "num_blocks"),
                                         (dict(num_blocks=4, block_size=0), "block_size")])
def test_bad_sizes_name_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        BlockManager(**kwargs)
