"""Reading the results store with pandas: runs listed, rows tabulated, runs compared, legacy runs grouped."""

import pytest

from labkit.lab import analysis, results
from tests.lab.results_rows import append_two_runs, warnings_of


@pytest.fixture
def two_runs():
    return append_two_runs()


def test_list_runs_one_line_each(two_runs):
    runs = analysis.list_runs(two_runs)
    assert list(runs["run"]) == ["run-a", "run-b"] and list(runs["label"]) == ["before", "after"]
    assert list(runs["rows"]) == [4, 4] and runs["engines"].iloc[0] == "hf-fp32, labkit-fp32"


def test_compare_by_label_lines_cases_up_with_ratios(two_runs):
    table = analysis.compare(two_runs, by="label", metric="tokens_per_s")
    assert list(table.columns) == ["before", "after", "after / before"]
    assert table.index.names == ["technique", "engine", "batch_size"]
    assert table.loc[("decode", "labkit-fp32", 4), "after"] == 60.0
    assert (table["after / before"] == 1.5).all()


def test_compare_by_engine_and_select(two_runs):
    table = analysis.compare(analysis.select(two_runs, labels=["after"]), by="engine")  # default: tokens_per_s
    assert list(table.columns)[:2] == ["hf-fp32", "labkit-fp32"] and len(table) == 2
    with pytest.raises(ValueError, match="two or more"):
        analysis.compare(analysis.select(two_runs, runs=["run-a"]), by="label")
    with pytest.raises(ValueError, match="unknown run 'zzz'"):
        analysis.select(two_runs, runs=["zzz"])
    with pytest.raises(ValueError, match="labels here: after, before"):
        analysis.select(two_runs, labels=["nope"])
    assert set(analysis.select(two_runs, runs=["last"])["run"]) == {"run-b"}


def test_tabulate_shows_the_params_that_vary(two_runs):
    table = analysis.tabulate(two_runs)
    assert list(table.columns) == ["run", "label", "technique", "engine", "batch_size", "tokens_per_s", "ttft_ms"]


def test_rows_before_run_ids_form_legacy_runs():
    rows = [{"technique": "decode", "timestamp": f"2026-01-01T00:00:{s:02d}+00:00"} for s in (0, 30, 59)]
    rows += [{"technique": "batching", "timestamp": "2026-01-01T00:01:05+00:00"},
             {"technique": "batching", "timestamp": "2026-01-01T00:09:00+00:00"}, {"technique": "x", "run_id": "r"}]
    keys = analysis.run_keys(rows)
    assert keys[:3] == ["legacy-20260101T000000Z"] * 3
    assert keys[3:] == ["legacy-20260101T000105Z", "legacy-20260101T000900Z", "r"]


def test_shipped_reference_store_reads_cleanly():
    path = results.reference_data_dir() / results.RESULTS_FILE
    df, messages = warnings_of(lambda: results.load_results(path))
    assert messages == [] and not analysis.list_runs(df).empty


def test_a_row_without_a_timestamp_is_listed_last_not_a_crash():
    rows = [{"technique": "decode", "metrics": {"tokens_per_s": 1.0}, "run_id": "by-hand"},
            {"technique": "decode", "metrics": {"tokens_per_s": 2.0}, "run_id": "stamped",
             "timestamp": "2026-01-01T00:00:00+00:00"}]
    runs = analysis.list_runs(analysis.rows_frame(rows))
    assert list(runs["run"]) == ["stamped", "by-hand"] and runs["start"].isna().tolist() == [False, True]
    assert list(analysis.list_runs(analysis.rows_frame(rows[:1]))["run"]) == ["by-hand"]  # no timestamp column


def _serve_row(label, port, ttft_ms, cpu="test-cpu"):
    params = {"base_url": f"http://127.0.0.1:{port}", "port": port, "result_file": f"/tmp/bench_serve_{port}.json",
              "request_rate": 2.0, "num_prompts": 10}
    row = results.make_row("bench_serve", params, {"median_ttft_ms": ttft_ms}, env={"cpu": cpu, "num_cpus": 2})
    return {**row, "label": label, "run_id": f"run-{port}"}


def test_bench_serve_runs_on_random_ports_line_up():
    df = analysis.rows_frame([_serve_row("before", 41234, 100.0), _serve_row("after", 45678, 80.0)])
    table = analysis.compare(df, by="label")
    assert len(table) == 1 and table["after / before"].iloc[0] == 0.8
    assert "base_url" not in table.index.names and "port" not in table.index.names


def test_compare_names_each_sides_hardware_and_warns_when_they_differ():
    same = analysis.compare(analysis.rows_frame([_serve_row("a", 1, 1.0), _serve_row("b", 2, 2.0)]), by="label")
    assert same.attrs["hardware"] == {"a": ["test-cpu (2 cpus)"], "b": ["test-cpu (2 cpus)"]}
    assert analysis.hardware_warnings(same.attrs["hardware"]) == []
    rows = [_serve_row("a", 1, 1.0, cpu="AMD EPYC"), _serve_row("b", 2, 2.0, cpu="Intel Xeon")]
    rows.append({**rows[1], "env": {"gpu": "NVIDIA H100", "cpu": "Intel Xeon"}})
    table = analysis.compare(analysis.rows_frame(rows), by="label")
    assert table.attrs["hardware"] == {"a": ["AMD EPYC (2 cpus)"], "b": ["Intel Xeon (2 cpus)", "NVIDIA H100"]}
    warnings = analysis.hardware_warnings(table.attrs["hardware"])
    assert len(warnings) == 2 and "'b' mixes rows from Intel Xeon (2 cpus) and NVIDIA H100" in warnings[0]
    assert "AMD EPYC (2 cpus)" in warnings[1] and "Intel Xeon (2 cpus)" in warnings[1] and "'b / a'" in warnings[1]


def test_one_cpu_name_with_different_vector_extensions_is_different_hardware():
    rows = [_serve_row("a", 1, 1.0, cpu="AMD EPYC"), _serve_row("b", 2, 2.0, cpu="AMD EPYC")]
    rows = [{**row, "env": {**row["env"], "cpu_capability": cap}} for row, cap in zip(rows, ("AVX2", "AVX512"))]
    hardware = analysis.compare(analysis.rows_frame(rows), by="label").attrs["hardware"]
    assert hardware == {"a": ["AMD EPYC (2 cpus, AVX2)"], "b": ["AMD EPYC (2 cpus, AVX512)"]}
    assert len(analysis.hardware_warnings(hardware)) == 1
