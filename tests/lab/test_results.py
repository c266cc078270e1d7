"""The results store: round trip, append, run ids and labels, corrupt and torn lines, killed and concurrent
writers, JSON conversion. Listing, tabulating and comparing runs: test_analysis.py; `labkit results`:
tests/cli/test_results.py."""

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from labkit.lab import analysis, results
from tests.lab.results_rows import warnings_of

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


def test_rows_carry_a_run_id_a_timestamp_and_a_label(monkeypatch):
    monkeypatch.delenv(results.RUN_ID_ENV, raising=False)
    monkeypatch.delenv(results.LABEL_ENV, raising=False)
    results.append_rows([_row(1), _row(2)])  # one call, one run
    results.append_rows([_row(3)], label="after")
    monkeypatch.setenv(results.RUN_ID_ENV, "lab-run-7")  # what `labkit run` gives its notebooks
    monkeypatch.setenv(results.LABEL_ENV, "nightly")
    results.append_rows([_row(4)])
    rows = results.read_rows()
    assert rows[0]["run_id"] == rows[1]["run_id"] != rows[2]["run_id"]
    assert [r["label"] for r in rows] == [None, None, "after", "nightly"]
    assert rows[3]["run_id"] == "lab-run-7"
    assert all(r["timestamp"] for r in rows)
    assert results.new_run_id() != results.new_run_id()


def test_stamp_rows_keeps_what_a_row_already_has():
    row = {**_row(1), "run_id": "mine", "label": "kept"}
    (stamped,) = results.stamp_rows([row], run_id="other", label="other")
    assert (stamped["run_id"], stamped["label"]) == ("mine", "kept")


def test_a_run_that_completed_no_request_is_not_a_result(data_dir):
    row = results.make_row("bench_serve", {}, {"num_completed": 0, "num_failed": 3}, env=ENV)
    with pytest.raises(ValueError, match="completed no requests"):
        results.append_rows([row])
    assert not (data_dir / "results.jsonl").exists()


def test_corrupt_and_non_utf8_lines_are_skipped_with_a_warning_naming_file_and_line(data_dir):
    path = results.append_rows([_row(1), _row(2), _row(3), _row(4)])
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:20] + b"\n"  # cut JSON
    lines[2] = b'{"technique": "caf\xe9"}\n'  # Latin-1, not UTF-8
    path.write_bytes(b"".join(lines) + b"[1, 2]\n" + b'{"no": "technique"}\n')
    df, messages = warnings_of(results.load_results)
    assert list(df["params.batch_size"]) == [1, 4]
    assert len(messages) == 4
    assert f"{path}:2: corrupt results line" in messages[0]
    assert f"{path}:3: not UTF-8 (byte 0xe9" in messages[1]
    assert f"{path}:5: expected a JSON object" in messages[2] and f"{path}:6: not a results row" in messages[3]
    seen = []
    results.read_rows(path, on_error=seen.append)  # a caller may collect them instead
    assert len(seen) == 4


def test_a_torn_last_line_is_skipped_quietly_and_the_next_append_starts_a_line(data_dir):
    path = results.append_rows([_row(1)])
    with open(path, "ab") as f:
        f.write(b'{"technique": "baseline", "par')  # a writer killed mid-row
    rows, messages = warnings_of(results.read_rows)
    assert [r["params"]["batch_size"] for r in rows] == [1] and messages == []
    results.append_rows([_row(2)])
    rows, messages = warnings_of(results.read_rows)
    assert [r["params"]["batch_size"] for r in rows] == [1, 2]
    assert len(messages) == 1 and f"{path}:2:" in messages[0]  # now an ordinary corrupt line


def test_a_complete_last_row_without_newline_still_counts(data_dir):
    path = results.append_rows([_row(1)])
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # edited by hand
    assert len(results.read_rows()) == 1
    results.append_rows([_row(2)])
    assert [r["params"]["batch_size"] for r in results.read_rows()] == [1, 2]


def test_append_writes_in_place_without_rewriting_or_temp_copies(data_dir, monkeypatch):
    path = results.append_rows([_row(i) for i in range(50)])
    before, inode = path.read_bytes(), path.stat().st_ino

    def no_rewrites(*args):
        raise AssertionError("append must not replace the file")

    monkeypatch.setattr(results.os, "replace", no_rewrites)
    results.append_rows([_row(50)])
    assert path.stat().st_ino == inode and path.read_bytes().startswith(before)
    assert sorted(p.name for p in data_dir.iterdir()) == ["results.jsonl", "results.jsonl.lock"]


def test_failed_write_is_cut_back_off(data_dir, monkeypatch):
    path = results.append_rows([_row(1)])
    before = path.read_bytes()
    real_write = os.write

    def half_then_full_disk(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "write", half_then_full_disk)
    with pytest.raises(OSError, match="No space"):
        results.append_rows([_row(2)])
    assert path.read_bytes() == before
    assert sorted(p.name for p in data_dir.iterdir()) == ["results.jsonl", "results.jsonl.lock"]


WRITER = """
import sys
from labkit.lab import results
row = results.make_row("killed", {"pad": "x" * 20000}, {"x": 1.0}, env={"cpu": "t"})
print("ready", flush=True)
while True:
    results.append_rows([row] * 20)
"""


def test_kill_9_leaves_no_temp_copies_and_a_readable_store(data_dir):
    env = {**os.environ, "LABKIT_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER], env=env, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    deadline = time.monotonic() + 30
    while not (data_dir / "results.jsonl").exists() or (data_dir / "results.jsonl").stat().st_size < 2_000_000:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert sorted(p.name for p in data_dir.iterdir()) == ["results.jsonl", "results.jsonl.lock"]
    rows, messages = warnings_of(results.read_rows)
    assert len(rows) >= 80 and messages == []  # at most a torn last line, skipped quietly
    results.append_rows([_row(1)])  # the store takes rows again after the crash
    assert results.read_rows()[-1]["params"]["batch_size"] == 1


def _append_many(worker: int, num_rows: int) -> None:
    for i in range(num_rows):
        # rows of different sizes, some far above a pipe buffer, so a torn or interleaved write would show
        row = results.make_row("race", {"worker": worker, "i": i, "pad": "y" * (i * 997 % 9000)}, {"x": 1.0}, env=ENV)
        results.append_rows([row])


def test_concurrent_appends_from_several_processes_lose_and_interleave_nothing(data_dir):
    ctx = multiprocessing.get_context("fork")  # fork: the children inherit LABKIT_DATA_DIR and skip re-imports
    workers = [ctx.Process(target=_append_many, args=(w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=60)
        assert p.exitcode == 0
    lines = (data_dir / "results.jsonl").read_bytes().splitlines()
    assert len(lines) == 100 and all(json.loads(line)["technique"] == "race" for line in lines)
    df = results.load_results()
    assert set(zip(df["params.worker"], df["params.i"])) == {(w, i) for w in range(4) for i in range(25)}


def test_write_json_atomic(tmp_path):
    path = results.write_json_atomic(tmp_path / "bench" / "decode.json", {"tokens_per_s": np.float64(2.5),
                                                                        "bad": float("nan")})
    assert json.loads(path.read_text()) == {"tokens_per_s": 2.5, "bad": None}
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_check_writable_refuses_what_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    assert results.check_writable(tmp_path / "new" / "deeper" / "out.json") == tmp_path / "new" / "deeper" / "out.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(ValueError, match="is a file, not a folder"):
        results.check_writable(tmp_path / "file" / "out.json")
    with pytest.raises(ValueError, match="expected a file"):
        results.check_writable(tmp_path)
    with pytest.raises(ValueError, match="expected a folder"):
        results.check_writable(tmp_path / "file", is_dir=True)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="permission denied"):
            results.check_writable(locked / "out.json")


def test_the_default_store_is_untracked_and_never_the_committed_reference(monkeypatch):
    monkeypatch.delenv("LABKIT_DATA_DIR", raising=False)
    repo = results.reference_data_dir().parent
    assert results.local_data_dir() == repo / "runs" / "store" == results.store_path().parent
    assert results.reference_data_dir() == repo / "data"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(results.store_path())], cwd=repo)
    assert ignored.returncode == 0, "runs/store/ must be ignored by git"


@pytest.fixture
def frame():
    rows = [results.make_row("decode", {"variant": v, "batch_size": b, "dtype": "auto" if b == 1 else 4},
                             {"tokens_per_s": 10.0 * b, "tokens_per_s_runs": [1.0, 2.0]}, env={"cpu": "c"})
            for v in ("hf", "labkit") for b in (1, 4)]
    return analysis.rows_frame(results.stamp_rows(rows, run_id="r1"))


@pytest.mark.parametrize("fmt", results.EXPORT_FORMATS)
def test_export_writes_csv_and_parquet_atomically(frame, fmt, tmp_path):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    path = results.export_frame(frame, tmp_path / "out" / f"rows.{fmt}", fmt)
    back = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    assert list(back["metrics.tokens_per_s"]) == [10.0, 40.0, 10.0, 40.0] and list(back["run"]) == ["r1"] * 4
    assert json.loads(back["metrics.tokens_per_s_runs"].iloc[0]) == [1.0, 2.0]  # lists as JSON text
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    with pytest.raises(ValueError, match="unknown export format 'xlsx'"):
        results.export_frame(frame, tmp_path / "x.xlsx", "xlsx")


def test_parquet_without_pyarrow_is_a_one_line_error(frame, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(ValueError, match="^Parquet export needs pyarrow: pip install pyarrow") as info:
        results.export_frame(frame, tmp_path / "rows.parquet", "parquet")
    assert "\n" not in str(info.value) and not (tmp_path / "rows.parquet").exists()


def test_load_results_documents_its_columns():
    doc = results.load_results.__doc__
    assert all(name in doc for name in ("`run`", "`timestamp`", "params.", "metrics.", "env.", "DataFrame"))
