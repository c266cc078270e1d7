"""Replica processes for the router: N `labkit serve` processes on free ports of this machine, each with its
share of the cores (or its own GPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ReplicaSet:
    """N `labkit serve` processes on free ports of this machine, each with its share of the cores (or its own
    GPU); `with ReplicaSet(2, ["--model", "tiny-smollm2", "--dummy"]) as urls: ...`."""

    def __init__(self, num_replicas: int, serve_args: Sequence[str] = (), host: str = "127.0.0.1",
                 threads_per_replica: int | None = None, start_timeout_s: float = 300.0, device: str = "auto"):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.num_replicas, self.serve_args, self.host = num_replicas, list(serve_args), host
        self.threads = threads_per_replica or max(1, (os.cpu_count() or 1) // num_replicas)
        self.start_timeout_s, self.device = start_timeout_s, device
        self.processes: list[subprocess.Popen] = []
        self.logs: list = []  # each replica's stderr, in a temporary file (a pipe nobody reads would fill up)
        self.urls: list[str] = []

    def _env(self, index: int) -> dict:
        import labkit

        root = os.path.dirname(os.path.dirname(os.path.abspath(labkit.__file__)))
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        if self.device.startswith("cuda") and "CUDA_VISIBLE_DEVICES" not in os.environ:
            import torch

            env["CUDA_VISIBLE_DEVICES"] = str(index % max(1, torch.cuda.device_count()))
        return env

    def start(self) -> list[str]:
        import httpx

        for i in range(self.num_replicas):
            port = _free_port(self.host)
            cmd = [sys.executable, "-m", "labkit.cli", "serve", "--host", self.host, "--port", str(port),
                   "--device", self.device, *self.serve_args]
            log = tempfile.TemporaryFile("w+")
            self.logs.append(log)
            self.processes.append(subprocess.Popen(cmd, env=self._env(i), stdout=subprocess.DEVNULL, stderr=log))
            self.urls.append(f"http://{self.host}:{port}")
        deadline = time.monotonic() + self.start_timeout_s
        for proc, url, log in zip(self.processes, self.urls, self.logs):
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    message = log.read().strip().splitlines()
                    self.stop()
                    raise ValueError(f"a replica exited with status {proc.returncode}: "
                                     f"{message[-1] if message else 'no message'}")
                try:
                    if httpx.get(f"{url}/health", timeout=1.0, trust_env=False).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ValueError(f"the replica on {url} did not answer /health within {self.start_timeout_s:g} s")
                time.sleep(0.2)
        return self.urls

    def kill(self, index: int) -> None:
        """SIGKILL one replica (the failure tests and the notebook stage)."""
        self.processes[index].kill()
        self.processes[index].wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()
        self.logs.clear()

    def __enter__(self) -> list[str]:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["ReplicaSet"]
