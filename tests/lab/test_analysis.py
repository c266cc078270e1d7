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
