"""`labkit run`: execute the numbered notebooks headless through papermill, with profiles and overrides.

A run writes only under its run folder (`runs/<run id>/`: executed copies, `data/`, `figures/`, and its kernels'
connection files while they run), so the git tree stays clean; `--refresh-reference` sends results and figures
to the committed `data/` and `figures/`.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from labkit.device import repo_root

NOTEBOOK_RE = re.compile(r"(\d{2})_[^/]+\.ipynb")
KERNELS_DIR = ".kernels"  # in a run's folder while it runs: its kernels' connection files
OWNER_FILE = "pid"  # in KERNELS_DIR: the run's process id, so that a later run knows when it died
PROFILES_FILE = "profiles.json"
ALL_NOTEBOOKS = "*"  # profile key whose parameters apply to every notebook
KERNEL_NAME = "python3"  # jupyter_client runs a "python" kernelspec with sys.executable, i.e. this venv


class NotebookFailed(RuntimeError):
    """A notebook raised, timed out or lost its kernel; the message names the notebook, cell and kept copy."""


def notebooks_dir() -> Path:
    """Where the numbered notebooks live: `$LABKIT_NOTEBOOKS_DIR`, else `<repo>/notebooks`."""
    return Path(os.environ.get("LABKIT_NOTEBOOKS_DIR") or repo_root() / "notebooks")


def _numbered(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_RE.fullmatch(p.name))


def find_notebooks(selection: Sequence[str], folder: Path | None = None) -> list[Path]:
    """Resolve selectors ("01", "1", "01_baseline", a path) to notebooks; none selects all, sorted."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    available = _numbered(folder) if folder.is_dir() else []
    if not selection:
        return available
    chosen: list[Path] = []
    for selector in selection:
        path = Path(selector)
        if path.suffix == ".ipynb" and path.is_file():
            matches = [path.resolve()]
        elif selector.isdigit():
            matches = [p for p in available if int(NOTEBOOK_RE.fullmatch(p.name).group(1)) == int(selector)]
        else:
            matches = [p for p in available if p.stem == selector.removesuffix(".ipynb")]
        if len(matches) != 1:
            names = ", ".join(p.stem for p in available) or f"none in {folder}"
            problem = "ambiguous" if matches else "unknown"
            raise ValueError(f"{problem} notebook {selector!r}; available: {names}")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


def parse_value(text: str) -> Any:
    """A command-line value as papermill's `-p` reads it (bool, None, int, float), plus JSON lists/dicts."""
    literals = {"True": True, "true": True, "False": False, "false": False, "None": None, "null": None}
    if text in literals:
        return literals[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def load_profiles(folder: Path | None = None) -> dict[str, dict]:
    """The profiles in `notebooks/profiles.json` (keys starting with "_" are notes); "default" always exists."""
    path = (Path(folder) if folder is not None else notebooks_dir()) / PROFILES_FILE
    profiles: dict[str, dict] = {"default": {}}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        profiles.update({name: value for name, value in data.items() if not name.startswith("_")})
    for name, profile in profiles.items():
        if not isinstance(profile, dict) or not all(isinstance(v, dict) for v in profile.values()):
            raise ValueError(f"{path}: profile {name!r} must map a notebook number or '*' to {{parameter: value}}")
    return profiles


def profile_parameters(profile: Mapping[str, Mapping], notebook: Path) -> dict:
    """One notebook's parameters from a profile: the "*" entry, then its own number's entry."""
    match = NOTEBOOK_RE.fullmatch(notebook.name)
    own = profile.get(match.group(1), {}) if match else {}
    return {**profile.get(ALL_NOTEBOOKS, {}), **own}


_NOT_A_LITERAL = object()  # a parameter whose default is an expression: its type is not checked


def notebook_parameters(notebook: Path) -> dict[str, Any]:
    """The names and defaults assigned in a notebook's cell tagged `parameters` ({} without one)."""
    try:
        cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read notebook {notebook}: {one_line(exc)}") from None
    cell = next((c for c in cells if c.get("cell_type") == "code"
                 and "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return {}
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(f"{notebook.name}: the parameters cell does not parse (line {exc.lineno})") from None
    found = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) and node.value is not None else []
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    found[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    found[target.id] = _NOT_A_LITERAL
    return found


def _type_problem(value: Any, default: Any) -> str | None:
    """Why `value` cannot replace `default` (None when it can): numbers, booleans and lists keep their kind."""
    if value is None or default is None or default is _NOT_A_LITERAL or isinstance(default, str):
        return None
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "True or False"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, (list, tuple)):
        ok, kind = isinstance(value, (list, tuple)), "a JSON list"
    elif isinstance(default, dict):
        ok, kind = isinstance(value, dict), "a JSON object"
    else:
        return None
    return None if ok else f"expects {kind} (default {default!r}), got {value!r}"


def resolve_parameters(notebooks: Sequence[Path], profile: Mapping[str, Mapping],
                       overrides: Mapping[str, Any]) -> dict[Path, dict]:
    """Each notebook's parameters: the profile's, then the overrides, checked against its parameters cell.

    An override must be a parameter of at least one of the notebooks (a typo is an error naming the
    parameters) and goes only to the notebooks that have it; so do the profile's "*" entries. A profile entry
    for one notebook must name its parameters. Numbers, booleans and lists must keep their kind.
    """
    known = {nb: notebook_parameters(nb) for nb in notebooks}
    for name in overrides:
        if not any(name in params for params in known.values()):
            every = sorted({p for params in known.values() for p in params})
            close = difflib.get_close_matches(name, every, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            names = "; ".join(f"{nb.stem}: {', '.join(params) or 'none'}" for nb, params in known.items())
            raise ValueError(f"unknown parameter {name!r}{hint}; the parameters are {names}")
    resolved = {}
    for nb, params in known.items():
        match = NOTEBOOK_RE.fullmatch(nb.name)
        own = profile.get(match.group(1), {}) if match else {}
        unknown = [name for name in own if name not in params]
        if unknown:
            raise ValueError(f"profile entry {match.group(1)} sets {unknown[0]!r}, which {nb.stem} does not have; "
                             f"its parameters: {', '.join(params) or 'none'}")
        chosen = {name: value for name, value in {**profile.get(ALL_NOTEBOOKS, {}), **own, **overrides}.items()
                  if name in params}
        for name, value in chosen.items():
            problem = _type_problem(value, params[name])
            if problem:
                raise ValueError(f"parameter {name!r}: {nb.stem} {problem}")
        resolved[nb] = chosen
    return resolved


def output_environment(output_dir: Path, refresh_reference: bool = False, run_id: str | None = None,
                       label: str | None = None) -> dict[str, str]:
    """The variables the notebooks' kernels get: where results and figures go, the run id and the label.

    By default results go to `<output_dir>/data` and figures to `<output_dir>/figures` (unless
    $LABKIT_DATA_DIR / $LABKIT_FIGURES_DIR say otherwise); with `refresh_reference` to the committed
    `<repo>/data` and `<repo>/figures`.
    """
    from labkit.lab.results import LABEL_ENV, RUN_ID_ENV, new_run_id, reference_data_dir

    if refresh_reference:
        data, figures = reference_data_dir(), repo_root() / "figures"
    else:
        data = os.environ.get("LABKIT_DATA_DIR") or output_dir / "data"
        figures = os.environ.get("LABKIT_FIGURES_DIR") or output_dir / "figures"
    env = {"LABKIT_DATA_DIR": str(data), "LABKIT_FIGURES_DIR": str(figures), RUN_ID_ENV: run_id or new_run_id()}
    if label:
        env[LABEL_ENV] = label
    return env


@contextlib.contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Set variables for the kernels started inside (papermill has no per-kernel env), then restore them."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _DropErrors:
    """A logging filter that drops papermill's error records ("Timeout waiting for execute reply"): the
    exception papermill raises next becomes labkit's own one-line message."""

    def filter(self, record) -> bool:
        import logging

        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _quiet_papermill_log() -> Iterator[None]:
    """Drop papermill's (and the nbclient it drives) error log lines while a notebook runs, then restore."""
    import logging

    logger, quiet = logging.getLogger("papermill"), _DropErrors()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def runs_dir() -> Path:
    """Where run folders go: `$LABKIT_RUNS_DIR`, else `<repo>/runs` (ignored by git)."""
    return Path(os.environ.get("LABKIT_RUNS_DIR") or repo_root() / "runs")


def default_output_dir(run_id: str | None = None) -> Path:
    """The run's folder, `runs/<run id>/` (a new id unless given: UTC time and random digits), so that two runs
    started in the same second never share one; nothing is created."""
    from labkit.lab.results import new_run_id

    return runs_dir() / (run_id or new_run_id())


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_kernel_files(folder: Path) -> list[Path]:
    """Remove the kernel folders (`<run>/.kernels/`) that runs in `folder` left when they died (SIGKILL, a lost
    machine): those whose recorded pid is gone. A process killed that way cannot clean up after itself; its
    kernel exits on its own when its parent dies. Returns what was removed."""
    removed = []
    for kernels in Path(folder).glob(f"*/{KERNELS_DIR}"):
        try:
            pid = int((kernels / OWNER_FILE).read_text())
        except (OSError, ValueError):  # being created, or not ours
            continue
        if pid != os.getpid() and not _is_alive(pid):
            shutil.rmtree(kernels, ignore_errors=True)
            removed.append(kernels)
    return removed


@contextlib.contextmanager
def _kernel_files(output_dir: Path) -> Iterator[Path]:
    """A folder inside the run's folder for its kernels' connection files, removed when the run ends however it
    ends in Python; jupyter_client's default is a temporary file in /tmp, which a killed run left behind. Stale
    ones of dead runs next to this one are removed first."""
    remove_stale_kernel_files(output_dir.parent)
    kernels = output_dir / KERNELS_DIR
    kernels.mkdir(parents=True, exist_ok=True)
    (kernels / OWNER_FILE).write_text(str(os.getpid()))
    try:
        yield kernels
    finally:
        shutil.rmtree(kernels, ignore_errors=True)


def _kernel_config(connection_file: Path):
    """nbclient's configuration that starts the kernel with its connection file at `connection_file`."""
    from traitlets.config import Config

    return Config({"KernelManager": {"connection_file": str(connection_file)}})


def one_line(text: str) -> str:
    """The text with its whitespace runs (newlines too) folded into single spaces."""
    return " ".join(str(text).split())


def _last_started_cell(output: Path) -> str:
    """The cell a timeout or kernel death interrupted: the latest one papermill stamped with a start time."""
    import nbformat

    try:
        cells = nbformat.read(output, as_version=4).cells
    except Exception:  # the copy may not exist if the kernel never started
        return "a cell"
    started = [(c.metadata.get("papermill", {}).get("start_time") or "", i, c.get("execution_count"))
               for i, c in enumerate(cells) if c.cell_type == "code"]
    start, index, count = max(started, default=("", None, None))
    return f"cell [{count}] (index {index})" if start else "a cell"


def _failure(notebook: Path, output: Path, exc: Exception, cell_timeout_s: float | None) -> NotebookFailed:
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        where = f"cell [{exc.exec_count}] (index {exc.cell_index})"
        what = f"{exc.ename}: {one_line(exc.evalue)}"
    elif isinstance(exc, CellTimeoutError):
        where, what = _last_started_cell(output), f"ran longer than the {cell_timeout_s:g} s cell timeout"
    elif isinstance(exc, DeadKernelError):
        where, what = _last_started_cell(output), "the kernel died (out of memory?)"
    else:
        where, what = "start-up or save", f"{type(exc).__name__}: {one_line(exc)}"
    kept = f" (executed copy kept at {output})" if output.exists() else ""
    return NotebookFailed(f"{notebook.name} failed at {where}: {what}{kept}")


def run_notebooks(paths: Sequence[Path], parameters: Mapping[str, Any] | None = None, profile: str = "default",
                  output_dir: Path | str | None = None, cell_timeout_s: float | None = 600,
                  progress: bool = True, refresh_reference: bool = False, label: str | None = None,
                  run_id: str | None = None) -> list[Path]:
    """Execute notebooks in order with papermill; return the executed copies; raise NotebookFailed on error.

    Parameters are checked against each notebook's parameters cell before anything runs. Results and figures
    go where `output_environment` says: under `output_dir` (default `runs/<run id>/`) unless `refresh_reference`.
    """
    from labkit.lab.results import new_run_id

    if cell_timeout_s is not None and not cell_timeout_s > 0:
        raise ValueError(f"the cell timeout must be > 0 seconds, got {cell_timeout_s}")
    paths = [Path(p) for p in paths]
    profiles = load_profiles()
    if profile not in profiles:
        raise ValueError(f"unknown profile {profile!r}; available: {', '.join(sorted(profiles))}")
    resolved = resolve_parameters(paths, profiles[profile], parameters or {})
    run_id = run_id or new_run_id()
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(run_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    variables = output_environment(output_dir, refresh_reference, run_id, label)
    with _kernel_files(output_dir) as kernels:
        return _execute(paths, resolved, output_dir, variables, kernels, cell_timeout_s, progress)


def _execute(paths: Sequence[Path], resolved: Mapping[Path, dict], output_dir: Path, variables: Mapping[str, str],
             kernels: Path, cell_timeout_s: float | None, progress: bool) -> list[Path]:
    """run_notebooks' loop: each notebook through papermill, its kernel's connection file in `kernels`."""
    import papermill as pm
    from tqdm.auto import tqdm

    # papermill's per-cell bar only helps a person watching a terminal; in logs it is noise
    show_cells = progress and sys.stderr.isatty()
    outputs = []
    bar = tqdm(paths, desc="labkit run", unit="notebook", disable=not progress)
    for notebook in bar:
        bar.set_postfix_str(notebook.name)
        output = output_dir / notebook.name
        try:
            with _environment(variables), _quiet_papermill_log():
                pm.execute_notebook(
                    str(notebook), str(output),
                    parameters=resolved[notebook],
                    kernel_name=KERNEL_NAME,
                    cwd=str(notebook.parent),  # relative paths in a notebook mean the notebooks folder
                    execution_timeout=cell_timeout_s,
                    progress_bar=show_cells,
                    log_output=False,
                    # ipykernel warns on every start that its localhost TCP sockets are unencrypted, and when a
                    # timed-out cell is interrupted logs a ZMQ traceback: noise before labkit's own message
                    extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
                    config=_kernel_config(kernels / f"kernel-{notebook.stem}.json"),
                )
        except Exception as exc:  # kernel start-up fails with plain RuntimeError/KeyError: report them all alike
            bar.close()
            raise _failure(notebook, output, exc, cell_timeout_s) from exc
        outputs.append(output)
    return outputs
