"""`labkit bench kernels`: on a CPU the correctness part alone, under the interpreter, saying why; on a GPU the
sweep with three providers, GB/s or TFLOP/s and the fraction of the measured peak."""

import json

import pytest

from labkit import cli
from labkit.bench_kernels import GPU_SWEEP, OPS, format_table, run_kernel_bench
from labkit.kernels.common import can_run_on


def test_every_op_has_a_sweep_and_a_cpu_check():
    from labkit.bench_kernels import CPU_SWEEP

    assert set(OPS) == set(CPU_SWEEP) == {"rms_norm", "swiglu", "softmax", "rope", "flash_attention",
                                          "decode_attention"}
    assert any(s[1] == 4096 and s[4] == 128 for s in GPU_SWEEP["flash_attention"][1])  # the yardstick


@pytest.mark.skipif(not can_run_on("cpu"), reason="needs TRITON_INTERPRET=1")
def test_cli_on_cpu_checks_correctness_only_and_says_why(capsys):
    assert cli.main(["bench", "kernels", "--ops", "rms_norm,softmax", "--device", "cpu", "--json",
                     "--no-progress"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert {r["params"]["op"] for r in rows} == {"rms_norm", "softmax"} and len(rows) == 4
    assert all(r["metrics"]["timed"] is False and r["metrics"]["max_abs_error"] < 0.1 for r in rows)
    assert all(r["env"]["device"] == "cpu" and r["run_id"] for r in rows)
    assert "no CUDA device" in captured.err and "correctness only" in captured.err


def test_unknown_op_is_one_line_error(capsys):
    assert cli.main(["bench", "kernels", "--ops", "gemm", "--device", "cpu", "--no-save"]) == 2
    assert "labkit bench kernels: unknown op 'gemm'" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_sweep_reports_bandwidth_against_the_measured_peak():
    rows = run_kernel_bench(["rms_norm"], device="cuda")
    assert {r["params"]["provider"] for r in rows} == {"torch", "compile", "triton"}
    for r in rows:
        m = r["metrics"]
        assert m["timed"] and m["bandwidth_gbps"] > 0 and 0 < m["fraction_of_peak"] < 1.5
        assert m["peak_bandwidth_gbps"] > 500 and r["env"]["gpu"]
    assert "% peak" in format_table(rows)
