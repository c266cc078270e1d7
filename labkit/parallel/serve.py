"""The ranks of a tensor-parallel server (`labkit serve --tensor-parallel-size N`), as vLLM runs them on one node.

The server's own process is rank 0: it serves HTTP over its engine (a `lockstep.LockstepEngine`). It starts the
other N-1 ranks itself (multiprocessing, spawned) and meets them through a TCPStore on a free port: gloo on a CPU,
NCCL on CUDA, rank r on cuda:r. Every rank builds the same model, splits it (`tp.tensor_parallel`) and makes an
engine with as many KV blocks as the others (`tp.make_engine`). Two pipes join rank 0 to each other rank: each
step's inputs go out, each step's digest comes back and is compared with rank 0's.

The ranks take their orders from rank 0 alone: they ignore SIGINT and SIGTERM (a Ctrl-C reaches the whole process
group; rank 0 stops them once the server has drained) and leave when rank 0 says so, when its pipe closes, or
when it dies (Linux's parent-death signal). A rank that dies, fails or drifts from rank 0 is one failure with one
message: before the server runs it ends rank 0's process at once (exit 1); while it runs, `on_failure` stops it.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from labkit.checks import check_int
from labkit.engine.config import EngineConfig
from labkit.model.loader import EMBEDDED_MODEL
from labkit.parallel.lockstep import STOP, LockstepEngine, StepInputs, follow

DIST_TIMEOUT_S = 1800.0  # a collective may wait this long for a rank (e.g. one compiling its step)
DEATH_WAIT_S = 1.0  # for a rank's death to show after rank 0's collective failed
STOP_TIMEOUT_S = 10.0  # for the ranks to leave after rank 0's stop, before they are killed
TP_QUANTIZATIONS = (None, "int8")  # what `tp.tensor_parallel` can split


@dataclass(frozen=True)
class RankSpec:
    """What every rank builds: the model, its rewrites, the engine's configuration, the number of ranks."""

    world_size: int
    model: str = EMBEDDED_MODEL
    dummy: bool = False  # seeded random weights of a preset's shape (the same on every rank)
    device: str = "auto"  # cpu, cuda (rank r on cuda:r) or auto
    dtype: str = "fp32"
    quantize: str | None = None  # applied before the split
    linear_layout: str = "auto"
    gemm: str = "auto"  # applied after the split, to each rank's shards
    seed: int = 0
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    threads_per_rank: int | None = None  # default: this machine's cores / world_size on a CPU
    even_heads: bool = False  # refuse heads that do not divide instead of dealing KV groups out

    def threads(self) -> int:
        return self.threads_per_rank or max(1, (os.cpu_count() or 1) // self.world_size)


def check_spec(spec: RankSpec) -> str:
    """Refuse, before any process starts, what the ranks could not serve (one line naming it); the split's plan."""
    import torch

    from labkit.device import pick_device
    from labkit.parallel.distributed import backend_for
    from labkit.parallel.launch import check_split

    world = check_int("tensor_parallel_size", spec.world_size)
    if spec.quantize not in TP_QUANTIZATIONS:
        raise ValueError(f"--quantization {spec.quantize} cannot be split over ranks (tensor parallelism splits fp "
                         "and int8 weights): drop one of the two")
    if spec.engine_config.scheduler.policy == "dynamic":
        raise ValueError("the dynamic policy waits on each rank's clock, so ranks could batch differently: use "
                         "continuous or static under tensor parallelism")
    device = pick_device(spec.device)
    backend_for(device)  # cpu or cuda only
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {spec.device} names one GPU, but rank r runs on cuda:r: use --device cuda")
        if torch.cuda.device_count() < world:
            raise ValueError(f"--tensor-parallel-size {world} needs {world} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
    return check_split(spec, world)


def build_engine(spec: RankSpec, ctx):
    """This rank's engine: the model loaded (the same weights on every rank), rewritten, split, then packed."""
    from labkit.model.llama import from_hf
    from labkit.model.loader import eos_token_ids_of, load_model
    from labkit.model.rewrites import apply_rewrites
    from labkit.parallel.tp import make_engine, tensor_parallel

    loaded = load_model(spec.model, device=ctx.device, dtype=spec.dtype, dummy=spec.dummy, seed=spec.seed)
    model = apply_rewrites(from_hf(loaded.model), linear_layout=spec.linear_layout, quantize=spec.quantize,
                           gemm="plain")  # a packed copy of the whole weight would be dropped by the split
    model = tensor_parallel(model, ctx, allow_uneven=not spec.even_heads)
    if spec.quantize is None:  # "nk": keep the layout the first pass chose, add only the packed GEMM
        model = apply_rewrites(model, linear_layout="nk", gemm=spec.gemm)
    return make_engine(model, loaded.tokenizer, ctx, config=spec.engine_config, name=loaded.name,
                       eos_token_ids=eos_token_ids_of(loaded.model, loaded.tokenizer))


def _join(spec: RankSpec, rank: int, store_port: int, store=None):
    """Join the ranks' process group through rank 0's TCPStore (rank 0 passes the store it holds)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from labkit.parallel.distributed import join_group

    torch.set_num_threads(spec.threads())
    if store is None:
        store = dist.TCPStore("127.0.0.1", store_port, spec.world_size, is_master=False,
                              timeout=timedelta(seconds=DIST_TIMEOUT_S))
    return join_group(rank, spec.world_size, rank, spec.device, DIST_TIMEOUT_S, store=store)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the one that started it dies (a rank 0 killed with SIGKILL leaves no rank
    behind); elsewhere the closed pipe ends the rank's loop."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the call
        os._exit(1)


def _rank_main(rank: int, spec: RankSpec, store_port: int, parent_pid: int, commands, reports) -> None:
    """What rank 1..N-1 runs: join, build the engine, follow rank 0 step by step."""
    import torch.distributed as dist

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    try:
        follow(build_engine(spec, _join(spec, rank, store_port)), commands, reports)
        gc.freeze()  # the interpreter's exit would walk torch's objects for seconds; the OS reclaims them
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"
        try:
            reports.send(("error", message))  # rank 0 says it, once
        except OSError:  # rank 0 is gone: say it here
            print(f"labkit serve: rank {rank} failed: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _within(seconds: float, condition: Callable[[], bool]) -> bool:
    """Whether condition() holds within `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class RankGroup:
    """Rank 0's side of the ranks: their processes, the pipes to and from each, the comparison of each step's
    digests, and a watch that turns a rank's death, failure or drift into one `fail(message)`.

    `with RankGroup(spec) as ranks: engine = ranks.start()` starts the other ranks and returns rank 0's engine;
    leaving the block stops them (killing any that do not leave within STOP_TIMEOUT_S). `on_failure(message)` runs
    once, from the watch's thread or the engine's; by default it kills the ranks and ends this process (exit 1).
    """

    def __init__(self, spec: RankSpec, on_failure: Callable[[str], None] | None = None):
        self.spec = spec
        self.on_failure = on_failure or self.exit_now
        self.failure: str | None = None
        self._procs: list = []  # rank r at index r - 1
        self._commands: list = []  # rank 0's ends of the pipes
        self._reports: list = []
        self._digests: dict[int, dict[int, tuple]] = {}  # step -> rank -> digest, until all ranks are in
        self._lock = threading.Lock()
        self._is_stopping = False
        self._watcher: threading.Thread | None = None

    def start(self) -> LockstepEngine:
        """Start ranks 1..N-1, join them as rank 0 and build this rank's engine (they build theirs alongside)."""
        from datetime import timedelta

        import torch.distributed as dist

        store = dist.TCPStore("127.0.0.1", 0, self.spec.world_size, is_master=True,
                              timeout=timedelta(seconds=DIST_TIMEOUT_S), wait_for_workers=False)
        mp = multiprocessing.get_context("spawn")
        for rank in range(1, self.spec.world_size):
            their_commands, commands = mp.Pipe(duplex=False)
            reports, their_reports = mp.Pipe(duplex=False)
            proc = mp.Process(target=_rank_main, name=f"labkit-serve-rank{rank}",
                              args=(rank, self.spec, store.port, os.getpid(), their_commands, their_reports))
            proc.start()
            their_commands.close()  # only the rank holds these ends now: its death closes the pipe
            their_reports.close()
            self._procs.append(proc)
            self._commands.append(commands)
            self._reports.append(reports)
        self._watcher = threading.Thread(target=self._watch, name="labkit-serve-ranks", daemon=True)
        self._watcher.start()
        return LockstepEngine(build_engine(self.spec, _join(self.spec, 0, store.port, store)), self)

    # the Channel of LockstepEngine (the engine's thread)
    def send(self, inputs: StepInputs) -> None:
        if self.failure is not None:
            raise RuntimeError(self.failure)
        try:
            for commands in self._commands:
                commands.send(inputs)
        except OSError as exc:  # a rank is gone; its watch says which
            raise RuntimeError(f"a rank is gone: {exc}") from None

    def record(self, rank: int, number: int, step_digest: tuple) -> None:
        """One rank's digest of step `number`; once every rank's is in, they must be equal."""
        with self._lock:
            got = self._digests.setdefault(number, {})
            got[rank] = step_digest
            if len(got) < self.spec.world_size:
                return
            del self._digests[number]
        differ = sorted(r for r, d in got.items() if d != got[0])
        if differ:
            self.fail(f"ranks {differ} computed other tokens than rank 0 in step {number}: the ranks' logits "
                      "differ, so the server stops rather than serve them")

    def fail(self, message: str) -> None:
        """Record the group's failure (the first one counts) and run on_failure. A failed collective on rank 0
        usually means a rank died: if one did, its death is the failure."""
        if self._procs and threading.current_thread() is not self._watcher and _within(
                DEATH_WAIT_S, lambda: any(proc.exitcode is not None for proc in self._procs)):
            _within(DEATH_WAIT_S, lambda: self.failure is not None)  # the watch reports the death
        with self._lock:
            if self.failure is not None or self._is_stopping:
                return
            self.failure = message
        self.on_failure(message)

    # the watch's thread
    def _watch(self) -> None:
        """Read every rank's reports and watch their processes until the group stops."""
        alive = {proc.sentinel: rank for rank, proc in enumerate(self._procs, start=1)}
        pipes = {reports: rank for rank, reports in enumerate(self._reports, start=1)}
        while alive and not self._is_stopping:
            try:
                ready_list = multiprocessing.connection.wait([*pipes, *alive])
            except (OSError, ValueError):  # the pipes were closed under it: the group has stopped
                return
            for ready in ready_list:
                if ready in pipes:
                    if not self._read(pipes[ready], ready):
                        del pipes[ready]
                elif ready in alive:
                    rank = alive.pop(ready)
                    self._exited(rank)

    def _read(self, rank: int, reports) -> bool:
        """Take one report of a rank; False once its pipe is closed."""
        try:
            report = reports.recv()
        except (EOFError, OSError):
            return False
        if report[0] == "step":
            self.record(rank, report[1], report[2])
        else:
            self.fail(f"rank {rank} failed: {report[1]}")
        return True

    def _exited(self, rank: int) -> None:
        reports, proc = self._reports[rank - 1], self._procs[rank - 1]
        proc.join()  # its sentinel is ready: this reaps it, for the exit code
        while self._read(rank, reports):  # its last words first: an error it reported names the cause
            pass
        if not self._is_stopping:
            self.fail(f"rank {rank} exited (code {proc.exitcode}) while serving: the server cannot go on without it")

    # stopping
    def stop(self) -> None:
        """Tell the ranks to leave and wait for them; kill those still there after STOP_TIMEOUT_S."""
        with self._lock:
            self._is_stopping = True
        for commands in self._commands:
            try:
                commands.send(STOP)
            except OSError:  # that rank is gone already
                pass
        for proc in self._procs:
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()  # it ignores SIGTERM
                proc.join()
        if self._watcher is not None:
            self._watcher.join(STOP_TIMEOUT_S)  # it sees the ranks leave, then returns
        for pipe in (*self._commands, *self._reports):
            pipe.close()

    def kill(self) -> None:
        """Kill every other rank now (no goodbyes: rank 0 is about to go)."""
        self._is_stopping = True
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()

    def exit_now(self, message: str) -> None:
        """The default on_failure, before the server runs: rank 0 may be stuck in a collective, so end it."""
        print(f"labkit serve: {message}", file=sys.stderr, flush=True)
        self.kill()
        os._exit(1)

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        self.stop()
        if dist.is_initialized() and self.failure is None:  # after a failure a collective may never return
            dist.destroy_process_group()


__all__ = ["RankSpec", "RankGroup", "check_spec", "build_engine", "DIST_TIMEOUT_S", "STOP_TIMEOUT_S",
           "TP_QUANTIZATIONS"]
