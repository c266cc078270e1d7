"""The results store: one JSON Lines file of measurement rows, each stamped with its environment and run.

Writers append whole lines with one `O_APPEND` write under a `filelock` lock and fsync, so concurrent writers
never interleave and a killed writer leaves at most one torn last line (no temp copies). Readers skip that
torn line silently and any other corrupt or non-UTF-8 line with a warning naming the file and line.
`labkit.lab.analysis` reads the rows with pandas: runs, tables, comparisons; `export_frame` writes a frame as CSV
or Parquet. By default the store is the untracked `runs/store/`; the committed reference `data/` is written only
when `$LABKIT_DATA_DIR` points there (`--refresh-reference`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime, timezone
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from labkit.device import repo_root

if TYPE_CHECKING:  # pandas is imported when a frame is built, so `labkit --help` stays fast
    import pandas as pd

RESULTS_FILE = "results.jsonl"
REQUIRED_KEYS = ("technique", "params", "metrics", "env")  # stamp_rows adds timestamp, run_id and label
RUN_ID_ENV, LABEL_ENV = "LABKIT_RUN_ID", "LABKIT_LABEL"  # set by `labkit run` for the notebooks it executes


class ResultsWarning(UserWarning):
    """A line of a results file was skipped (corrupt JSON, not UTF-8, not a row)."""


DATA_DIR_ENV = "LABKIT_DATA_DIR"


def reference_data_dir() -> Path:
    """The committed reference results: `<repo>/data`, written only by an explicit `--refresh-reference`."""
    return repo_root() / "data"


def local_data_dir() -> Path:
    """The untracked results store: `<repo>/runs/store` (runs/ is ignored by git), where runs write by default."""
    return repo_root() / "runs" / "store"


def _data_dir_path() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or local_data_dir())


def data_dir() -> Path:
    """The results folder: `$LABKIT_DATA_DIR`, else the untracked `<repo>/runs/store`; created on demand.

    Never the committed `data/` unless asked: `--refresh-reference` points `$LABKIT_DATA_DIR` there.
    """
    path = _data_dir_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_path() -> Path:
    """The results file, `data_dir()/results.jsonl`; nothing is created."""
    return _data_dir_path() / RESULTS_FILE


def check_writable(path: str | Path, is_dir: bool = False) -> Path:
    """Raise ValueError unless `path` can be written (created with its missing parents); create nothing.

    For checking an output path before a long measurement, so a typo cannot lose the result.
    """
    path = Path(path).expanduser()
    kind = "folder" if is_dir else "file"
    if path.exists():
        if is_dir != path.is_dir():
            raise ValueError(f"{path} is {'a folder' if path.is_dir() else 'not a folder'}: expected a {kind}")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{path}: permission denied")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {path}: permission denied in {parent}")
    return path


def check_store(path: str | Path | None = None) -> Path:
    """Raise ValueError unless the results file (default: the store) can be appended to; create nothing."""
    return check_writable(Path(path) if path is not None else store_path())


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus 6 random hex digits, e.g. `20261128T073136Z-3f9a1c`."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


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


def stamp_rows(rows: Iterable[Mapping] | Mapping, run_id: str | None = None, label: str | None = None) -> list[dict]:
    """Rows ready to store: checked, with a timestamp, a run id and a label where they lack one.

    The run id defaults to `$LABKIT_RUN_ID`, else one new id for all these rows; the label to `$LABKIT_LABEL`,
    else None. A row whose metrics say no request completed (`num_completed == 0`) is refused: a run that
    measured nothing is not a result.
    """
    if isinstance(rows, Mapping):
        rows = [rows]
    run_id = run_id or os.environ.get(RUN_ID_ENV) or new_run_id()
    label = label if label is not None else (os.environ.get(LABEL_ENV) or None)
    stamped = []
    for i, row in enumerate(rows):
        missing = [key for key in REQUIRED_KEYS if key not in row]
        if missing:
            raise ValueError(f"row {i} lacks {', '.join(missing)}: build rows with results.make_row")
        metrics = row["metrics"]
        if isinstance(metrics, Mapping) and metrics.get("num_completed") == 0:
            raise ValueError(f"row {i} ({row['technique']}) completed no requests: not recorded as a result")
        stamped.append({**row, "timestamp": row.get("timestamp") or _now_iso(), "run_id": row.get("run_id") or run_id,
                        "label": row["label"] if row.get("label") is not None else label})
    return stamped


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_rows(rows: Iterable[Mapping] | Mapping, path: str | Path | None = None, *, run_id: str | None = None,
                label: str | None = None) -> Path:
    """Append rows (from `make_row`, stamped by `stamp_rows`) to `data_dir()/results.jsonl`.

    One O_APPEND write of whole lines under a lock, then fsync: concurrent writers never interleave, a failed
    write is cut back off, and a killed writer leaves at most a torn last line, which readers skip.
    """
    from filelock import FileLock

    lines = [json.dumps(to_jsonable(row, f"row {i}"), allow_nan=False) + "\n"
             for i, row in enumerate(stamp_rows(rows, run_id, label))]
    path = Path(path) if path is not None else data_dir() / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(lines).encode()
    with FileLock(path.with_name(path.name + ".lock")):
        is_new = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a torn line from a killed writer, or a hand edit: start on a line of our own
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)  # no half row left behind by a full disk or an interrupt
                raise
        finally:
            os.close(fd)
        if is_new:
            _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _warn(message: str) -> None:
    warnings.warn(message, ResultsWarning, stacklevel=4)


def json_lines(lines: Iterable[str | bytes], source: str | Path, what: str = "not JSON",
               on_error: Callable[[str], object] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, object) for each non-blank line of a JSON Lines text (str or UTF-8 bytes lines).

    A bad line raises ValueError naming `source:line` and what was wrong, or with `on_error` is reported
    through it and skipped.
    """
    for lineno, line in enumerate(lines, start=1):
        where = f"{source}:{lineno}"
        try:
            text = line.decode("utf-8") if isinstance(line, bytes) else line
            if not text.strip():
                continue
            obj = json.loads(text)
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
        except json.JSONDecodeError as exc:
            problem = f"{what} ({exc.msg} at column {exc.colno})"
        else:
            if isinstance(obj, dict):
                yield where, obj
                continue
            problem = f"expected a JSON object, got {type(obj).__name__}"
        if on_error is None:
            raise ValueError(f"{where}: {problem}")
        on_error(f"{where}: {problem}; line skipped")


def read_rows(path: str | Path | None = None, on_error: Callable[[str], object] | None = None) -> list[dict]:
    """The rows of a results file; [] when it does not exist.

    A corrupt, non-UTF-8 or non-row line is skipped and reported through `on_error` (default: a
    ResultsWarning naming file and line); an unfinished last line (a write in progress, or a killed writer)
    is skipped silently. No lock: appends are whole lines, so a reader sees each row whole or not at all.
    """
    path = Path(path) if path is not None else store_path()  # reading creates nothing
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    report = on_error or _warn
    rows = []
    for where, obj in json_lines(lines, path, "corrupt results line", report):
        if isinstance(obj.get("technique"), str) and isinstance(obj.get("metrics"), dict):
            rows.append(obj)
        else:
            report(f"{where}: not a results row (no technique or metrics); line skipped")
    if tail.strip():
        try:
            row = json.loads(tail)
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None  # torn
        if isinstance(row, dict) and isinstance(row.get("technique"), str):
            rows.append(row)  # a complete row that lacks only its newline (edited by hand)
    return rows


def load_results(path: str | Path | Sequence[str | Path] | None = None,
                 on_error: Callable[[str], object] | None = None) -> pd.DataFrame:
    """All rows of one or more results files (default: the store) as a pandas DataFrame; empty if there are none.

    One line per row, in file order. Columns: `run` (the run id, or `legacy-<time>` for rows older than run ids;
    see `analysis.run_keys`), `technique`, `label`, `run_id`, `seed`, `timestamp` (a UTC datetime), and the nested
    dicts flattened with dots: `params.<name>` (what was measured: model, batch_size, variant, ...),
    `metrics.<name>` (the numbers, units in their names: tokens_per_s, ttft_ms, ...), `env.<name>` (the
    environment stamp: cpu, gpu, num_cpus, torch, git_sha, ...). A key some rows lack is NaN in the others;
    list values (e.g. `metrics.tokens_per_s_runs`) stay lists. Views over it: `analysis.select`, `tabulate`,
    `compare`, `list_runs`; `labkit results --rows --format csv|parquet --out FILE` writes it to a file.
    """
    from labkit.lab.analysis import rows_frame

    paths = [path] if path is None or isinstance(path, (str, PurePath)) else list(path)
    return rows_frame([row for p in paths for row in read_rows(p, on_error)])


EXPORT_FORMATS = ("csv", "parquet")


def export_frame(df: pd.DataFrame, path: str | Path, fmt: str, index: bool = False) -> Path:
    """Write a frame as CSV or Parquet, atomically (a temp file renamed over `path`); returns the path.

    List and dict cells (e.g. `metrics.tokens_per_s_runs`) are written as JSON text, so every column has one
    type. Parquet needs pyarrow; without it, a one-line ValueError says how to install it.
    """
    import io

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    df = df.copy()
    for column in df.columns:
        if df[column].dtype != object:
            continue
        if df[column].map(lambda v: isinstance(v, (list, dict))).any():
            df[column] = df[column].map(lambda v: json.dumps(to_jsonable(v)) if isinstance(v, (list, dict)) else v)
        if len({type(v) for v in df[column].dropna()}) > 1:  # e.g. 4 and "auto": Parquet wants one type
            df[column] = df[column].map(lambda v: v if v is None or v != v else str(v))
    if fmt == "csv":
        data = df.to_csv(index=index).encode()
    else:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("Parquet export needs pyarrow: pip install pyarrow (or use --format csv)") from None
        buffer = io.BytesIO()
        df.to_parquet(buffer, index=index)
        data = buffer.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, data)
