"""`labkit results`: the runs, a table of rows, a comparison, as text or JSON; one-line errors and warnings."""

import json

import pytest

from tests.lab.results_rows import append_two_runs


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    path = tmp_path / "data"
    monkeypatch.setenv("LABKIT_DATA_DIR", str(path))
    return path


@pytest.fixture
def two_runs(data_dir):
    return append_two_runs()


def test_results_command_lists_compares_and_speaks_json(two_runs, run_cli):
    code, out, _ = run_cli("results")
    assert code == 0 and "run-a" in out and "before" in out
    code, out, _ = run_cli("results", "--compare", "label", "--json")
    records = json.loads(out)
    assert code == 0 and {r["after / before"] for r in records} == {1.5}
    code, out, _ = run_cli("results", "--rows", "--run", "run-b", "--json")
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == ["run-b"] * 4
    code, out, _ = run_cli("results", "--rows", "--engine", "labkit-fp32")
    assert code == 0 and "hf-fp32" not in out and out.count("labkit-fp32") == 4


def test_results_command_errors_and_warnings_are_one_line(two_runs, data_dir, run_cli):
    code, _, err = run_cli("results", "--run", "nope")
    assert code == 2 and err.count("\n") == 1 and "unknown run 'nope'" in err
    code, _, err = run_cli("results", "--compare", "label", "--metric", "joules")
    assert code == 2 and "no metric 'joules'" in err and "tokens_per_s" in err
    code, _, err = run_cli("results", "--compare", "colour")
    assert code == 2 and err.count("\n") == 1
    with open(data_dir / "results.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage\n")
    code, out, err = run_cli("results")
    assert code == 0 and "run-b" in out
    assert err.startswith("labkit results: warning: ") and "results.jsonl:9: not UTF-8" in err


def test_results_command_on_an_empty_store(run_cli):
    code, out, err = run_cli("results", "--json")
    assert code == 0 and json.loads(out) == [] and "no results" in err


def test_a_missing_file_is_an_error_naming_it(two_runs, tmp_path, run_cli):
    code, out, err = run_cli("results", "--file", str(tmp_path / "nope.jsonl"))
    assert (code, out) == (2, "") and err == f"labkit results: --file {tmp_path / 'nope.jsonl'}: no such file\n"


def test_reference_reads_the_committed_store(two_runs, run_cli):
    code, out, _ = run_cli("results", "--reference")
    assert code == 0 and "run-a" not in out and "decode" in out


def test_compare_says_which_hardware_each_side_ran_on(data_dir, run_cli):
    from labkit.lab import results
    from tests.lab.results_rows import decode_row

    results.append_rows([decode_row("hf-fp32", 1, 10.0)], run_id="a", label="before")
    results.append_rows([{**decode_row("hf-fp32", 1, 20.0), "env": {"cpu": "other-cpu", "num_cpus": 4}}],
                        run_id="b", label="after")
    code, out, err = run_cli("results", "--compare", "label", "--json")
    assert code == 0 and json.loads(out)[0]["after / before"] == 2.0  # stdout stays JSON
    lines = err.splitlines()
    assert lines[:2] == ["labkit results: label 'before' ran on test-cpu", "labkit results: label 'after' ran on "
                                                                          "other-cpu (4 cpus)"]
    assert lines[2].startswith("labkit results: warning: 'after' ran on other-cpu (4 cpus) but 'before' on test-cpu")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_the_rows_runs_and_comparison(two_runs, tmp_path, run_cli, fmt):
    import pandas as pd

    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    read = pd.read_csv if fmt == "csv" else pd.read_parquet
    code, out, err = run_cli("results", "--rows", "--label", "after", "--format", fmt, "--out", str(tmp_path / "r"))
    rows = read(tmp_path / "r")
    assert code == 0 and out == "" and f"wrote 4 lines to {tmp_path / 'r'}" in err
    assert set(rows["label"]) == {"after"} and "env.cpu" in rows
    assert sorted(rows["metrics.tokens_per_s"]) == [15, 15, 60, 60]
    assert run_cli("results", "--format", fmt, "--out", str(tmp_path / "runs"))[0] == 0
    assert list(read(tmp_path / "runs")["run"]) == ["run-a", "run-b"]
    assert run_cli("results", "--compare", "label", "--format", fmt, "--out", str(tmp_path / "cmp"))[0] == 0
    assert set(read(tmp_path / "cmp")["after / before"]) == {1.5}


def test_format_needs_out_and_refuses_json(two_runs, tmp_path, run_cli):
    code, _, err = run_cli("results", "--format", "csv")
    assert code == 2 and err == "labkit results: --format and --out go together: e.g. --format csv --out results.csv\n"
    code, _, err = run_cli("results", "--format", "csv", "--out", str(tmp_path / "x.csv"), "--json")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "x.csv").exists()
