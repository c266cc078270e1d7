"""`labkit bench stack` on a tiny random model: cumulative stage settings, the rows' structure and labels, the
JSON on stdout, and one-line errors."""

import json
import math

import pytest

from labkit.bench import stack
from labkit.bench.stack import STAGE_NAMES, StackLoad, run_stack_bench, stage_settings

TINY_LOAD = StackLoad(num_requests=3, input_len=6, output_len=4, batch1_requests=2, num_warmups=1)


def test_stages_accumulate_in_order_and_a_skipped_stage_adds_nothing():
    stages = stage_settings(STAGE_NAMES)
    assert [s["name"] for s in stages] == list(STAGE_NAMES)
    last = stages[-1]["settings"]
    assert last["dtype"] == "bf16" and last["compile"] and last["enable_prefix_caching"] and last["max_num_seqs"] == 64
    assert last["speculative"]["method"] == "ngram"
    chosen = stage_settings(["prefix", "hf", "batching"])  # any order in, STAGES' order out
    assert [s["name"] for s in chosen] == ["hf", "batching", "prefix"]
    assert chosen[-1]["settings"]["dtype"] == "fp32" and not chosen[-1]["settings"]["compile"]
    assert not stages[0]["settings"]["enable_prefix_caching"], "the prefix cache is its own stage"
    with pytest.raises(ValueError, match="unknown stage 'fast'"):
        stage_settings(["hf", "fast"])


def test_every_stage_gets_prompts_of_its_own_with_the_shared_prefix():
    load = StackLoad(num_requests=4, input_len=5, output_len=2, prefix_len=3)
    a, b = stack.stage_prompts(load, "engine-load"), stack.stage_prompts(load, "batching-load")
    assert {p.prompt for p in a}.isdisjoint(p.prompt for p in b)
    prefix = " ".join(a[0].prompt.split()[:3])
    assert all(p.prompt.startswith(prefix) and p.input_words == 8 for p in a)
    assert not b[0].prompt.startswith(prefix)
    with pytest.raises(ValueError, match="num_requests"):
        StackLoad(num_requests=0)


def test_a_stage_setting_that_does_not_exist_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown stage setting 'fast'"):
        stack.build_engine(tiny, {"fast": True})
    with pytest.raises(ValueError, match="speculative method"):
        stack.stage_config({"speculative": {"method": "eagle"}})


def test_a_stage_is_one_engine_config():
    config = stack.stage_config({"dtype": "bf16", "quantize": "int8", "max_num_seqs": 8, "speculative": {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}})
    assert (config.model.dtype, config.model.quantization, config.scheduler.max_num_seqs) == ("bf16", "int8", 8)
    assert (config.speculative.method, config.speculative.num_speculative_tokens) == ("ngram", 3)
    assert not config.enable_prefix_caching and config.speculative.prompt_lookup_max == 2


def test_two_stages_through_the_server_give_labelled_rows(tiny):
    result = run_stack_bench(tiny, ["hf", "batching"], TINY_LOAD, prefill=StackLoad(num_requests=2, input_len=12,
                                                                                      output_len=1, num_warmups=0))
    rows = result.rows
    assert [(r["params"]["stage"], r["params"]["mode"]) for r in rows[:4]] == [
        ("hf", "load"), ("hf", "batch1"), ("batching", "load"), ("batching", "batch1")]
    assert [r["params"]["stage"] for r in rows[4:]] == ["prefill-fp32", "prefill-bf16", "prefill-int8"]
    by = {(r["params"]["stage"], r["params"]["mode"]): r for r in rows}
    hf = by[("hf", "load")]
    assert hf["params"]["transport"] == "offline, no HTTP" and hf["metrics"]["speedup_vs_hf"] == 1.0
    assert hf["params"]["hf_prompt_tokens"] >= 1 and hf["params"]["version"]
    served = by[("batching", "load")]
    assert served["params"]["transport"].startswith("HTTP") and served["params"]["settings"]["max_num_seqs"] == 64
    for r in rows:
        m = r["metrics"]
        assert r["technique"] == "stack" and r["env"] and m["num_failed"] == 0 and m["tokens_per_s"] > 0
        assert m["num_completed"] == {"load": 3, "batch1": 2, "prefill": 2}[r["params"]["mode"]]
    b = by[("batching", "batch1")]["metrics"]
    assert math.isclose(b["tokens_per_s"], 1e3 / b["median_tpot_ms"])
    assert math.isclose(b["speedup_vs_hf"], b["tokens_per_s"] / by[("hf", "batch1")]["metrics"]["tokens_per_s"])
    assert b["speedup_vs_previous"] == b["speedup_vs_hf"], "HF is the stage before batching here"
    assert by[("prefill-int8", "prefill")]["params"]["settings"]["quantize"] == "int8"
    assert by[("prefill-int8", "prefill")]["params"]["load"]["output_len"] == 1
    json.dumps(result.document(), allow_nan=False)
    assert set(result.frame().stage) == {"hf", "batching", "prefill-fp32", "prefill-bf16", "prefill-int8"}
    assert "HF generate" in stack.format_table(rows)


def test_bench_stack_prints_json_rows_and_stores_them(run_cli, tmp_path):
    out = tmp_path / "stack.json"
    code, stdout, stderr = run_cli("bench", "stack", "--model", "tiny-smollm2", "--dummy", "--stages", "hf,engine",
                                   "--num-requests", "2", "--input-len", "4", "--output-len", "3",
                                   "--batch1-requests", "1", "--num-warmups", "0", "--json", "--output", str(out))
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert [(r["params"]["stage"], r["params"]["mode"]) for r in rows] == [
        ("hf", "load"), ("hf", "batch1"), ("engine", "load"), ("engine", "batch1")]
    assert all(r["run_id"] == rows[0]["run_id"] for r in rows)
    assert json.loads(out.read_text()) == rows and "stage" in stderr


@pytest.mark.parametrize("argv, message", [
    (["--stages", "hf,warp"], "unknown stage 'warp'"),
    (["--peers", "tgi"], "unknown peer 'tgi'"),
    (["--peers", "vllm", "--vllm-python", "/bin/sh"], "serves the embedded model, not a --dummy one"),
])
def test_bench_stack_errors_are_one_line(run_cli, argv, message):
    code, _, stderr = run_cli("bench", "stack", "--model", "tiny-smollm2", "--dummy", *argv)
    assert code == 2 and message in stderr and stderr.count("\n") == 1


def test_bench_stack_without_a_peer_python_fails_before_measuring(run_cli, monkeypatch):
    monkeypatch.delenv("LABKIT_LLAMACPP_PYTHON", raising=False)
    code, _, stderr = run_cli("bench", "stack", "--peers", "llama.cpp")
    assert code == 2 and "LABKIT_LLAMACPP_PYTHON" in stderr


def test_a_peer_gets_the_same_load_and_rows_that_name_it(tiny):
    peer = {"server": "labkit", "flags": ["--model", "tiny-smollm2", "--dummy"], "threads": 1}
    rows = run_stack_bench(tiny, ["hf"], TINY_LOAD, peers=[peer]).rows
    served = [r for r in rows if r["params"]["server"] == "labkit"]
    assert [r["params"]["mode"] for r in served] == ["load", "batch1"]
    for r in served:
        p, m = r["params"], r["metrics"]
        assert p["transport"] == stack.PEER_TRANSPORT and p["version"] and p["flags"] == peer["flags"]
        assert m["num_completed"] == {"load": 3, "batch1": 2}[p["mode"]] and m["speedup_vs_hf"] > 0
        assert m["speedup_vs_previous"] is None, "a peer is no stage of the stack"
