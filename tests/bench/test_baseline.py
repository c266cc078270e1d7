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


# -- a timed repeat does the work it claims: no prompt served from the prefix cache --------------------------
class _SpyEngine:
    """Wraps an engine and records the prompts of its generate calls (everything else passes through)."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params):
        self.prompts += [list(p) for p in prompts]
        return self.engine.generate(prompts, params)


def test_measure_grid_gives_every_timed_run_its_own_prompt(tiny):
    import random

    from labkit.bench.baseline import measure_grid, prefix_hit_tokens
    from labkit.engine.engine import Engine

    engine = Engine.from_hf(tiny.model, tiny.tokenizer, name=tiny.name)
    assert engine.describe()["prefix_caching"] is True  # the default the trap needs
    spy, rng = _SpyEngine(engine), random.Random(0)
    # 40 tokens: two full 16-token blocks that a repeated prompt would find cached
    rows = [r for _ in range(2) for r in measure_grid(spy, prompt_lengths=(40,), new_tokens=(2,), repeats=3, rng=rng)]
    timed = [p for p in spy.prompts if len(p) == 40]  # the warm-up prompts are 8 tokens
    assert len(timed) == 6 and len({tuple(p) for p in timed}) == 6
    assert prefix_hit_tokens(engine) == 0  # nothing came from the cache
    assert all(r["prefix_caching"] is True for r in rows)


def test_fresh_prompts_are_seeded_and_exact_in_length(tiny):
    import random

    from labkit.bench.baseline import fresh_prompt
    from labkit.engine.engine import Engine

    engine = Engine.from_hf(tiny.model, tiny.tokenizer, name=tiny.name)
    a = [fresh_prompt(engine, n, random.Random(5)) for n in (1, 17, 64)]
    b = [fresh_prompt(engine, n, random.Random(5)) for n in (1, 17, 64)]
    assert a == b and [len(p) for p in a] == [1, 17, 64]
    with pytest.raises(ValueError, match="num_tokens.*0"):
        fresh_prompt(engine, 0, random.Random(5))


def test_measure_grid_refuses_timed_runs_the_prefix_cache_served(tiny):
    from labkit.bench.baseline import CachedPromptError, measure_grid
    from labkit.engine.engine import Engine

    engine = Engine.from_hf(tiny.model, tiny.tokenizer, name=tiny.name)
    measure_grid(engine, prompt_lengths=(40,), new_tokens=(2,), repeats=1, rng=7)
    with pytest.raises(CachedPromptError, match="prefix cache served 32 prompt tokens"):
        measure_grid(engine, prompt_lengths=(40,), new_tokens=(2,), repeats=1, rng=7)  # the same seed again
    # without a prefix cache the same prompts are fine: every run computes its whole prompt
    off = Engine.from_hf(tiny.model, tiny.tokenizer, name=tiny.name, enable_prefix_caching=False)
    rows = [measure_grid(off, prompt_lengths=(40,), new_tokens=(2,), repeats=1, rng=7)[0] for _ in range(2)]
    assert [r["prefix_caching"] for r in rows] == [False, False]


def test_sweep_rows_record_prefix_caching(tiny):
    from labkit.bench.baseline import measure_grid, sweep_rows
    from labkit.bench.hf import HFEngine
    from labkit.engine.engine import Engine

    engines = [HFEngine(tiny.model, tiny.tokenizer, name=tiny.name),
               Engine.from_hf(tiny.model, tiny.tokenizer, name=tiny.name)]
    rows = sweep_rows([r for e in engines for r in measure_grid(e, prompt_lengths=(4,), new_tokens=(2,), repeats=1)])
    assert {r["params"]["engine"]: r["params"]["prefix_caching"] for r in rows} == {"hf": None, "labkit": True}


@pytest.mark.parametrize("engine, caching", [("labkit", False), ("hf", None)])
def test_run_baseline_times_its_repeated_prompt_without_the_prefix_cache(tiny, engine, caching):
    from labkit.bench.baseline import run_baseline

    # 40 prompt tokens: the cold run would leave two full blocks for the warm runs to reuse
    prompt = " ".join(["the village"] * 20)
    row = run_baseline(prompt=prompt, max_tokens=2, model="tiny-smollm2", dummy=True, device="cpu", repeats=2,
                       engine=engine)
    assert row["metrics"]["num_prompt_tokens"] >= 33
    assert row["params"]["prefix_caching"] is caching
