"""`labkit bench tp`: tensor-parallel decode at world sizes 1 and 2 (or more) side by side in one torchrun launch.

Each world size's tokens/s, its ratio to world size 1 from the same launch, each rank's compute against its
all-reduce time per decode step, all-reduce latency and bandwidth by message size, and what the alpha-beta model
(`labkit.parallel.scaling`), fed by world size 1's compute and the measured all-reduce fit, predicts for the larger
sizes. The command `labkit bench tp` writes the rows to data/results.jsonl and data/bench_tp.json.
"""

from __future__ import annotations

import dataclasses

from labkit.parallel.worker import BenchOptions

DEFAULT_WORLD_SIZES = (1, 2)


def add_predictions(rows: list[dict]) -> None:
    """Each decode row of a world size > 1 gains the model's prediction from the other rows of its launch."""
    from labkit.parallel.scaling import predict_from_rows

    decode = [r for r in rows if r["technique"] == "tp_decode"]
    sweep = [r for r in rows if r["technique"] == "tp_allreduce"]
    for row in decode:
        w, batch = row["params"]["world_size"], row["params"]["batch_size"]
        same_batch = [r for r in decode if r["params"]["batch_size"] == batch]
        if w == 1 or not sweep or not any(r["params"]["world_size"] == 1 for r in same_batch):
            continue
        p = predict_from_rows(same_batch, sweep, w)
        row["metrics"].update(model_tokens_per_s=p["tokens_per_s"], model_comm_ms_per_step=p["comm_ms"],
                              model_compute_ms_per_step=p["compute_ms"])


def run_tp_bench(options: BenchOptions, log=None, timeout_s: float | None = None) -> list[dict]:
    """One launch with as many ranks as the largest of `options.world_sizes` (default 1,2): rank 0's rows (decode
    at each world size, the all-reduce sweep), each decode row of a larger size with the alpha-beta prediction.
    Raises `launch.LaunchError` when the ranks fail."""
    from labkit.parallel.distributed import LaunchConfig
    from labkit.parallel.launch import launch

    sizes = tuple(sorted(set(options.world_sizes or DEFAULT_WORLD_SIZES)))
    result = launch(dataclasses.replace(options, world_sizes=sizes), LaunchConfig(nproc=sizes[-1]), log=log,
                    timeout_s=timeout_s)
    rows = result["rows"]
    add_predictions(rows)
    return rows


__all__ = ["add_predictions", "run_tp_bench", "DEFAULT_WORLD_SIZES"]
