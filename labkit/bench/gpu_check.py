"""`make gpu-check` (`python3 -m labkit.bench.gpu_check`): the GPU half of the lab in under five minutes, on a bare box.

Made for a GPU machine that has torch, transformers and triton but neither the project's `.venv`, the embedded
model, nor plotly, papermill or nbval: run from the working tree with `PYTHONPATH=.`. Each step runs in a child
process of its own under a time limit, so a step that fails or hangs still leaves the others' results:

1. the tests marked `gpu` (kernels at full size, CUDA-graph replay equal to eager, dummy models on the device);
2. `bench decode` on dummy llama-1b and llama-8b in bf16 at batch 1 (HF, eager, CUDA graphs, Triton + graphs);
3. `bench kernels`, one op at a time (torch eager, torch.compile and Triton; GB/s, TFLOP/s, % of measured peak);
4. if a minute is left, llama-1b with the compiled step under CUDA graphs (compiling takes tens of seconds).

Everything lands in `data/gpu/` (or --output-dir), each file with the GPU stamp: summary.md and summary.json
(the issue's targets, met or not, and each step's status), pytest.txt, bench_kernels.json,
bench_decode_<run>.json, results.jsonl and gpu_check.log (`tar czf gpu.tgz data/gpu` to carry them off).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TOTAL_BUDGET_S = 290  # the issue asks for under five minutes in all
GPU_TEST_FILES = ("tests/kernels", "tests/engine/test_cuda_graphs.py", "tests/test_device.py", "tests/engine/test_engine.py",
                  "tests/lab/test_stats.py", "tests/bench/test_kernels.py")
DECODE_RUNS = {  # step name -> (model, variants, batch sizes)
    "llama-1b": ("llama-1b", "hf-bf16,labkit-bf16,labkit-bf16-graphs,labkit-bf16-triton,labkit-bf16-triton-graphs",
                 "1"),
    "llama-8b": ("llama-8b", "hf-bf16,labkit-bf16,labkit-bf16-graphs,labkit-bf16-triton-graphs", "1"),
    # torch.compile of a real-size model takes tens of seconds: last, and only when that much time is left
    "llama-1b-compile": ("llama-1b", "hf-bf16,labkit-bf16-compile-graphs", "1"),
}
STEP_BUDGET_S = {"tests": 70, "decode:llama-1b": 45, "decode:llama-8b": 55, "decode:llama-1b-compile": 90,
                 # per op: flash attention autotunes four tile shapes per GQA ratio
                 "kernels:flash_attention": 35, "kernels": 15}
MIN_OPTIONAL_S = 60  # the compile step runs only with this much of the budget left
# the datasheet's HBM bandwidth, GB/s, for the roofline the issue quotes (weights / 4.8 TB/s on an H200)
DATASHEET_BANDWIDTH_GBPS = {"H200": 4800, "H100 80GB HBM3": 3350, "H100": 3350, "A100-SXM4-80GB": 2039}
TARGETS = {  # the goals: (what, threshold)
    "decode_llama-8b_roofline": ("batch-1 decode of dummy llama-8b bf16, fraction of the HBM roofline", 0.70),
    "decode_llama-1b_roofline": ("batch-1 decode of dummy llama-1b bf16, fraction of the HBM roofline", 0.40),
    "rms_norm_bandwidth": ("fused add + RMSNorm, fraction of the measured HBM bandwidth (largest size)", 0.80),
    "swiglu_bandwidth": ("SwiGLU, fraction of the measured HBM bandwidth (largest size)", 0.80),
    "flash_vs_sdpa": ("flash attention forward vs SDPA's flash backend, seq 4096, head dim 128, bf16", 0.80),
}


def _log(out: Path, message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(out / "gpu_check.log", "a") as f:
        f.write(line + "\n")


def _child(out: Path, args: list[str], timeout_s: float, log_name: str | None = None) -> dict:
    """Run `python -m ...args` with the data folder pointed at `out`; its output goes to the log."""
    env = {**os.environ, "LABKIT_DATA_DIR": str(out), "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the real GPU, not the interpreter
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout_s,
                              env=env)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:  # its output so far comes as bytes, whatever text= said
        status = f"timed out after {timeout_s:.0f} s"
        text = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                       for part in (exc.stdout or b"", exc.stderr or b""))
    elapsed = time.perf_counter() - start
    if log_name:
        (out / log_name).write_text(text)
    with open(out / "gpu_check.log", "a") as f:
        f.write(f"--- {' '.join(args)}: {status} in {elapsed:.1f} s\n{text[-6000:]}\n")
    return {"step": " ".join(args), "status": status, "seconds": round(elapsed, 1)}


def run_steps(out: Path, budget_s: float = TOTAL_BUDGET_S) -> list[dict]:
    """Every step in turn, each under its own limit and the time left of the budget: the tests, the decode
    benchmarks (the issue's headline targets), the kernel sweep op by op, and the compiled decode step if time
    is left."""
    from labkit.bench.kernels import OPS

    deadline = time.perf_counter() + budget_s
    left = lambda limit: max(5.0, min(limit, deadline - time.perf_counter()))  # noqa: E731
    steps = []
    _log(out, "step 1: the tests marked gpu")
    steps.append(_child(out, ["pytest", *GPU_TEST_FILES, "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs"],
                        left(STEP_BUDGET_S["tests"]), "pytest.txt"))
    for name in ("llama-1b", "llama-8b"):
        _log(out, f"step 2: bench decode, dummy {name}")
        steps.append(_child(out, ["labkit.bench.gpu_check", "--step", f"decode:{name}", "--output-dir", str(out)],
                            left(STEP_BUDGET_S[f"decode:{name}"])))
    for op in OPS:
        _log(out, f"step 3: bench kernels, {op}")
        steps.append(_child(out, ["labkit.bench.gpu_check", "--step", f"kernels:{op}", "--output-dir", str(out)],
                            left(STEP_BUDGET_S.get(f"kernels:{op}", STEP_BUDGET_S["kernels"]))))
    remaining = deadline - time.perf_counter()
    if remaining >= MIN_OPTIONAL_S:
        _log(out, "step 4: bench decode, dummy llama-1b with the compiled step")
        steps.append(_child(out, ["labkit.bench.gpu_check", "--step", "decode:llama-1b-compile", "--output-dir", str(out)],
                            left(STEP_BUDGET_S["decode:llama-1b-compile"])))
    else:
        steps.append({"step": "labkit.bench.gpu_check --step decode:llama-1b-compile",
                      "status": f"skipped: {remaining:.0f} s of the budget left", "seconds": 0.0})
    return steps


def run_step(step: str, out: Path) -> None:
    """One step, in this (child) process: `kernels:<op>` or `decode:<model>`; rows to the store and a JSON file."""
    from labkit.lab.results import append_rows, stamp_rows, write_json_atomic

    kind, _, name = step.partition(":")
    if kind == "kernels":
        from labkit.bench.kernels import format_table, run_kernel_bench

        rows = stamp_rows(run_kernel_bench([name], "bf16", "cuda", log=print))
        path = out / "bench_kernels.json"
        previous = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["params"]["op"] != name]
        write_json_atomic(path, previous + rows)  # op by op, so a later timeout keeps the earlier ops
    elif kind == "decode":
        from labkit.bench.decode import format_table, run_decode_bench

        model, variants, batch_sizes = DECODE_RUNS[name]
        rows = stamp_rows(run_decode_bench(variants.split(","), batch_sizes=[int(b) for b in batch_sizes.split(",")],
                                           max_tokens=64, repeats=3, model=model, dummy=True, device="cuda",
                                           dtype="bf16", log=print))
        write_json_atomic(out / f"bench_decode_{name}.json", rows)
    else:
        raise ValueError(f"unknown step {step!r}: kernels:<op> or decode:<model>")
    append_rows(rows)
    print(format_table(rows))


def evaluate(out: Path) -> dict:
    """The issue's targets from the files the steps wrote: value, threshold, met; None where a step left none."""
    results = {key: {"what": what, "threshold": threshold, "value": None, "met": None}
               for key, (what, threshold) in TARGETS.items()}
    for model in ("llama-1b", "llama-8b"):
        rows = [r for name in DECODE_RUNS if DECODE_RUNS[name][0] == model
                and (out / f"bench_decode_{name}.json").exists()
                for r in json.loads((out / f"bench_decode_{name}.json").read_text())]
        rows = [r for r in rows if r["params"]["engine"] == "labkit" and r["params"]["batch_size"] == 1]
        if rows:
            best = max(rows, key=lambda r: r["metrics"]["tokens_per_s"])
            m = best["metrics"]
            gpu = best["env"].get("gpu") or ""
            sheet = next((v for k, v in DATASHEET_BANDWIDTH_GBPS.items() if k in gpu), None)
            results[f"decode_{model}_roofline"].update(
                value=m["roofline_fraction"], variant=best["params"]["variant"], tokens_per_s=m["tokens_per_s"],
                measured_bandwidth_gbps=m["bandwidth_gbps"],
                datasheet_fraction=m["tokens_per_s"] * m["weight_bytes_per_step"] / (sheet * 1e9) if sheet else None)
    path = out / "bench_kernels.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for op in ("rms_norm", "swiglu"):
        mine = [r for r in rows if r["params"]["op"] == op and r["params"]["provider"] == "triton"]
        if mine:
            biggest = max(mine, key=lambda r: r["metrics"]["bytes"])
            results[f"{op}_bandwidth"].update(value=biggest["metrics"]["fraction_of_peak"],
                                              bandwidth_gbps=biggest["metrics"]["bandwidth_gbps"],
                                              size={k: v for k, v in biggest["params"].items() if k in "MNF"})
    flash = {r["params"]["provider"]: r["metrics"]["tflops"] for r in rows if r["params"]["op"] == "flash_attention"
             and r["params"].get("S") == 4096 and r["params"].get("H") == r["params"].get("HK")}
    if "triton" in flash and "torch" in flash:
        results["flash_vs_sdpa"].update(value=flash["triton"] / flash["torch"], triton_tflops=flash["triton"],
                                        sdpa_flash_tflops=flash["torch"])
    for target in results.values():
        if target["value"] is not None:
            target["met"] = target["value"] >= target["threshold"]
    return results


def write_summary(out: Path, steps: list[dict], targets: dict, elapsed_s: float) -> None:
    import torch

    from labkit.device import describe_environment, format_environment
    from labkit.lab.results import write_json_atomic

    env = describe_environment("cuda" if torch.cuda.is_available() else None)
    write_json_atomic(out / "summary.json", {"env": env, "elapsed_s": elapsed_s, "steps": steps, "targets": targets})
    lines = [f"# make gpu-check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Hardware: {format_environment(env)}", f"Total: {elapsed_s:.0f} s", "", "| step | status | s |",
             "|---|---|---|", *[f"| `{s['step']}` | {s['status']} | {s['seconds']} |" for s in steps], "",
             "| target | value | goal | met |", "|---|---|---|---|"]
    for t in targets.values():
        value = "no result" if t["value"] is None else f"{t['value']:.2f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['what']} | {value} | >= {t['threshold']:.2f} | {met} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("data/gpu"), help="where results go (data/gpu)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a child process's one step
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="the whole check's time limit")
    args = parser.parse_args(argv)
    out = args.output_dir
    if args.step:
        run_step(args.step, out)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("labkit gpu-check: no CUDA device here; run it on a GPU machine (see README, make gpu-check)",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("gpu_check.log", "results.jsonl", "bench_kernels.json"):
        (out / stale).unlink(missing_ok=True)  # this run's results only
    start = time.perf_counter()
    steps = run_steps(out, args.budget_s)
    write_summary(out, steps, evaluate(out), time.perf_counter() - start)
    return 0 if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
