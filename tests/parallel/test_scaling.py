"""The alpha-beta model of tensor-parallel decode: its arithmetic, its calibration, and gpt-fast's published points."""

import pytest

from labkit.parallel import scaling
from labkit.parallel.scaling import LINKS, DecodeCost, Link, predict


def test_ring_all_reduce_alpha_beta_terms():
    link = Link("test", alpha_us=2.0, bandwidth_gbps=1.0, launch_us=3.0)  # 1 GB/s = 1000 bytes per µs
    assert link.all_reduce_us(8000, 1) == 0
    assert link.all_reduce_us(8000, 2) == pytest.approx(3 + 2 * 2 + 1 * 8000 / 1000)
    assert link.all_reduce_us(8000, 4) == pytest.approx(3 + 6 * 2 + 1.5 * 8000 / 1000)


def test_two_nodes_cost_more_than_one_over_the_same_gpus():
    n = 8192
    one = LINKS["nvlink4"].all_reduce_us(n, 16)
    two = scaling.hierarchical_all_reduce_us(n, 8, 2, LINKS["nvlink4"], LINKS["eth100"])
    assert two > one and scaling.hierarchical_all_reduce_us(n, 8, 1, LINKS["nvlink4"], LINKS["eth100"]) == \
        LINKS["nvlink4"].all_reduce_us(n, 8)


def test_calibration_reproduces_the_measured_step_and_bounds_the_prediction():
    cost = DecodeCost("m", num_layers=10, layer_bytes=1e8, head_bytes=1e8, message_bytes=4096, bandwidth_gbps=1000)
    fixed, scales = cost.calibrated(2.0, "fixed"), cost.calibrated(2.0, "scales")
    assert fixed.step_ms_1 == pytest.approx(2.0) and scales.step_ms_1 == pytest.approx(2.0)
    low, high = predict(fixed, 4, LINKS["nvlink4"]), predict(scales, 4, LINKS["nvlink4"])
    assert low["tokens_per_s"] < high["tokens_per_s"]
    assert low["comm_ms"] == high["comm_ms"] == pytest.approx(2 * 10 * LINKS["nvlink4"].all_reduce_us(4096, 4) / 1e3)
    with pytest.raises(ValueError, match="nodes of 3"):
        predict(fixed, 4, LINKS["nvlink4"], gpus_per_node=3, inter=LINKS["eth100"])


def test_preset_bytes_match_the_models():
    cost = scaling.preset_cost("llama-8b", scaling.DEVICES["h200"], context_len=0)
    assert (cost.num_layers * cost.layer_bytes + cost.head_bytes) / 1e9 == pytest.approx(15.0, rel=0.02)  # bf16
    assert cost.message_bytes == 4096 * 2
    with pytest.raises(ValueError, match="unknown preset"):
        scaling.preset_cost("gpt-5", scaling.DEVICES["h200"])


def test_gpt_fast_published_points_fall_in_the_models_band():
    check = scaling.gpt_fast_check()
    assert len(check) == len(scaling.GPT_FAST_TP)
    assert all(c["is_within"] for c in check), [(c["model"], c["gpus"]) for c in check if not c["is_within"]]


def test_pcie_scales_worse_than_nvlink():
    rows = scaling.preset_bands(("llama-8b",))
    at8 = {(r["setup"], r["bound"]): r["tokens_per_s"] for r in rows if r["gpus"] == 8 and r["setup"].startswith("1")}
    for bound in ("fixed", "scales"):
        assert at8[(f"1 node, {LINKS['nvlink4'].name}", bound)] > at8[(f"1 node, {LINKS['pcie4'].name}", bound)]


def test_measured_link_inverts_the_fit():
    link = scaling.measured_link(alpha_us=100.0, bandwidth_gbps=2.0, world_size=2)
    assert link.all_reduce_us(1e6, 2) == pytest.approx(100.0 + 1e6 / 2e3)


def _rows():
    shape = {"model": "m", "num_layers": 4, "dim": 64, "layer_weight_bytes": 1e6, "head_weight_bytes": 1e6,
             "batch_size": 1}
    decode = [{"technique": "tp_decode", "params": {**shape, "world_size": w},
               "metrics": {"compute_ms_per_step": 1.0, "bandwidth_gbps": 10.0, "tokens_per_s": 900.0 * w}}
              for w in (1, 2)]
    sweep = [{"technique": "tp_allreduce", "params": {"world_size": 2},
              "metrics": {"fit_alpha_us": 50.0, "fit_bandwidth_gbps": 1.0}}]
    return decode, sweep


def test_the_model_fed_by_bench_rows_predicts_the_larger_world():
    from labkit.parallel.bench import add_predictions

    decode, sweep = _rows()
    p = scaling.predict_from_rows(decode, sweep, 2)
    assert p["comm_ms"] == pytest.approx(2 * 4 * (50 + 256 / 1e3) / 1e3)  # 8 all-reduces of one fp32 row
    assert p["compute_ms"] < 1.0  # the layers' bytes split in two
    rows = decode + sweep
    add_predictions(rows)
    assert rows[1]["metrics"]["model_tokens_per_s"] == pytest.approx(p["tokens_per_s"])
    assert "model_tokens_per_s" not in rows[0]["metrics"]


def test_a_fit_without_a_bytes_term_is_latency_only():
    link = scaling.measured_link(alpha_us=80.0, bandwidth_gbps=None, world_size=2)
    assert link.all_reduce_us(1e9, 2) == pytest.approx(80.0)


def test_the_preset_predictions_read_their_inputs_from_the_committed_data_file():
    import json

    from labkit.device import repo_root

    path = repo_root() / "data" / scaling.SCALING_INPUTS
    on_disk = json.loads(path.read_text())
    h200 = on_disk["h200"]
    assert {"source", "date", "hardware", "method"} <= set(h200) and "MEASUREMENTS.md" in h200["source"]
    assert h200["decode_tokens_per_s"]["1"] == {"llama-1b": 261.0, "llama-8b": 136.1}  # the log's H200 table
    assert h200["decode_tokens_per_s"]["16"]["llama-1b"] == 3123.0
    assert scaling.measured_tokens_per_s("llama-8b") == 136.1
    assert not hasattr(scaling, "H200_MEASURED_TOKENS_PER_S")  # no figure typed into code any more
    rows = scaling.preset_bands(("llama-1b",))
    assert all(r["is_prediction"] and r["calibrated_on"] == h200["source"] for r in rows)
    one = next(r for r in rows if r["gpus"] == 1 and r["bound"] == "fixed" and "NVLink" in r["setup"])
    assert one["tokens_per_s"] == pytest.approx(261.0)  # calibrated: one GPU reproduces the measurement


def test_other_inputs_change_the_prediction_and_bad_names_are_refused(tmp_path):
    import json

    inputs = scaling.load_scaling_inputs()
    inputs["h200"]["decode_tokens_per_s"]["1"]["llama-1b"] = 130.5
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps(inputs))
    rows = scaling.preset_bands(("llama-1b",), inputs=scaling.load_scaling_inputs(path))
    assert min(r["tokens_per_s"] for r in rows if r["gpus"] == 1) == pytest.approx(130.5)
    with pytest.raises(ValueError, match="unknown preset 'llama-70b': choose one of llama-1b, llama-8b"):
        scaling.measured_tokens_per_s("llama-70b")
    with pytest.raises(ValueError, match="unknown batch_size '4'"):
        scaling.measured_tokens_per_s("llama-1b", batch_size=4)
    with pytest.raises(FileNotFoundError, match="scaling inputs not found: .*missing.json"):
        scaling.load_scaling_inputs(tmp_path / "missing.json")
