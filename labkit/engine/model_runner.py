"""The model runner: one forward over a step's rows, whatever they are (prefill chunks, decode rows, rows that
verify draft tokens, a draft network's own rows), through the paged KV cache it owns.

A row is a `RowSpan`: tokens [start, start + length) of a request's token ids are computed and their K/V cached;
`forward` returns a `ForwardOutput` (logits where asked, hidden states when asked). A step of one-token rows may
instead run static: rows and block tables padded to bucketed sizes, every input one tensor, compiled with
torch.compile or replayed from CUDA graphs (gpt-fast compiles only this step). nano-vllm's model_runner.py and
vLLM's GPUModelRunner are the pattern. The engine, the drafts (`labkit.engine.spec_decode.proposers`), `bench spec`
and the quality code all run the model through this class.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from labkit.engine.block_manager import BlockManager
from labkit.engine.config import EngineConfig
from labkit.model import cpu_attention
from labkit.model.attention import AttentionMetadata, build_metadata
from labkit.model.kv_cache import KVCache
from labkit.model.llama import Transformer
from labkit.model.rewrites import PACKED_MAX_ROWS

DEFAULT_CPU_KV_CACHE_MB = 512  # pages are zeroed lazily by the OS: unused blocks cost no memory
DEFAULT_GPU_KV_CACHE_FRACTION = 0.4  # of the free memory once the weights are on the device
MIN_STATIC_CONTEXT = 128  # a compiled step attends over at least this many positions (fewer recompiles)
# compiled static steps one process may hold: a graph per (rows, table width) bucket, for every runner (targets
# and drafts share static_step's code): dynamo's default of 8 would fail the 9th bucket, not fall back
STATIC_RECOMPILES = 256


@dataclass(frozen=True)
class RowSpan:
    """One row of a forward: tokens [start, start + length) of token_ids are computed and cached.

    request_id: the block manager's key of the row (a request id, or any key a caller allocated blocks under);
    None for a padding row, which reads and writes only the cache's scratch block.
    """

    request_id: Hashable | None
    token_ids: list[int]
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def new_token_ids(self) -> list[int]:
        return self.token_ids[self.start:self.end]


@dataclass
class ForwardOutput:
    """What a forward returns: logits [sum(num_logits), V], row after row; hidden [N, dim] of every computed
    token when asked for (else None)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


def slot_of(block_table: Sequence[int], position: int, block_size: int) -> int:
    """The cache slot of a token: offset position % block_size of the block holding its position."""
    return block_table[position // block_size] * block_size + position % block_size


def default_num_blocks(config: EngineConfig, max_seq_len: int, bytes_per_block: int, device: torch.device) -> int:
    """KV blocks for a config without num_kv_blocks: kv_cache_mb, or a default budget (512 MiB on a CPU, a
    fraction of the free memory on a GPU), capped at every row of the batch at full context."""
    needed = config.scheduler.max_num_seqs * -(-max_seq_len // config.block_size)
    if config.kv_cache_mb is not None:
        budget = config.kv_cache_mb * 2**20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = DEFAULT_GPU_KV_CACHE_FRACTION * free
    else:
        budget = DEFAULT_CPU_KV_CACHE_MB * 2**20
    return max(1, min(needed, int(budget // bytes_per_block)))


class ModelRunner:
    """A model over its own paged KV cache and block manager; `forward` runs rows, `prompt_logits` a prompt."""

    def __init__(self, model: Transformer, config: EngineConfig):
        self.model, self.config = model, config
        self.device = model.embed.weight.device
        self.kv_dtype = torch.int8 if config.kv_cache_dtype == "int8" else model.act_dtype
        args = model.args
        shape = (args.num_layers, config.block_size, model.num_kv_heads, args.head_dim)
        num_blocks = config.num_kv_blocks or default_num_blocks(
            config, args.max_seq_len, KVCache.bytes_per_block(*shape, self.kv_dtype), self.device)
        self.cache = KVCache(args.num_layers, num_blocks, config.block_size, model.num_kv_heads, args.head_dim,
                             self.device, self.kv_dtype)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        if self.device.type == "cpu" and self.kv_dtype == torch.bfloat16:
            cpu_attention.paged_decode_op()  # built (first time: ~30 s) or loaded now, not inside a request's step
        self.compiled_step = None  # the static step as it runs (compiled or from graphs), made on first use
        self._graphs = None  # labkit.engine.cuda_graphs.DecodeGraphs, with cuda_graphs

    # -- blocks of callers that run rows themselves (drafts, benchmarks) ---------------------------------------
    def reserve(self, key: Hashable, num_tokens: int, keep: int = 0) -> bool:
        """Keep the first `keep` cached tokens under key and make room for num_tokens; False if the cache is full."""
        if key not in self.blocks:
            return self.blocks.allocate(key, [], [], num_tokens)
        self.blocks.truncate(key, keep)
        return self.blocks.grow(key, num_tokens)

    def release(self, key: Hashable) -> None:
        if key in self.blocks:
            self.blocks.free(key)

    # -- the forward -----------------------------------------------------------------------------------------
    def forward(self, rows: Sequence[RowSpan], sample_rows: Sequence[int], num_logits: Sequence[int] | None = None,
                return_hidden: bool = False, embeds: torch.Tensor | None = None) -> ForwardOutput:
        """Compute and cache each row's new tokens; logits at the last token of each row in `sample_rows`.

        num_logits[i]: logits at the last num_logits[i] tokens of row sample_rows[i] instead (a speculative row
        verifying its drafts), stacked row after row. return_hidden: also the hidden states [N, dim] of every
        computed token. embeds [N, dim]: the model's input in place of the tokens' embeddings (a draft head's own
        input; see `Transformer.forward`). Call under torch.inference_mode().
        """
        if self._runs_static(rows, return_hidden, embeds):
            return ForwardOutput(self.forward_static(rows)[list(sample_rows)])
        return self._forward_eager(rows, sample_rows, num_logits, return_hidden, embeds)

    def _forward_eager(self, rows, sample_rows, num_logits, return_hidden, embeds) -> ForwardOutput:
        bs = self.config.block_size
        tokens, slots, query_lens, context_lens, tables = [], [], [], [], []
        for row in rows:
            table = self.block_table(row.request_id, row.end)
            tokens.extend(row.new_token_ids)
            slots.extend(slot_of(table, p, bs) for p in range(row.start, row.end))
            query_lens.append(row.length)
            context_lens.append(row.end)
            tables.append(table)
        meta = build_metadata(query_lens, context_lens, tables, slots, bs, self.device)
        hidden = self.model(torch.tensor(tokens, device=self.device), meta, self.cache,
                            **({} if embeds is None else {"embeds": embeds}))
        last = list(itertools.accumulate(query_lens))
        counts = num_logits or [1] * len(sample_rows)
        index = torch.tensor([p for i, c in zip(sample_rows, counts) for p in range(last[i] - c, last[i])],
                             dtype=torch.long, device=self.device)  # may be empty
        return ForwardOutput(self.model.logits(hidden, index), hidden if return_hidden else None)

    def block_table(self, key: Hashable | None, num_tokens: int) -> list[int]:
        """A row's block table; a padding row (key None) reads and writes only the scratch block."""
        if key is None:
            return [self.cache.num_blocks] * self.blocks.blocks_for(num_tokens)
        return self.blocks.block_table(key)

    def prompt_logits(self, token_ids: Sequence[int], chunk_size: int | None = None) -> torch.Tensor:
        """Logits [T, V] at every position of a prompt, prefilled in chunks of chunk_size (all at once when
        None) through the paged cache; nothing stays cached. For parity tests and perplexity."""
        ids = list(token_ids)
        max_len = self.model.args.max_seq_len
        if not ids or len(ids) > max_len:
            raise ValueError(f"a prompt needs 1 to {max_len} tokens, got {len(ids)}")
        key = object()
        if not self.blocks.allocate(key, ids, [], len(ids)):
            raise ValueError(f"{len(ids)} tokens do not fit the free KV blocks ({self.blocks.num_free_blocks})")
        chunk = chunk_size or len(ids)
        try:
            with torch.inference_mode():
                rows = [RowSpan(key, ids, start, min(chunk, len(ids) - start)) for start in range(0, len(ids), chunk)]
                return torch.cat([self._forward_eager([row], [0], [row.length], False, None).logits for row in rows])
        finally:
            self.blocks.free(key)

    # -- the static decode step ------------------------------------------------------------------------------
    def _runs_static(self, rows: Sequence[RowSpan], return_hidden: bool, embeds) -> bool:
        config = self.config
        return (config.compile or config.cuda_graphs) and not return_hidden and embeds is None \
            and all(row.length == 1 for row in rows) and self._static_pays(len(rows))

    def _static_pays(self, num_rows: int) -> bool:
        """Whether a decode step of `num_rows` rows runs faster static (compiled or from CUDA graphs) than eager.
        Always, but for a compiled CPU step over a model with oneDNN-packed weights (`use_packed_gemm`) at 2 to
        PACKED_MAX_ROWS rows: inductor cannot lower the packed linear, so the compiled step runs MKL's GEMM,
        where the eager packed step is faster (docs/engine.md, data/bench_decode.json)."""
        return self.config.cuda_graphs or not 1 < num_rows <= PACKED_MAX_ROWS \
            or "gemm:packed" not in self.model.rewrites

    def forward_static(self, rows: Sequence[RowSpan]) -> torch.Tensor:
        """A decode-only step with static shapes (compiled, or replayed from a CUDA graph): rows and block tables
        padded to bucketed sizes, every input in one [rows, 4 + width] tensor (one host-to-device copy).
        Returns logits [padded rows, V]."""
        bs, B = self.config.block_size, len(rows)
        num_rows = 1 << (B - 1).bit_length()
        tables = [self.block_table(row.request_id, row.end) for row in rows]
        width = max(MIN_STATIC_CONTEXT // bs, 1 << (max(len(t) for t in tables) - 1).bit_length())
        inputs = []
        for row, table in zip(rows, tables):  # token, position, slot, context length, table
            inputs.append([row.token_ids[row.start], row.start, slot_of(table, row.start, bs), row.start + 1,
                           *table, *[0] * (width - len(table))])
        inputs += [[0, 0, self.cache.scratch_slot, 1, *[0] * width]] * (num_rows - B)  # padding: scratch only
        return self._decode_step()(torch.tensor(inputs, dtype=torch.long, device=self.device), self.cache)

    def static_step(self, inputs: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """inputs [rows, 4 + width] (token, position, slot, context length, block table) -> logits [rows, V]."""
        meta = AttentionMetadata(positions=inputs[:, 1], slot_mapping=inputs[:, 2], block_tables=inputs[:, 4:],
                                 context_lens=inputs[:, 3], query_start=None, block_size=self.config.block_size)
        return self.model.logits(self.model(inputs[:, 0], meta, cache))

    def _decode_step(self):
        """The static step: compiled when config.compile, replayed from CUDA graphs when config.cuda_graphs."""
        if self.compiled_step is None:
            step = self.static_step
            if self.config.compile:
                # only the hot decode step is compiled (gpt-fast); prefill stays eager. Module guards stay on:
                # every runner shares static_step's code object, so dropping them would let one run another's graph.
                step = torch.compile(step, fullgraph=True, dynamic=False)
                _allow_recompiles(STATIC_RECOMPILES)
            if self.config.cuda_graphs:
                from labkit.engine.cuda_graphs import DecodeGraphs

                self._graphs = DecodeGraphs(step)
                step = self._graphs
            self.compiled_step = step
        return self.compiled_step

    @property
    def capture_s(self) -> float | None:
        """Seconds spent capturing CUDA graphs so far (None without cuda_graphs); never inside tokens/s."""
        return self._graphs.capture_s if self._graphs is not None else (0.0 if self.config.cuda_graphs else None)

    @property
    def num_graphs(self) -> int:
        """CUDA graphs captured so far (one per bucket of rows and block-table width)."""
        return self._graphs.num_graphs if self._graphs is not None else 0


def _allow_recompiles(limit: int) -> None:
    """Let dynamo keep `limit` graphs of one function (its recompile limit is process-wide)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, limit)


__all__ = ["ModelRunner", "RowSpan", "ForwardOutput", "slot_of", "default_num_blocks", "MIN_STATIC_CONTEXT",
           "DEFAULT_CPU_KV_CACHE_MB", "DEFAULT_GPU_KV_CACHE_FRACTION"]
