"""The results store: round trip, append, concurrency, crash safety, JSON conversion."""

import json
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from labkit import results

ENV = {"cpu": "test-cpu", "gpu": None, "torch": "x"}


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    path = tmp_path / "data"
    monkeypatch.setenv("LABKIT_DATA_DIR", str(path))
    return path


def _row(i, technique="baseline"):
    return results.make_row(technique, {"batch_size": i, "seed": 0}, {"tokens_per_s": 10.0 * i}, env=ENV)


def test_data_dir_follows_env_and_is_created_on_demand(data_dir):
    assert not data_dir.exists()
    assert results.data_dir() == data_dir
    assert data_dir.is_dir()


def test_make_row_stamps_environment_time_and_seed():
    row = results.make_row("kv_cache", {"seed": 7}, {"latency_ms": 1.5})
    assert row["env"]["torch"] == torch.__version__
    assert row["seed"] == 7
    assert pd.Timestamp(row["timestamp"]).tzinfo is not None
    with pytest.raises(ValueError):
        results.make_row("", {}, {})


def test_rows_round_trip_with_flattened_columns(data_dir):
    path = results.append_rows([_row(1), _row(2)])
    assert path == data_dir / "results.jsonl"
    df = results.load_results()
    assert list(df["technique"]) == ["baseline", "baseline"]
    assert list(df["metrics.tokens_per_s"]) == [10.0, 20.0]
    assert list(df["params.batch_size"]) == [1, 2]
    assert (df["env.cpu"] == "test-cpu").all()
    assert str(df["timestamp"].dt.tz) == "UTC"


def test_append_keeps_old_rows_and_accepts_one_row():
    results.append_rows([_row(1)])
    results.append_rows(_row(2, "speculative"))
    assert list(results.load_results()["technique"]) == ["baseline", "speculative"]


def test_load_results_is_empty_without_a_file(data_dir):
    assert results.load_results().empty
    assert not data_dir.exists()  # reading creates nothing


def test_values_are_made_json_safe():
    metrics = {"np": np.float32(1.5), "t": torch.tensor(3), "nan": float("nan"), "inf": math.inf,
               "arr": np.arange(3), "dtype": torch.bfloat16, "path": Path("/x/y")}
    path = results.append_rows([results.make_row("t", {"n": np.int64(4)}, metrics, env=ENV)])
    row = json.loads(path.read_text())
    assert row["metrics"] == {"np": 1.5, "t": 3, "nan": None, "inf": None, "arr": [0, 1, 2],
                              "dtype": "torch.bfloat16", "path": "/x/y"}
    assert row["params"] == {"n": 4}


def test_unserialisable_value_and_incomplete_row_are_rejected(data_dir):
    with pytest.raises(TypeError, match="metrics.obj"):
        results.append_rows([results.make_row("t", {}, {"obj": object()}, env=ENV)])
    with pytest.raises(ValueError, match="env"):
        results.append_rows([{"technique": "t", "params": {}, "metrics": {}, "timestamp": "now"}])
    assert not (data_dir / "results.jsonl").exists()


def test_row_without_timestamp_is_stamped_at_append():
    results.append_rows([{"technique": "t", "params": {}, "metrics": {"x": 1}, "env": ENV}])
    assert results.load_results()["timestamp"].notna().all()


def test_corrupt_line_names_file_and_line(data_dir):
    path = results.append_rows([_row(1), _row(2)])
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:20] + "\n")
    with pytest.raises(ValueError, match=r"results\.jsonl:2"):
        results.load_results()


def test_failed_write_leaves_old_file_intact(data_dir, monkeypatch):
    path = results.append_rows([_row(1)])
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        results.append_rows([_row(2)])
    assert path.read_bytes() == before
    assert sorted(p.name for p in data_dir.iterdir()) == ["results.jsonl", "results.jsonl.lock"]  # no temp left


def _append_many(worker: int, num_rows: int) -> None:
    for i in range(num_rows):
        results.append_rows([results.make_row("race", {"worker": worker, "i": i}, {"x": 1.0}, env=ENV)])


def test_concurrent_appends_from_two_processes_lose_nothing():
    ctx = multiprocessing.get_context("fork")  # fork: the children inherit LABKIT_DATA_DIR and skip re-imports
    workers = [ctx.Process(target=_append_many, args=(w, 20)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=60)
        assert p.exitcode == 0
    df = results.load_results()
    assert len(df) == 40
    assert set(zip(df["params.worker"], df["params.i"])) == {(w, i) for w in range(2) for i in range(20)}


def test_write_json_atomic(tmp_path):
    path = results.write_json_atomic(tmp_path / "bench" / "decode.json", {"tokens_per_s": np.float64(2.5),
                                                                        "bad": float("nan")})
    assert json.loads(path.read_text()) == {"tokens_per_s": 2.5, "bad": None}
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
