"""Start tensor-parallel ranks with torchrun and read back what rank 0 wrote (the parent side of `labkit tp`).

`check_split` refuses, before any process starts, a model that cannot be split over the ranks (`model_args`
reads its shape from the config alone). `launch` starts torchrun (`--standalone` on one node, its rendezvous
options across nodes) on `labkit.parallel.worker`, hands every rank the action's options (`GenerateOptions` or
`BenchOptions`) as JSON, and returns rank 0's result: result rows in the lab's form, stamped with the
environment, and for `generate` the text.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from labkit.parallel.distributed import LaunchConfig, torchrun_command
from labkit.parallel.worker import ActionOptions

WORKER_MODULE = "labkit.parallel.worker"
LOG_TAIL_LINES = 12


class LaunchError(RuntimeError):
    """The ranks did not finish; the message holds the last lines of their log."""


def model_args(name: str, dummy: bool):
    """The model's shape (ModelArgs) from its config alone, without weights: for checking a split up front."""
    from transformers import AutoConfig

    from labkit.model.llama import ModelArgs
    from labkit.model.loader import EMBEDDED_ALIASES, convert_embedded, dummy_config, hub_load_error, hub_local_only

    if dummy:
        return ModelArgs.from_hf(dummy_config(name))
    if name in EMBEDDED_ALIASES or Path(name).expanduser().is_dir():
        return ModelArgs.from_hf(AutoConfig.from_pretrained(convert_embedded() if name in EMBEDDED_ALIASES else name))
    try:  # a hub id: fail at once when it is not cached and the hub is unreachable, as load_model does
        return ModelArgs.from_hf(AutoConfig.from_pretrained(name, local_files_only=hub_local_only(name)))
    except (OSError, ValueError) as exc:
        raise hub_load_error(name, exc) from exc


def check_split(options, world_size: int) -> str:
    """Refuse, before starting any process, a model that cannot be split over world_size ranks; the plan.
    `options`: anything with .model, .dummy and .even_heads (an ActionOptions, or parsed command-line options)."""
    from labkit.parallel.tp import plan_tensor_parallel

    plan = plan_tensor_parallel(model_args(options.model, options.dummy), world_size,
                                allow_uneven=not options.even_heads, name=options.model)
    return plan.describe()


def launch(options: ActionOptions, config: LaunchConfig, log=None, timeout_s: float | None = None,
           program: str = WORKER_MODULE) -> dict:
    """Run one action on config.nproc ranks through torchrun and return what rank 0 wrote: {"rows": [...], ...}.

    ValueError with the ranks' message for bad input, LaunchError when the ranks failed otherwise; on a node
    other than rank 0's, {} (the results are on rank 0's node). `program` is what each rank runs (a module or a
    .py script taking `worker.worker_options`' options): the worker unless a test brings its own."""
    import labkit

    with tempfile.TemporaryDirectory(prefix="labkit-tp-") as tmp:
        result_file, args_file, log_file = Path(tmp) / "result.json", Path(tmp) / "args.json", Path(tmp) / "ranks.log"
        args_file.write_text(json.dumps(options.to_json()))
        cmd = torchrun_command(config, program, ["--result-file", str(result_file), "--args-file",
                                                 str(args_file), "--threads", str(config.threads())])
        root = str(Path(labkit.__file__).resolve().parent.parent)  # the ranks import this labkit, installed or not
        env = {**os.environ, "OMP_NUM_THREADS": str(config.threads()),
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        if log:
            log(f"starting {config.world_size} ranks with torchrun for {options.action}")
        with open(log_file, "wb") as out:
            try:
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise LaunchError(f"the ranks did not finish within {timeout_s:g} s") from None
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        if "error" in result:
            raise ValueError(result["error"])
        if proc.returncode != 0:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-LOG_TAIL_LINES:]
            raise LaunchError(f"torchrun exited with status {proc.returncode}; the ranks' last lines:\n"
                              + "\n".join(tail))
        return result


__all__ = ["LaunchError", "model_args", "check_split", "launch", "WORKER_MODULE"]
