"""`labkit baseline`: the JSON contract, determinism, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest


def test_json_row_from_the_embedded_model(run_cli, embedded):
    code, out, err = run_cli("baseline", "--prompt", "Hello, world!", "--max-tokens", "8", "--json",
                               "--repeats", "2")
    assert code == 0
    rows = json.loads(out)  # stdout holds only JSON
    (row,) = rows
    m = row["metrics"]
    assert m["load_s"] > 0 and m["ttft_ms"] > 0 and m["decode_tokens_per_s"] > 0
    assert m["num_new_tokens"] == 8 or m["finish_reason"] == "stop"
    assert row["params"]["model"] == "smollm2-135m-instruct" and row["text"]
    assert row["env"]["torch"] and "TTFT" in err


def test_greedy_is_deterministic_across_runs_and_engines(run_cli, embedded):
    texts = []
    for engine in ("hf", "hf", "labkit"):
        code, out, _ = run_cli("baseline", "--prompt", "The capital of France is", "--max-tokens", "12",
                               "--engine", engine, "--json", "--no-save", "--repeats", "1")
        assert code == 0
        texts.append(json.loads(out)[0]["text"])
    assert texts[0] == texts[1] == texts[2]


def test_rows_are_saved(run_cli, embedded, tmp_path, monkeypatch):
    from labkit.lab.results import load_results

    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path))
    assert run_cli("baseline", "--max-tokens", "2", "--engine", "labkit", "--repeats", "1")[0] == 0
    df = load_results()
    assert list(df["technique"]) == ["baseline"] and df["metrics.ttft_ms"].iloc[0] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--max-tokens", "-5"], "-5"),
    (["--max-tokens", "zero"], "zero"),
    (["--device", "tpu"], "tpu"),
    (["--temperature", "-1"], "-1"),
    (["--top-p", "2"], "top-p"),
    (["--dtype", "int3"], "int3"),
    (["--engine", "vllm"], "vllm"),
    (["--model", "./no/such/dir"], "no/such/dir"),
])
def test_bad_arguments_give_one_line_and_exit_2(run_cli, argv, needle):
    code, _, err = run_cli("baseline", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_unknown_hub_model_names_the_embedded_default(run_cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli("baseline", "--model", "facebook/opt-125m-nope")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "smollm2-135m-instruct" in err


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "LABKIT_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "baseline", "--model", "tiny-smollm2", "--dummy",
                          "--max-tokens", "3", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["metrics"]["num_new_tokens"] == 3


def test_cold_run_is_reported_apart_from_the_warm_median(tiny, capsys):
    import statistics

    from labkit.bench.baseline import run_baseline

    row = run_baseline(prompt="Hello", max_tokens=4, model="tiny-smollm2", dummy=True, device="cpu", repeats=3,
                       engine="labkit", progress=True)
    m = row["metrics"]
    assert m["num_repeats"] == 3 and m["num_warmup"] == 1 and len(m["ttft_ms_runs"]) == 3
    assert m["ttft_ms"] == statistics.median(m["ttft_ms_runs"]) and m["cold_ttft_ms"] > 0
    assert m["decode_tokens_per_s"] == statistics.median(m["decode_tokens_per_s_runs"])
    assert row["params"]["repeats"] == 3 and row["env"]["device"] == "cpu"
    assert "baseline" in capsys.readouterr().err  # the progress bar


def test_label_and_run_id_are_saved(run_cli, tmp_path, monkeypatch):
    from labkit.lab.results import read_rows

    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path))
    code, out, err = run_cli("baseline", "--model", "tiny-smollm2", "--dummy", "--max-tokens", "2",
                             "--repeats", "1", "--label", "first try", "--json", "--no-progress")
    assert code == 0
    (printed,) = json.loads(out)
    (stored,) = read_rows()
    assert stored["label"] == printed["label"] == "first try" and stored["run_id"] == printed["run_id"]
    assert "cold first run" in err


def test_sweep_rows_record_model_device_and_repeats(tiny):
    from labkit.bench.baseline import measure_grid, sweep_rows
    from labkit.engine.engine import Engine

    engine = Engine.from_hf(tiny.model, tiny.tokenizer, name=tiny.name)
    grid = measure_grid(engine, prompt_lengths=(4,), new_tokens=(2, 3), repeats=1)
    rows = sweep_rows(grid)
    assert [r["params"]["new_tokens"] for r in rows] == [2, 3]
    for row in rows:
        assert row["technique"] == "baseline-sweep"
        assert {k: row["params"][k] for k in ("model", "device", "repeats", "engine")} == \
            {"model": tiny.name, "device": "cpu", "repeats": 1, "engine": "labkit"}
        assert row["env"]["device"] == "cpu" and row["metrics"]["ttft_ms"] > 0
