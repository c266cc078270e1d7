"""`labkit bench kernels`: on a CPU the correctness part alone, under the interpreter, saying why; on a GPU the
sweep with three providers, GB/s or TFLOP/s and the fraction of the measured peak."""

import json

import pytest

from labkit import cli
from labkit.bench.kernels import GPU_SWEEP, OPS, format_table, run_kernel_bench
from labkit.kernels.common import can_run_on


def test_every_op_has_a_sweep_and_a_cpu_check():
    from labkit.bench.kernels import CPU_SWEEP

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


def _timed_rows():
    """Rows shaped as a GPU sweep writes them (made up here: the figures' code is what is under test)."""
    from labkit.device import describe_environment

    rows, env = [], describe_environment()
    for op, sizes in (("rms_norm", (1, 4096)), ("swiglu", (1, 4096)), ("flash_attention", (1024, 4096))):
        for size in sizes:
            for provider, speed in (("torch", 1.0), ("compile", 1.5), ("triton", 2.0)):
                params = {"op": op, "provider": provider, "dtype": "bf16", "device": "cuda"}
                params.update({"S": size, "H": 32, "HK": 32, "D": 128} if op == "flash_attention" else
                              {"M": size, "N": 4096})
                rows.append({"params": params, "env": env, "metrics": {
                    "timed": True, "bytes": size * 1e6, "flops": size * 1e9, "bandwidth_gbps": 1000 * speed,
                    "tflops": 100 * speed, "fraction_of_peak": speed / 4, "median_ms": 1 / speed,
                    "peak_bandwidth_gbps": 4000.0, "peak_tflops": 800.0, "speedup_vs_torch": speed}})
    return rows


def test_figures_of_a_sweep_name_the_fraction_and_the_ratio():
    from labkit.bench import kernels as bench_kernels
    from labkit.lab import plots

    rows = _timed_rows()
    frame = bench_kernels.sweep_frame(rows)
    assert len(frame) == len(rows) and set(frame.provider) == {"torch", "compile", "triton"}
    bandwidth, caption = bench_kernels.bandwidth_figure(rows)
    assert "50% to 50% of the measured 4,000 GB/s" in caption and len(bandwidth.layout.title.text) < 40
    attention, caption = bench_kernels.attention_figure(rows)
    assert "2.00x SDPA's flash backend at sequence 4,096" in caption and len(attention.layout.title.text) < 40
    assert not plots.style_problems(bandwidth) and not plots.style_problems(attention)
    table = bench_kernels.format_table(rows)
    assert "% peak" in table and "4000 GB/s" in table
