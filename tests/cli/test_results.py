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
