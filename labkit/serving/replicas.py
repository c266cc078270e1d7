"""Replica processes for the router: N `labkit serve` processes on free ports of this machine, each with its
share of the cores (or its own GPU), that die with the router and are restarted when they die alone.

Each replica runs in a session of its own (a Ctrl-C in the router's terminal reaches the router, which stops
them, not the replicas directly) and, on Linux, with a parent-death signal (prctl PR_SET_PDEATHSIG): when the
router dies, even by SIGKILL, the kernel kills its replicas. `supervise()` restarts a replica that exits, on its
own port, after a delay that doubles from `initial_s` to `max_s` and starts over once a replica has run for
`reset_after_s`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger("labkit.serving.router")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGKILL the child when the thread that started it exits (Linux); None
    elsewhere. libc is loaded here, in the parent: a child of a threaded process should not dlopen."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would kill this child
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


@dataclass
class RestartBackoff:
    """How long to wait before restarting a replica that exited: doubling from initial_s up to max_s, and back to
    initial_s for a replica that had run for reset_after_s (it was healthy a while, so this is a new failure)."""

    initial_s: float = 0.5
    max_s: float = 30.0
    reset_after_s: float = 30.0

    def __post_init__(self):
        self._next: dict[int, float] = {}

    def delay(self, index: int, ran_s: float) -> float:
        """The wait before restarting replica `index`, which ran for ran_s before it exited."""
        delay = self.initial_s if ran_s >= self.reset_after_s else self._next.get(index, self.initial_s)
        self._next[index] = min(delay * 2, self.max_s)
        return delay


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
        self.ports: list[int] = []
        self.num_restarts: list[int] = [0] * num_replicas
        self._started_s: list[float] = []
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

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
            self.ports.append(_free_port(self.host))
            self.urls.append(f"http://{self.host}:{self.ports[i]}")
            self.logs.append(tempfile.TemporaryFile("w+"))
            self.processes.append(self._launch(i))
            self._started_s.append(time.monotonic())
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

    def _launch(self, index: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "labkit", "serve", "--host", self.host, "--port", str(self.ports[index]),
               "--device", self.device, *self.serve_args]
        return subprocess.Popen(cmd, env=self._env(index), stdout=subprocess.DEVNULL, stderr=self.logs[index],
                                start_new_session=True, preexec_fn=_die_with_parent())

    def supervise(self, on_exit: Callable[[int, int], None] | None = None,
                  on_restart: Callable[[int, int], None] | None = None,
                  backoff: RestartBackoff | None = None, poll_s: float = 0.1) -> None:
        """Restart replicas that exit, on their own ports, with backoff, until stop(); on_exit(index, status) and
        on_restart(index, pid) are called from the supervising thread."""
        backoff = backoff or RestartBackoff()

        def run() -> None:
            restart_at: dict[int, float] = {}
            while not self._stopping.wait(poll_s):
                now = time.monotonic()
                for i, proc in enumerate(self.processes):
                    if i in restart_at and now >= restart_at[i]:
                        del restart_at[i]
                        self.processes[i], self._started_s[i] = self._launch(i), now
                        self.num_restarts[i] += 1
                        logger.warning("replica %d restarted (pid %d)", i, self.processes[i].pid)
                        if on_restart:
                            on_restart(i, self.processes[i].pid)
                    elif i not in restart_at and proc.poll() is not None:
                        delay = backoff.delay(i, now - self._started_s[i])
                        restart_at[i] = now + delay
                        logger.warning("replica %d exited with status %s: restarting in %.1f s", i, proc.returncode,
                                       delay)
                        if on_exit:
                            on_exit(i, proc.returncode)

        # the replicas it restarts die with this thread (their parent-death signal): it lives until stop()
        self._supervisor = threading.Thread(target=run, name="labkit-router-supervisor", daemon=True)
        self._supervisor.start()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.processes]

    def kill(self, index: int) -> None:
        """SIGKILL one replica (the failure tests and the notebook stage)."""
        self.processes[index].kill()
        self.processes[index].wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
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


def replica_tokenizer(model: str, dummy: bool = False):
    """The tokenizer `labkit serve --model MODEL [--dummy]` loads (the router decodes resumed streams with it), or
    None when the replicas have none."""
    from transformers import AutoTokenizer

    from labkit.model.loader import EMBEDDED_ALIASES, EMBEDDED_VOCAB_PRESETS, convert_embedded, hub_local_only

    if dummy:
        return AutoTokenizer.from_pretrained(convert_embedded()) if model in EMBEDDED_VOCAB_PRESETS else None
    if model in EMBEDDED_ALIASES:
        return AutoTokenizer.from_pretrained(convert_embedded())
    is_dir = os.path.isdir(os.path.expanduser(model))
    return AutoTokenizer.from_pretrained(os.path.expanduser(model) if is_dir else model,
                                         local_files_only=not is_dir and hub_local_only(model))


__all__ = ["ReplicaSet", "RestartBackoff", "replica_tokenizer"]
