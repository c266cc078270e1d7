"""`labkit bench decode`'s result rows: one per (variant, workload, batch size), the lossless check of each
speculative variant against its plain twin, the ratios between rows of one run, and the table."""

from __future__ import annotations

import statistics

from labkit.device import dtype_name, format_environment


def first_difference(tokens: list[list[list[int]]], reference: list[list[list[int]]]) -> int | None:
    """The first token index at which any row of any prompt differs from the reference (None: identical)."""
    worst = None
    for prompt_rows, ref_rows in zip(tokens, reference, strict=True):
        for row, ref in zip(prompt_rows, ref_rows, strict=True):
            if row != ref:
                at = next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b), min(len(row), len(ref)))
                worst = at if worst is None else min(worst, at)
    return worst


def check_lossless(names, variants: dict, samples: dict) -> dict[str, int | None]:
    """Speculative name -> the first token index where any of its runs left its plain twin's first run's greedy
    tokens (None: every run identical). The twin's own runs are checked against its first too (greedy decoding
    is deterministic), so a nondeterministic baseline shows up rather than passing for a lossy draft."""
    out = {}
    for name in names:
        twin = variants[name].plain
        if twin is None:
            continue
        reference = samples[twin][0].tokens
        diffs = [first_difference(s.tokens, reference) for s in (*samples[twin][1:], *samples[name])]
        diffs = [d for d in diffs if d is not None]
        out[name] = min(diffs) if diffs else None
    return out


def decode_row(name: str, variant, runner, samples: list, *, workload: str, prompts: list[list[int]],
               batch_size: int, run: dict, compile_s: float | None, difference: int | None) -> dict:
    """One variant's row on one workload at one batch size from its timed runs (`Sample`s).

    `run`: what every row of the run shares (loaded, prompt, max_tokens, repeats, bandwidth, env, lookup)."""
    rates = [s.tokens_per_s for s in samples]
    tokens_per_s = statistics.median(rates)
    roofline = run["bandwidth"] * 1e9 / runner.bytes_per_step  # decode steps/s if weights stream at bandwidth
    engine = getattr(runner, "engine", None)
    loaded, lookup = run["loaded"], run["lookup"]
    metrics = {"tokens_per_s": tokens_per_s, "tokens_per_s_runs": rates,
               "ttft_ms": statistics.median(s.ttft_ms for s in samples),
               "compile_s": compile_s if variant.compile else None,
               "capture_s": getattr(engine, "capture_s", None),
               "weight_bytes_per_step": runner.bytes_per_step,
               "bandwidth_gbps": run["bandwidth"], "roofline_tokens_per_s": roofline * batch_size,
               "roofline_fraction": tokens_per_s / batch_size / roofline,
               # speculative rows: greedy tokens identical to the plain twin's in every run (lossless)
               "token_identical": None if variant.plain is None else difference is None,
               "first_difference": difference, **runner.stats()}
    return {
        "technique": "decode",
        "params": {"variant": name, "engine": variant.engine, "dtype": variant.dtype,
                   "compile": variant.compile, "quantize": variant.quantize,
                   "cuda_graphs": variant.cuda_graphs, "kernels": variant.kernels,
                   "attention": variant.attention, "kv_cache_dtype": variant.kv_cache_dtype,
                   "linear_layout": getattr(engine, "linear_layout", None),
                   # the activations' (and KV cache's) dtype: a quantized variant's is the serving default's
                   "act_dtype": None if variant.engine != "labkit" else dtype_name(engine.model.act_dtype),
                   "gemm": None if variant.engine != "labkit" else
                   "packed" if "gemm:packed" in engine.model.rewrites else "plain",
                   "workload": workload, "prompt": run["prompt"] if workload == "free" else None,
                   "num_prompts": len(prompts),
                   "prompt_tokens": round(statistics.mean(len(p) for p in prompts)),
                   "batch_size": batch_size, "max_tokens": run["max_tokens"], "repeats": run["repeats"],
                   "threads": getattr(runner, "threads", None) or run["threads"], "greedy": True,
                   "ignore_eos": True, "speculative": lookup.to_dict() if variant.plain is not None else None,
                   "plain_variant": variant.plain, "model": loaded.name, "device": str(loaded.device),
                   # None: HF has no prefix cache; llama.cpp's prompt reuse is reset before every run
                   "prefix_caching": None if engine is None else engine.describe().get("prefix_caching")},
        "metrics": metrics,
        "env": run["env"],
    }


def add_ratios(rows: list[dict], baseline: str, variants: dict) -> None:
    """Each row's ratios to other rows of the same workload and batch size in this run: `ratio_to_hf` (the
    baseline variant), `ratio_to_llama_cpp`, `ratio_to_llama_cpp_lookup` (None where that row is absent) and, for
    a speculative row, `speedup` over its plain twin. A row whose tokens left its twin's gets none of them: a
    lossy speedup is no speedup."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        p = row["params"]
        groups.setdefault((p.get("workload"), p["batch_size"]), {})[p["variant"]] = row
    for group in groups.values():
        for name, row in group.items():
            m = row["metrics"]
            lossless = m.get("token_identical") is not False

            def over(other):
                return m["tokens_per_s"] / group[other]["metrics"]["tokens_per_s"] \
                    if lossless and other in group else None

            m["ratio_to_hf"] = over(baseline)
            m["ratio_to_llama_cpp"] = over("llama.cpp")
            m["ratio_to_llama_cpp_lookup"] = over("llama.cpp-lookup")
            twin = variants[name].plain if name in variants else None
            m["speedup"] = over(twin) if twin is not None else None


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value else "n/a"


def _lossless(m: dict) -> str:
    identical = m.get("token_identical")
    return "" if identical is None else "yes" if identical else f"NO (token {m['first_difference']})"


# (heading, width, cell from a row's params and metrics); a negative width aligns left
_COLUMNS = (("engine", -26, lambda p, m: p["variant"]), ("workload", -9, lambda p, m: p.get("workload", "free")),
            ("batch", 5, lambda p, m: str(p["batch_size"])), ("tok/s", 8, lambda p, m: f"{m['tokens_per_s']:.1f}"),
            ("× HF", 6, lambda p, m: _ratio(m.get("ratio_to_hf"))),
            ("×l.cpp", 6, lambda p, m: _ratio(m.get("ratio_to_llama_cpp"))),
            ("×lookup", 7, lambda p, m: _ratio(m.get("ratio_to_llama_cpp_lookup"))),
            ("spec×", 6, lambda p, m: "" if m.get("token_identical") is None else _ratio(m.get("speedup"))),
            ("roofline", 8, lambda p, m: f"{m['roofline_fraction']:.0%}"),
            ("TTFT ms", 8, lambda p, m: f"{m['ttft_ms']:.1f}"), ("lossless", -8, lambda p, m: _lossless(m)))


def format_table(rows: list[dict]) -> str:
    """The rows as a text table: × HF, × llama.cpp (plain, and with its lookup), a speculative row's speedup
    over its twin and whether its tokens were identical."""
    def line(cells) -> str:
        return " ".join(f"{c:<{-w}s}" if w < 0 else f"{c:>{w}s}" for c, (_, w, _) in zip(cells, _COLUMNS)).rstrip()

    head = line([name for name, _, _ in _COLUMNS])
    lines = [head, "-" * len(head)]
    lines += [line([cell(r["params"], r["metrics"]) for _, _, cell in _COLUMNS]) for r in rows]
    if rows:
        env = rows[0]["env"]
        threads = rows[0]["params"].get("threads") or env["torch_threads"]
        lines.append(f"hardware: {format_environment(env).split(' · python')[0]}, {threads} threads; bandwidth "
                     f"{rows[0]['metrics']['bandwidth_gbps']:.1f} GB/s")
    return "\n".join(lines)


__all__ = ["first_difference", "check_lossless", "decode_row", "add_ratios", "format_table"]
