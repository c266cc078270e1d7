"""`make gpu-check` is ready for a bare GPU box: its modules import without the packages that box lacks, a step
that fails or overruns is recorded without stopping the others, and the targets are read off the results."""

import json
import subprocess
import sys
from pathlib import Path

from labkit.bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]
MISSING_THERE = ("gguf", "plotly", "kaleido", "papermill", "fastapi", "uvicorn", "nbval", "openai")


def test_the_gpu_path_imports_without_the_packages_the_gpu_box_lacks():
    """What the GPU machine runs (the check, both benches, the backends, the gpu test files) imports with
    gguf, plotly, papermill, fastapi, nbval and friends blocked."""
    test_files = [p for name in gpu_check.GPU_TEST_FILES for p in sorted((ROOT / name).glob("test_*.py"))
                  or [ROOT / name]]
    code = "\n".join([
        "import importlib.util, sys",
        *[f"sys.modules[{name!r}] = None" for name in MISSING_THERE],
        "for m in ('labkit.bench.gpu_check', 'labkit.bench.kernels', 'labkit.bench.decode', 'labkit.engine.cuda_graphs',",
        "          'labkit.kernels.backend'):",
        "    importlib.import_module(m)",
        f"sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT / 'tests' / 'kernels')!r}]",
        f"for path in {[str(p) for p in test_files]!r}:",
        "    spec = importlib.util.spec_from_file_location('t_' + path.replace('/', '_')[-40:-3], path)",
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))",
        "print('ok')",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_failing_step_is_recorded_and_logged(tmp_path):
    result = gpu_check._child(tmp_path, ["labkit.bench.gpu_check", "--step", "bogus:step"], timeout_s=120)
    assert result["status"].startswith("failed")
    assert "unknown step 'bogus:step'" in (tmp_path / "gpu_check.log").read_text()


def test_an_overrunning_step_is_cut_off(tmp_path):
    result = gpu_check._child(tmp_path, ["labkit.bench.gpu_check", "--step", "decode:llama-1b"], timeout_s=0.5)
    assert result["status"].startswith("timed out")  # importing torch alone takes longer
    assert "timed out" in (tmp_path / "gpu_check.log").read_text()


def test_targets_read_off_the_result_files(tmp_path):
    env = {"gpu": "NVIDIA H200"}
    decode = [{"params": {"engine": "labkit", "batch_size": 1, "variant": v}, "env": env,
               "metrics": {"tokens_per_s": t, "roofline_fraction": f, "bandwidth_gbps": 4000.0,
                           "weight_bytes_per_step": 16e9}}
              for v, t, f in (("labkit-bf16", 90.0, 0.36), ("labkit-bf16-triton-graphs", 200.0, 0.8))]
    (tmp_path / "bench_decode_llama-8b.json").write_text(json.dumps(decode))
    kernels = [{"params": {"op": "rms_norm", "provider": "triton", "M": m, "N": 4096},
                "metrics": {"bytes": m, "fraction_of_peak": f, "bandwidth_gbps": 1.0}}
               for m, f in ((1, 0.1), (9, 0.85))]
    kernels += [{"params": {"op": "flash_attention", "provider": p, "S": 4096, "H": 32, "HK": 32},
                 "metrics": {"tflops": t}} for p, t in (("triton", 300.0), ("torch", 400.0))]
    (tmp_path / "bench_kernels.json").write_text(json.dumps(kernels))
    targets = gpu_check.evaluate(tmp_path)
    eight = targets["decode_llama-8b_roofline"]
    assert eight["met"] is True and eight["variant"] == "labkit-bf16-triton-graphs"
    assert abs(eight["datasheet_fraction"] - 200 * 16e9 / 4.8e12) < 1e-9
    assert targets["rms_norm_bandwidth"]["value"] == 0.85 and targets["rms_norm_bandwidth"]["met"]
    assert targets["flash_vs_sdpa"]["value"] == 0.75 and targets["flash_vs_sdpa"]["met"] is False
    assert targets["decode_llama-1b_roofline"]["met"] is None and targets["swiglu_bandwidth"]["value"] is None
    gpu_check.write_summary(tmp_path, [{"step": "x", "status": "ok", "seconds": 1.0}], targets, 2.0)
    summary = (tmp_path / "summary.md").read_text()
    assert "| yes |" in summary and "| no |" in summary and "no result" in summary
