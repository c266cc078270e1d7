"""CUDA graphs of the engine's decode step, captured once per batch-size bucket and replayed by `Engine.step()`.

Batch-1 decode of a small model is launch-bound: hundreds of kernels a step, each shorter than the CPU's time to
launch it. A CUDA graph records the launches once and replays them in one call (vLLM's CUDAGraphRunner captures
per batch size by hand, gpt-fast through `mode="reduce-overhead"`). Replay needs every address to stay put: the
paged cache's per-layer tensors never move (`labkit.model.kv_cache.KVCache`), padding rows write to its scratch block,
and each graph owns one input buffer ([rows, 4 + width]: token, position, slot, context length, block table) that
a step copies its inputs into before replaying. One graph per (rows, block-table width) bucket, all sharing one
memory pool: graphs replay one at a time and each step's logits are copied out before the next replay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class CapturedStep:
    graph: "torch.cuda.CUDAGraph"
    inputs: torch.Tensor  # the static input buffer the graph reads
    output: torch.Tensor  # the static logits it writes, [rows, vocab]


class DecodeGraphs:
    """Replays `step(inputs, cache) -> logits` from a CUDA graph captured the first time a bucket's shape is seen.

    Warm-up calls before each capture (on a side stream, as PyTorch's capture recipe asks) run torch.compile and
    Triton's autotuning outside the capture; they recompute the same keys and values into the same cache slots,
    so the cache is unchanged by them. `capture_s` sums the time of the captures alone.
    """

    def __init__(self, step: Callable[[torch.Tensor, object], torch.Tensor], num_warmup: int = 2):
        self.step, self.num_warmup = step, num_warmup
        self.graphs: dict[tuple[int, ...], CapturedStep] = {}
        self.capture_s = 0.0
        self._pool = None

    def __call__(self, inputs: torch.Tensor, cache) -> torch.Tensor:
        captured = self.graphs.get(tuple(inputs.shape))
        if captured is None:
            captured = self._capture(inputs, cache)
        captured.inputs.copy_(inputs, non_blocking=True)
        captured.graph.replay()
        return captured.output

    def _capture(self, inputs: torch.Tensor, cache) -> CapturedStep:
        if inputs.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {inputs.device}")
        static = inputs.clone()
        side = torch.cuda.Stream(device=inputs.device)
        side.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(side):
            for _ in range(self.num_warmup):
                self.step(static, cache)
        torch.cuda.current_stream(inputs.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(inputs.device)
        start = time.perf_counter()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.step(static, cache)
        torch.cuda.synchronize(inputs.device)
        self.capture_s += time.perf_counter() - start
        captured = CapturedStep(graph, static, output)
        self.graphs[tuple(inputs.shape)] = captured
        return captured

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)


__all__ = ["DecodeGraphs", "CapturedStep"]
