"""The results store: one JSON Lines file of measurement rows, each stamped with its environment."""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from datetime import date, datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import pandas as pd

RESULTS_FILE = "results.jsonl"
REQUIRED_KEYS = ("technique", "params", "metrics", "env")  # append_rows adds a missing "timestamp"


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _data_dir_path() -> Path:
    return Path(os.environ.get("LABKIT_DATA_DIR") or _repo_root() / "data")


def data_dir() -> Path:
    """The results folder: `$LABKIT_DATA_DIR`, else `<repo>/data`; created on demand."""
    path = _data_dir_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def make_row(technique: str, params: Mapping, metrics: Mapping, env: Mapping | None = None, *,
             seed: int | None = None) -> dict:
    """One results row; `env` defaults to `device.describe_environment()`, `seed` to `params["seed"]`."""
    if not isinstance(technique, str) or not technique:
        raise ValueError(f"technique must be a non-empty string, got {technique!r}")
    for name, value in (("params", params), ("metrics", metrics)):
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    if env is None:
        from labkit.device import describe_environment  # torch is heavy: import only when a stamp is needed

        env = describe_environment()
    return {
        "technique": technique,
        "params": dict(params),
        "metrics": dict(metrics),
        "env": dict(env),
        "timestamp": _now_iso(),
        "seed": seed if seed is not None else params.get("seed"),
    }


def to_jsonable(value: Any, where: str = "value") -> Any:
    """Plain JSON types from numpy/torch scalars and arrays, Paths and datetimes; NaN and ±inf become None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # int subclasses (IntEnum) serialise as plain numbers
    if isinstance(value, float):
        # JSON has no NaN; null keeps the row loadable by every reader
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors: no import needed to recognise them
        return to_jsonable(value.tolist(), where)
    if type(value).__module__.split(".")[0] == "torch":  # torch.dtype, torch.device
        return str(value)
    raise TypeError(f"{where} of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, fsync, then rename over it, so readers see old or new."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; keep the old file's mode, or a normal 0644 for a new one
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # the rename is durable only once the directory entry is on disk
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write one JSON document (indented, NaN as null) atomically; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode())
    return path


def append_rows(rows: Iterable[Mapping] | Mapping, path: str | Path | None = None) -> Path:
    """Append rows (from `make_row`) to `data_dir()/results.jsonl`; safe across processes, atomic on crash."""
    if isinstance(rows, Mapping):
        rows = [rows]
    lines = []
    for i, row in enumerate(rows):
        missing = [key for key in REQUIRED_KEYS if key not in row]
        if missing:
            raise ValueError(f"row {i} lacks {', '.join(missing)}: build rows with results.make_row")
        row = {**row, "timestamp": row.get("timestamp") or _now_iso()}
        lines.append(json.dumps(to_jsonable(row, f"row {i}"), allow_nan=False) + "\n")
    path = Path(path) if path is not None else data_dir() / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    new = "".join(lines).encode()
    # Lock a sidecar, not the data file: os.replace swaps the data file's inode, so a lock on it would not
    # exclude a writer that opened the new one.
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"  # a file edited by hand may lack the final newline
        write_bytes_atomic(path, old + new)
    return path


def read_rows(path: str | Path | None = None) -> list[dict]:
    """The raw rows of a results file; [] when it does not exist; a corrupt line raises ValueError."""
    path = Path(path) if path is not None else _data_dir_path() / RESULTS_FILE  # reading creates nothing
    if not path.exists():
        return []
    # no lock needed: writers replace the file whole, so a reader never sees half a row
    with open(path, encoding="utf-8") as f:
        return [row for _, row in json_lines(f, path, "corrupt results line")]


def json_lines(lines: Iterable[str], source: str | Path, what: str = "not JSON") -> Iterator[tuple[str, dict]]:
    """(where, object) for each non-blank line of a JSON Lines text; a bad line raises ValueError naming
    `source:line` and what was wrong."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: {what} ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def load_results(path: str | Path | None = None) -> pd.DataFrame:
    """All rows as a DataFrame with nested dicts flattened (`metrics.tokens_per_s`, `env.cpu`); empty if none."""
    rows = read_rows(path)
    if not rows:
        return pd.DataFrame()
    df = pd.json_normalize(rows)
    if "timestamp" in df:
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    return df
