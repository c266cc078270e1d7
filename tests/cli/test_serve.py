"""`labkit serve` with vLLM's names: MODEL positional, --quantization, --speculative-config and friends build one
EngineConfig; refused combinations and bad JSON are one line; a real server answers the OpenAI client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from labkit import cli
from labkit.cli.arguments import engine_config_from_args
from labkit.cli.main import build_parser
from labkit.engine import EngineConfig

VLLM_NAMES = ("--quantization", "--kv-cache-dtype", "--speculative-config", "--enable-prefix-caching",
              "--no-enable-prefix-caching", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
              "--enforce-eager", "--tensor-parallel-size", "--dtype", "MODEL")
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'


def _config(argv: list[str]):
    return engine_config_from_args(build_parser().parse_args(["serve", *argv]))


def test_help_shows_vllms_names(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in VLLM_NAMES:
        assert name in out, name


def test_the_options_build_one_engine_config():
    config = _config(["tiny-smollm2", "--dummy", "--quantization", "int8", "--kv-cache-dtype", "int8",
                      "--speculative-config", NGRAM, "--no-enable-prefix-caching", "--max-model-len", "512",
                      "--max-num-seqs", "8", "--max-num-batched-tokens", "32", "--no-enforce-eager"])
    assert config.model.model == "tiny-smollm2" and config.model.dummy and config.model.quantization == "int8"
    assert config.model.dtype == "auto" and config.model.max_model_len == 512
    assert config.kv_cache_dtype == "int8" and not config.enable_prefix_caching and config.compile
    assert config.speculative.method == "ngram" and config.speculative.num_speculative_tokens == 4
    assert config.speculative.prompt_lookup_max == 3
    assert config.scheduler.max_num_seqs == 8 and config.scheduler.max_num_batched_tokens == 32
    assert _config(["--model", "tiny-smollm2"]).model.model == "tiny-smollm2"  # --model is an alias
    defaults = _config([])
    assert defaults.model.model == "smollm2-135m-instruct" and defaults.enforce_eager and defaults.speculative is None


@pytest.mark.parametrize("name, short", [("bfloat16", "bf16"), ("float32", "fp32"), ("float", "fp32"),
                                         ("half", "fp16"), ("float16", "fp16"), ("bf16", "bf16")])
def test_vllms_dtype_names_work_and_the_config_keeps_the_short_one(name, short):
    assert _config(["--dtype", name]).model.dtype == short
    assert EngineConfig.from_kwargs(dtype=name).model.dtype == short


@pytest.mark.parametrize("argv, message", [
    (["--speculative-config", '{"method": "ngram",'], "argument --speculative-config: speculative config is not "
                                                      "valid JSON"),
    (["--speculative-config", '{"method": "medusa"}'], "unknown speculative method 'medusa'"),
    (["--speculative-config", '{"num_speculative_tokens": 4, "n": 2}'], "unknown speculative config key 'n'"),
    (["--speculative-config", "[1]"], "speculative config must be a JSON object"),
    (["--quantization", "awq"], "argument --quantization/-q: invalid choice: 'awq'"),
    (["--kv-cache-dtype", "fp8"], "argument --kv-cache-dtype: invalid choice: 'fp8'"),
])
def test_bad_options_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "tiny-smollm2", "--dummy", "--port", "0", *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["--quantization", "int8", "--speculative-config", '{"method": "self_draft"}'],
     "speculative method 'self_draft' quantizes a copy of the unquantized target; quantization='int8'"),
    (["--tensor-parallel-size", "2", "--speculative-config", '{"method": "draft_model", "model": "tiny-smollm2"}'],
     "tensor_parallel_size=2 splits the target only"),
    (["--quantization", "gguf"], "quantization='gguf' reads the embedded model's GGUF blocks; a dummy model has none"),
    (["--model", "tiny-llama"], "two models given: 'tiny-smollm2' and --model 'tiny-llama'"),
])
def test_refused_combinations_are_one_line_before_loading(capsys, argv, message):
    assert cli.main(["serve", "tiny-smollm2", "--dummy", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("labkit serve: ") and message in err[0], err


def _start(argv: list[str], log) -> tuple[subprocess.Popen, int]:
    """`labkit serve ... --port 0` in a subprocess; its port, read from the start-up line."""
    proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "serve", *argv, "--port", "0"], stdout=log,
                            stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + 180
    while True:
        text = open(log.name).read()
        found = re.search(r"on http://127\.0\.0\.1:(\d+) ", text)
        if found and "techniques:" in text:
            return proc, int(found.group(1))
        assert proc.poll() is None, text
        assert time.monotonic() < deadline, f"labkit serve did not come up: {text}"
        time.sleep(0.3)


def test_serve_model_with_quantization_and_speculation_answers_the_openai_client(tmp_path):
    log = open(tmp_path / "serve.log", "w+")
    proc, port = _start(["tiny-smollm2", "--dummy", "--device", "cpu", "--quantization", "int8",
                         "--speculative-config", NGRAM, "--max-num-seqs", "4", "--kv-cache-mb", "8",
                         "--enable-logging-iteration-details"], log)
    try:
        start_up = (tmp_path / "serve.log").read_text()
        assert "quantization int8" in start_up and "speculative ngram(n=1..3, k=4)" in start_up
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-smollm2"]
        prompt = "one two three one two three one two three one two"
        done = client.completions.create(model="tiny-smollm2", prompt=prompt, max_tokens=12, temperature=0)
        assert done.usage.completion_tokens == 12 and done.choices[0].finish_reason == "length"
        streamed = client.completions.create(model="tiny-smollm2", prompt=prompt, max_tokens=12, temperature=0,
                                             stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == done.choices[0].text
        chat = client.chat.completions.create(model="tiny-smollm2", max_tokens=5,
                                              messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        info = next(line for line in metrics.splitlines() if line.startswith("labkit_techniques_info{"))
        assert 'quantization="int8"' in info and 'speculative="ngram(n=1..3, k=4)"' in info
        assert 'model="tiny-smollm2"' in info
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()
    steps = re.findall(r"labkit serve: Iteration\((\d+)\): (\d+) context requests, (\d+) context tokens, (\d+) "
                       r"generation requests, (\d+) generation tokens, iteration elapsed time: [\d.]+ ms, KV cache "
                       r"usage: [\d.]+%", (tmp_path / "serve.log").read_text())
    assert [int(s[0]) for s in steps] == list(range(len(steps))) and len(steps) > 12  # vLLM's line, every step
    assert steps[0][1:] == ("1", steps[0][2], "0", "0") and int(steps[0][2]) > 1  # the first prompt, alone
    assert ("0", "0", "1", "1") in [s[1:] for s in steps]  # a decode step (drafts verified are not counted)


def test_speculative_config_json_round_trips():
    config = _config(["--speculative-config", json.dumps({"method": "draft_model", "model": "tiny-smollm2",
                                                          "num_speculative_tokens": 3})])
    assert config.speculative.model == "tiny-smollm2" and config.speculative.describe() == \
        "draft_model(tiny-smollm2, k=3)"


def test_baseline_takes_the_shared_engine_options(capsys):
    """The same option group reaches `labkit baseline`: the row records the EngineConfig it ran."""
    argv = ["baseline", "--model", "tiny-smollm2", "--dummy", "--engine", "labkit", "--quantization", "int8",
            "--speculative-config", NGRAM, "--max-tokens", "6", "--repeats", "1", "--no-save", "--json",
            "--no-progress"]
    assert cli.main(argv) == 0
    row = json.loads(capsys.readouterr().out)[0]
    config = row["params"]["engine_config"]
    assert config["quantization"] == "int8" and config["speculative"] == "ngram(n=1..3, k=4)"
    assert row["metrics"]["num_new_tokens"] == 6
    assert cli.main(["baseline", "--model", "tiny-smollm2", "--dummy", "--quantization", "int8", "--no-save"]) == 2
    assert capsys.readouterr().err.strip() == "labkit baseline: --quantization needs --engine labkit"
