"""`labkit bench servers`: the interleaved plan, the matched-pair ratios, and a real A/A run of two `labkit serve`
processes on a tiny dummy model."""

import json
import math

import pytest

from labkit.bench import servers
from labkit.bench.servers import LOADS, pick_loads, plan, summary_rows

ENV = {"device": "cpu"}


def test_the_order_of_the_servers_turns_over_each_repeat_and_each_measurement_has_prompts_of_its_own():
    loads = pick_loads(["burst", "one"])
    steps = plan(["a", "b", "c"], loads, repeats=3, seed=5)
    assert len(steps) == 3 * 2 * 3
    firsts = [[s["server"] for s in steps if s["repeat"] == r and s["load"].name == "burst"] for r in range(3)]
    assert firsts == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    by_pair = {}
    for s in steps:
        by_pair.setdefault((s["repeat"], s["load"].name), set()).add((s["seed"], s["salt"]))
    assert all(len(v) == 1 for v in by_pair.values())  # the servers of a pair get the same prompts and arrivals
    assert len({next(iter(v)) for v in by_pair.values()}) == len(by_pair)  # and no other pair gets them


def test_loads_are_picked_by_name_and_a_bad_one_is_named():
    assert [load.name for load in pick_loads(["one", "poisson-8"], num_prompts=3)] == ["one", "poisson-8"]
    assert pick_loads(["poisson-8"], num_prompts=3)[0].num_prompts == 3
    assert LOADS["poisson-8"].request_rate == 8.0 and math.isinf(LOADS["burst"].request_rate)
    with pytest.raises(ValueError, match="unknown load 'warp'"):
        pick_loads(["burst", "warp"])
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        plan(["a", "b"], pick_loads(["burst"]), repeats=0)


def _row(repeat, server, tok_s, ttft, tpot, load="burst"):
    step = {"repeat": repeat, "load": LOADS[load], "server": server, "position": 0, "seed": 0, "salt": "s"}
    result = {"metrics": {"output_throughput_tokens_per_s": tok_s, "median_ttft_ms": ttft, "median_tpot_ms": tpot}}
    return servers.measurement_row(step, result, ENV)


def test_each_ratio_comes_from_a_matched_pair_and_the_summary_gives_their_median_and_range():
    rows = [_row(0, "ref", 100, 50, 10), _row(0, "peer", 80, 100, 20),  # pair 0: 1.25x, TTFT 2x, TPOT 2x
            _row(1, "peer", 100, 50, 10), _row(1, "ref", 90, 50, 10),  # pair 1: 0.9x
            _row(2, "ref", 120, 25, 5), _row(2, "peer", 100, 50, 10)]  # pair 2: 1.2x
    [summary] = summary_rows(rows, "ref", ENV)
    m, p = summary["metrics"], summary["params"]
    assert p["server"] == "peer" and p["reference"] == "ref" and p["num_pairs"] == 3
    assert m["throughput_x_pairs"] == pytest.approx([1.25, 0.9, 1.2])
    assert m["throughput_x"] == pytest.approx(1.2)  # the median of the pairs, not a ratio of medians
    assert (m["throughput_x_min"], m["throughput_x_max"]) == pytest.approx((0.9, 1.25))
    assert m["ttft_x_pairs"] == pytest.approx([2.0, 1.0, 2.0])  # > 1: the reference answered first sooner
    assert m["decode_speed_x_pairs"] == pytest.approx([2.0, 1.0, 2.0])
    assert (m["reference_tokens_per_s"], m["peer_tokens_per_s"]) == (100, 100)
    assert "burst" in servers.format_table(rows + [summary])


def test_a_pair_with_a_missing_side_gives_no_ratio():
    rows = [_row(0, "ref", 100, 50, 10), _row(0, "peer", 80, 100, 20), _row(1, "ref", 90, 50, 10)]
    [summary] = summary_rows(rows, "ref", ENV)
    assert summary["metrics"]["throughput_x_pairs"] == pytest.approx([1.25])


@pytest.mark.slow
def test_an_a_b_run_of_two_labkit_servers_gives_stamped_rows_of_matched_pairs(run_cli, tmp_path):
    out = tmp_path / "servers.json"
    code, stdout, stderr = run_cli("bench", "servers", "--peers", "labkit", "--model", "tiny-smollm2", "--dummy",
                                   "--loads", "burst,one", "--num-prompts", "3", "--repeats", "2", "--num-warmups",
                                   "0", "--labkit-args", "--max-num-seqs 2", "--json", "--output", str(out))
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert json.loads(out.read_text()) == rows and all(r["env"] and r["run_id"] for r in rows)
    measured = [r for r in rows if r["params"]["kind"] == "measurement"]
    assert [(r["params"]["repeat"], r["params"]["load"]["name"], r["params"]["server"]) for r in measured] == [
        (0, "burst", "labkit"), (0, "burst", "labkit (peer)"), (0, "one", "labkit"), (0, "one", "labkit (peer)"),
        (1, "burst", "labkit (peer)"), (1, "burst", "labkit"), (1, "one", "labkit (peer)"), (1, "one", "labkit")]
    assert all(r["metrics"]["num_completed"] == 3 and not r["metrics"]["errors"] for r in measured)
    for i in range(0, len(measured), 2):  # a pair: the same prompts, so the same prompt tokens
        a, b = measured[i]["metrics"], measured[i + 1]["metrics"]
        assert a["total_input_tokens"] == b["total_input_tokens"] and a["total_output_tokens"] == b[
            "total_output_tokens"]
    assert all(r["params"]["peer"]["server"] == "labkit" and r["params"]["peer"]["version"] for r in measured)
    flags = {r["params"]["server"]: r["params"]["peer"]["flags"] for r in measured}  # --labkit-args: the peer's
    assert flags == {"labkit": ["--model", "tiny-smollm2", "--dummy"],
                     "labkit (peer)": ["--model", "tiny-smollm2", "--dummy", "--max-num-seqs", "2"]}
    summary = [r for r in rows if r["params"]["kind"] == "summary"]
    assert [(r["params"]["load"]["name"], r["params"]["num_pairs"]) for r in summary] == [("burst", 2), ("one", 2)]
    assert all(r["metrics"]["throughput_x"] > 0 for r in summary) and "x tok/s" in stderr


@pytest.mark.parametrize("argv, message", [
    (["--peers", "none"], "no peer to compare with"),
    (["--peers", "labkit", "--loads", "burst,warp"], "unknown load 'warp'"),
    (["--peers", "vllm", "--vllm-python", "/bin/sh"], "serves the embedded model, not a --dummy one"),
])
def test_bench_servers_errors_are_one_line_before_any_server_starts(run_cli, argv, message):
    code, _, stderr = run_cli("bench", "servers", "--model", "tiny-smollm2", "--dummy", *argv)
    assert code == 2 and message in stderr and stderr.count("\n") == 1
