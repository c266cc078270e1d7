"""The results store: one JSON Lines file of measurement rows, each stamped with its environment and run.

Writers append whole lines with one `O_APPEND` write under a `filelock` lock and fsync, so concurrent writers
never interleave and a killed writer leaves at most one torn last line (no temp copies). Readers skip that
torn line silently and any other corrupt or non-UTF-8 line with a warning naming the file and line.
`labkit results` lists runs, tabulates rows and compares runs (by label, technique, engine) with pandas.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
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


def reference_data_dir() -> Path:
    """The committed reference results: `<repo>/data` (what `labkit run --refresh-reference` rewrites)."""
    return repo_root() / "data"


def _data_dir_path() -> Path:
    return Path(os.environ.get("LABKIT_DATA_DIR") or reference_data_dir())


def data_dir() -> Path:
    """The results folder: `$LABKIT_DATA_DIR`, else `<repo>/data`; created on demand."""
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


def report_rows(rows: list[dict], args, default_file: str, table: str | Callable[[list[dict]], str]) -> int:
    """The end of a benchmark command (options from `arguments.add_run_output_options`): stamp the rows with the
    run id and --label, append them to the store and write the run's JSON (unless --no-save), then print the
    table, or with --json the rows on stdout and the table on stderr. Returns the exit status, 0."""
    rows = stamp_rows(rows, label=args.label)
    if not args.no_save:
        append_rows(rows)
        write_json_atomic(args.output or data_dir() / default_file, rows)
    text = table(rows) if callable(table) else table
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


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
    """All rows of one or more results files as a DataFrame, nested dicts flattened (`metrics.tokens_per_s`,
    `env.cpu`), with a `run` column (see `run_key`); empty if there are none."""
    paths = [path] if path is None or isinstance(path, (str, PurePath)) else list(path)
    return rows_frame([row for p in paths for row in read_rows(p, on_error)])


def rows_frame(rows: Sequence[Mapping]) -> pd.DataFrame:
    """Rows as `load_results` returns them: flattened, with a `run` column; index i is rows[i]."""
    import pandas as pd

    if not rows:
        return pd.DataFrame()
    runs = run_keys(rows)
    df = pd.json_normalize(rows)
    df.insert(0, "run", runs)
    if "timestamp" in df:
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    return df


LEGACY_GAP_S = 60  # rows written before run ids existed: one run while the technique repeats within this gap


def run_keys(rows: Sequence[Mapping]) -> list[str]:
    """Each row's run: its `run_id`; rows from before run ids existed are grouped in file order into
    `legacy-<time>` runs of one technique with under a minute between rows."""
    keys, previous = [], None
    for row in rows:
        if row.get("run_id"):
            keys.append(str(row["run_id"]))
            previous = None
            continue
        try:
            t = datetime.fromisoformat(str(row.get("timestamp")))
        except ValueError:
            t = None
        same = (previous is not None and t is not None and previous[1] is not None
                and previous[0] == row.get("technique") and 0 <= (t - previous[1]).total_seconds() < LEGACY_GAP_S)
        key = keys[-1] if same else f"legacy-{t:%Y%m%dT%H%M%SZ}" if t else "legacy"
        keys.append(key)
        previous = (row.get("technique"), t)
    return keys


# -- `labkit results`: list runs, tabulate rows, compare runs -------------------------------------------------
ENGINE_KEYS = ("variant", "policy", "engine")  # a row's engine: the first of these params that is a string
HEADLINE_METRICS = ("tokens_per_s", "output_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "median_ttft_ms",
                    "median_tpot_ms", "total_latency_ms", "duration_s")
COMPARE_BY = {"label": "label", "run": "run", "technique": "technique", "engine": "engine"}
PER_RUN_PARAMS = ("params.result_file",)  # differ on every run by design: never a key to line runs up on
_ENGINE_PARAMS = tuple(f"params.{key}" for key in ENGINE_KEYS)  # shown as the engine column


def _engine_column(df: pd.DataFrame) -> pd.Series:
    import pandas as pd

    engine = pd.Series([None] * len(df), index=df.index, dtype=object)
    for key in ENGINE_KEYS:
        if f"params.{key}" in df:
            values = df[f"params.{key}"]
            engine = engine.where(engine.notna() | ~values.map(lambda v: isinstance(v, str)), values)
    return engine


def _frame(df: pd.DataFrame) -> pd.DataFrame:
    """The store's frame with the columns every view needs: run, label, technique, engine."""
    df = df.copy()
    if "label" not in df:
        df["label"] = None
    df["engine"] = _engine_column(df)
    return df


def _matches(values: pd.Series, wanted: Sequence[str] | None) -> pd.Series:
    return values.astype(str).isin(wanted) if wanted else values.map(lambda _: True)


def select(df: pd.DataFrame, runs: Sequence[str] | None = None, labels: Sequence[str] | None = None,
           techniques: Sequence[str] | None = None, engines: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of the given runs (full ids, unique prefixes, or "last"), labels, techniques and engines."""
    df = _frame(df)
    if runs:
        known = list(dict.fromkeys(df["run"]))
        chosen = []
        for wanted in runs:
            matches = known[-1:] if wanted == "last" else [r for r in known if r == wanted] or \
                [r for r in known if r.startswith(wanted)]
            if len(matches) != 1:
                problem = "ambiguous" if matches else "unknown"
                raise ValueError(f"{problem} run {wanted!r}; runs: {', '.join(known[-5:])}"
                                 + (f" and {len(known) - 5} older" if len(known) > 5 else ""))
            chosen.append(matches[0])
        df = df[df["run"].isin(chosen)]
    for column, wanted in (("label", labels), ("technique", techniques), ("engine", engines)):
        if wanted:
            present = sorted(set(df[column].dropna().astype(str)))
            if not set(wanted) & set(present):
                raise ValueError(f"no rows with {column} {', '.join(wanted)}; {column}s here: "
                                 f"{', '.join(present) or 'none'}")
            df = df[_matches(df[column], wanted)]
    return df


def list_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One line per run, oldest first: start time, label, techniques, engines, rows, hardware, git SHA."""
    import pandas as pd

    df = _frame(df)
    hardware = df["env.gpu"].fillna(df["env.cpu"]) if "env.gpu" in df and "env.cpu" in df else \
        df.get("env.cpu", pd.Series([None] * len(df), index=df.index))
    df = df.assign(hardware=hardware, git=df.get("env.git_sha"))

    def joined(values: pd.Series) -> str:
        return ", ".join(dict.fromkeys(str(v) for v in values.dropna())) or "-"

    runs = df.groupby("run", sort=False).agg(
        start=("timestamp", "min"), label=("label", joined), techniques=("technique", joined),
        engines=("engine", joined), rows=("technique", "size"), hardware=("hardware", joined), git=("git", joined))
    return runs.sort_values("start").reset_index()


def headline_metrics(df: pd.DataFrame) -> list[str]:
    """The headline metrics (HEADLINE_METRICS) that some row of the frame has."""
    return [m for m in HEADLINE_METRICS if f"metrics.{m}" in df and df[f"metrics.{m}"].notna().any()]


def _is_scalar_column(values: pd.Series) -> bool:
    return not values.map(lambda v: isinstance(v, (list, dict))).any()


def varying_params(df: pd.DataFrame, within: str | None = None) -> list[str]:
    """The scalar `params.*` columns that differ between rows (within one group of `within`, if given)."""
    columns = []
    for column in df.columns:
        if (not column.startswith("params.") or column in PER_RUN_PARAMS or column in _ENGINE_PARAMS
                or not _is_scalar_column(df[column])):
            continue
        values = df[column].astype(str)
        counts = values.groupby(df[within].astype(str)).nunique() if within else [values.nunique()]
        if max(counts, default=0) > 1:
            columns.append(column)
    return columns


def tabulate(df: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows with run, label, technique, engine, the params that vary, and the given (or headline) metrics."""
    df = _frame(df)
    metrics = list(metrics) if metrics else headline_metrics(df)
    missing = [m for m in metrics if f"metrics.{m}" not in df]
    if missing:
        raise ValueError(f"no metric {missing[0]!r} in these rows; they have: "
                         f"{', '.join(c.removeprefix('metrics.') for c in df if c.startswith('metrics.'))}")
    keys = varying_params(df)
    table = df[["run", "label", "technique", "engine", *keys, *(f"metrics.{m}" for m in metrics)]]
    return table.rename(columns=lambda c: c.removeprefix("params.").removeprefix("metrics."))


def compare(df: pd.DataFrame, by: str = "label", metric: str | None = None,
            on: Sequence[str] | None = None) -> pd.DataFrame:
    """The median of one metric, one column per value of `by` (label, run, technique or engine), one line per
    case; `on` names the case columns (default: technique, engine and the params that vary within a group).
    Later columns get a ratio to the first: `after / before`."""
    if by not in COMPARE_BY:
        raise ValueError(f"cannot compare by {by!r}: choose one of {', '.join(COMPARE_BY)}")
    df = _frame(df)
    metric = metric or next(iter(headline_metrics(df)), None)
    if metric is None or f"metrics.{metric}" not in df:
        have = ", ".join(c.removeprefix("metrics.") for c in df if c.startswith("metrics.")) or "none"
        raise ValueError(f"no metric {metric!r} in these rows; they have: {have}")
    value = f"metrics.{metric}"
    df = df[df[value].notna()].copy()
    df[by] = df[by].fillna("(none)").astype(str)
    groups = list(dict.fromkeys(df[by]))
    if len(groups) < 2:
        raise ValueError(f"comparing needs rows of two or more {by}s; these rows have {', '.join(groups) or 'none'}")
    if on:
        unknown = [c for c in on if c not in df]
        if unknown:
            raise ValueError(f"no column {unknown[0]!r}; e.g. {', '.join(varying_params(df)[:6]) or 'params.*'}")
        keys = list(on)
    else:
        keys = [c for c in ("technique", "engine") if c != by and df[c].notna().any()]
        keys += varying_params(df, within=by)
    for key in keys:  # a missing value is a case of its own, not a dropped row
        df[key] = df[key].astype(object).where(df[key].notna(), "-")
    table = df.pivot_table(index=keys, columns=by, values=value, aggfunc="median") if keys else \
        df.groupby(by)[value].median().to_frame().T
    table = table[[g for g in groups if g in table.columns]]
    for group in groups[1:]:
        table[f"{group} / {groups[0]}"] = table[group] / table[groups[0]]
    table.columns.name = f"{metric} by {by}"
    return table.rename_axis(index=[k.removeprefix("params.") for k in keys] if keys else None)


def _print_frame(frame: pd.DataFrame, as_json: bool, index: bool) -> None:
    if as_json:
        data = frame.reset_index() if index else frame
        print(data.to_json(orient="records", date_format="iso", double_precision=6))
        return
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_colwidth", 40,
                           "display.float_format", "{:.4g}".format):
        print(frame.to_string(index=index))


def cmd_results(args) -> int:
    """`labkit results`: the runs, the rows of a selection, or a comparison; warnings for skipped lines."""
    def warn(message: str) -> None:
        print(f"labkit results: warning: {message}", file=sys.stderr)

    files = args.file or [store_path()]
    rows = [row for path in files for row in read_rows(path, on_error=warn)]
    df = rows_frame(rows)
    if df.empty:
        print(f"labkit results: no results in {', '.join(map(str, files))}", file=sys.stderr)
        if args.json:
            print("[]")
        return 0
    df = select(df, args.run, args.label, args.technique, args.engine)
    if args.compare:
        _print_frame(compare(df, args.compare, args.metric, args.on), args.json, index=True)
    elif args.rows:
        if args.json:
            print(json.dumps([rows[i] for i in df.index], allow_nan=False))
        else:
            _print_frame(tabulate(df, [args.metric] if args.metric else None), False, index=False)
    else:
        _print_frame(list_runs(df), args.json, index=False)
    return 0


def add_parser(subparsers) -> None:
    """Register `labkit results` on the CLI's subparsers."""
    import argparse

    from labkit.cli.arguments import comma_list

    p = subparsers.add_parser(
        "results", help="list runs in the results store; tabulate or compare them",
        description="Read the results store (data/results.jsonl, or $LABKIT_DATA_DIR/results.jsonl) with pandas.\n"
                    "Without --rows or --compare: one line per run (run id, start, label, techniques, engines,\n"
                    "rows, hardware, git SHA). A row's engine is its params.variant, params.policy or\n"
                    "params.engine. Rows written before run ids existed are grouped into legacy-<time> runs.\n"
                    "Corrupt lines are skipped with a warning naming file and line.",
        epilog="examples:\n"
               "  labkit results                                   # the runs\n"
               "  labkit results --rows --run last                 # the newest run's rows\n"
               "  labkit results --compare label --technique decode --metric tokens_per_s\n"
               "  labkit results --compare engine --technique batching --metric output_tokens_per_s\n"
               "  labkit results --file runs/*/data/results.jsonl  # the lab runs kept under runs/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rows", action="store_true", help="tabulate the selected rows")
    mode.add_argument("--compare", choices=tuple(COMPARE_BY), metavar="BY",
                      help=f"one column per {'/'.join(COMPARE_BY)}, ratios to the first")
    p.add_argument("--metric", default=None,
                   help=f"the metric to compare or show (default: the first of {', '.join(HEADLINE_METRICS[:4])}, "
                        "... that the rows have)")
    p.add_argument("--on", type=comma_list(str), default=None, metavar="COL,...",
                   help="--compare: the columns that name a case (default: technique, engine and the params "
                        "that vary within a group)")
    p.add_argument("--run", type=comma_list(str), default=None, metavar="ID,...",
                   help="runs by id, unique prefix, or 'last'")
    p.add_argument("--label", type=comma_list(str), default=None, metavar="LABEL,...", help="rows with these labels")
    p.add_argument("--technique", type=comma_list(str), default=None, metavar="NAME,...",
                   help="e.g. decode, batching, baseline, bench_serve")
    p.add_argument("--engine", type=comma_list(str), default=None, metavar="NAME,...",
                   help="e.g. hf-fp32, labkit-fp32, continuous")
    p.add_argument("--file", type=Path, nargs="+", action="extend", default=None, metavar="FILE",
                   help="results files to read (default: the store)")
    p.add_argument("--json", action="store_true", help="JSON on stdout: records of the table, or with --rows the rows")
    p.set_defaults(func=cmd_results)
