"""KV-cache bookkeeping in plain Python: block tables, reference counts and prefix caching; no tensors.

The cache is `num_blocks` blocks of `block_size` token slots. Each sequence owns a block table (its blocks in
order); a block holding a full, computed run of tokens is registered under a hash of its content and of every
token before it, so a later prompt with the same prefix reuses it instead of recomputing it (prefix caching,
as in vLLM and nano-vllm's block_manager.py). Shared blocks are counted by reference; a block whose count
drops to zero is free, but keeps its content and registration until it is handed out again (least recently
freed first), so a prefix stays reusable for as long as memory allows. Only full prompt blocks before the
last prompt token are ever shared, so no sequence writes into a shared block and no copy-on-write is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: its tokens and, through `parent`, every token before it (128-bit BLAKE2b)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """Block tables, reference counts and the prefix cache of one paged KV cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self._cached: dict[bytes, int] = {}  # content hash -> block
        self._hash_of: dict[int, bytes] = {}  # block -> content hash, for registered blocks
        self._tables: dict[Hashable, list[int]] = {}
        self._chains: dict[Hashable, list[bytes]] = {}  # hashes of each sequence's full, computed blocks
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of those, found cached

    # -- queries ------------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached content included: it is evicted when the block is reused)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def prefix_hit_rate(self) -> float | None:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else None

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._tables[seq_id]

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Cached blocks holding the leading full blocks of token_ids (read-only).

        The last token is never covered, so a sequence always computes at least one token (its logits).
        """
        if not self.enable_prefix_caching:
            return []
        blocks, parent = [], b""
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            parent = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            block = self._cached.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    # -- changes ------------------------------------------------------------------------------------------------
    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], cached: list[int], num_tokens: int) -> bool:
        """Give a new sequence a table that holds num_tokens tokens, starting with `cached` (from match_prefix).

        Returns False, changing nothing, when too few blocks are free.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        fresh = self.blocks_for(num_tokens) - len(cached)
        reclaimed = sum(1 for b in cached if self.ref_counts[b] == 0)  # cached but free: not available twice
        if fresh > len(self._free) - reclaimed:
            return False
        for b in cached:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1
        self._tables[seq_id] = list(cached) + [self._take_free() for _ in range(max(fresh, 0))]
        self._chains[seq_id] = [self._hash_of[b] for b in cached]
        self.num_queried_tokens += len(token_ids)
        self.num_hit_tokens += len(cached) * self.block_size
        return True

    def grow(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Make seq_id's table hold num_tokens tokens; False, changing nothing, when too few blocks are free."""
        table = self._tables[seq_id]
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            return False
        table.extend(self._take_free() for _ in range(need))
        return True

    def cache_blocks(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Register seq_id's blocks that are now full and computed, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        chain, table, bs = self._chains[seq_id], self._tables[seq_id], self.block_size
        while len(chain) < num_computed // bs:
            i = len(chain)
            key = block_hash(chain[-1] if chain else b"", token_ids[i * bs:(i + 1) * bs])
            chain.append(key)
            block = table[i]
            if key not in self._cached and block not in self._hash_of:
                self._cached[key] = block
                self._hash_of[block] = key

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep only what holds the first num_tokens tokens (rejected draft tokens are dropped)."""
        table, chain = self._tables[seq_id], self._chains[seq_id]
        keep = self.blocks_for(num_tokens)
        for b in reversed(table[keep:]):
            self._release(b)
        del table[keep:]
        full = num_tokens // self.block_size
        for i in range(full, min(len(chain), keep)):  # kept but partly rewritten: its old content is stale
            b = table[i]
            assert self.ref_counts[b] == 1, "a shared block cannot be rolled back"
            if self._hash_of.get(b) == chain[i]:
                del self._cached[chain[i]], self._hash_of[b]
        del chain[full:]

    def free(self, seq_id: Hashable) -> None:
        """Release all of seq_id's blocks; its tail is evicted first, its prefix stays cached longest."""
        table = self._tables.pop(seq_id)
        self._chains.pop(seq_id)
        for b in reversed(table):
            self._release(b)

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self._hash_of.pop(block, None)
        if key is not None:  # evict its cached content
            del self._cached[key]
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free[block] = None

    def check(self) -> None:
        """Assert the bookkeeping is consistent (tests call this after every step)."""
        counts = [0] * self.num_blocks
        for table in self._tables.values():
            for b in table:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts differ from the block tables"
        assert set(self._free) == {b for b, c in enumerate(counts) if c == 0}, "free list out of sync"
        assert all(self._cached[k] == b for b, k in self._hash_of.items()) and len(self._cached) == len(self._hash_of)


__all__ = ["BlockManager", "block_hash"]
