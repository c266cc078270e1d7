"""The results store read with pandas: rows as a frame, runs, tables of rows and comparisons between runs.

A row's run is its `run_id`; a row's engine is its first string `params.variant`, `params.policy` or
`params.engine`. `labkit results` prints these views; notebooks call them directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas is imported when a frame is built, so `labkit --help` stays fast
    import pandas as pd


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


ENGINE_KEYS = ("variant", "policy", "engine")  # a row's engine: the first of these params that is a string
HEADLINE_METRICS = ("tokens_per_s", "output_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "median_ttft_ms",
                    "median_tpot_ms", "total_latency_ms", "duration_s")
COMPARE_BY = {"label": "label", "run": "run", "technique": "technique", "engine": "engine"}
# differ on every run by design (a server's random port, where a file went): never a key to line runs up on
PER_RUN_PARAMS = tuple(f"params.{key}" for key in ("result_file", "result_dir", "result_filename", "output",
                                                   "base_url", "host", "port"))
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


def hardware_column(df: pd.DataFrame) -> pd.Series:
    """Each row's hardware: `env.gpu` where a GPU ran it, else `env.cpu` with its `env.num_cpus` and
    `env.cpu_capability` (two CPUs of one name may differ in vector extensions); None where unknown."""
    import pandas as pd

    def column(name: str) -> pd.Series:
        return df[name] if name in df else pd.Series([None] * len(df), index=df.index, dtype=object)

    def details(cpus, capability) -> str:
        parts = [f"{cpus:g} cpus" if isinstance(cpus, (int, float)) and cpus == cpus else None,
                 capability if isinstance(capability, str) and capability else None]
        return f" ({', '.join(p for p in parts if p)})" if any(parts) else ""

    cpu = column("env.cpu").astype(object)
    extra = pd.Series([details(n, c) for n, c in zip(column("env.num_cpus"), column("env.cpu_capability"))],
                      index=df.index, dtype=object)
    cpu = cpu.where(cpu.isna(), cpu.astype(str) + extra)
    gpu = column("env.gpu").astype(object)
    return gpu.where(gpu.notna(), cpu)


def list_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One line per run, oldest first (runs without a timestamp last): start time, label, techniques, engines,
    rows, hardware, git SHA."""
    import pandas as pd

    df = _frame(df)
    if "timestamp" not in df:  # rows written by hand or by another tool may lack it
        df["timestamp"] = pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns, UTC]")
    df = df.assign(hardware=hardware_column(df), git=df.get("env.git_sha"))

    def joined(values: pd.Series) -> str:
        return ", ".join(dict.fromkeys(str(v) for v in values.dropna())) or "-"

    runs = df.groupby("run", sort=False).agg(
        start=("timestamp", "min"), label=("label", joined), techniques=("technique", joined),
        engines=("engine", joined), rows=("technique", "size"), hardware=("hardware", joined), git=("git", joined))
    return runs.sort_values("start", na_position="last", kind="stable").reset_index()


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
    table.attrs["hardware"] = group_hardware(df, by)
    return table.rename_axis(index=[k.removeprefix("params.") for k in keys] if keys else None)


def group_hardware(df: pd.DataFrame, by: str) -> dict[str, list[str]]:
    """The hardware each group of `by` ran on, groups in order of appearance ("unknown" for rows without a stamp)."""
    hardware = hardware_column(df).fillna("unknown").astype(str)
    keys = df[by].fillna("(none)").astype(str)
    return {group: list(dict.fromkeys(hardware[keys == group])) for group in dict.fromkeys(keys)}


def hardware_warnings(hardware: Mapping[str, Sequence[str]]) -> list[str]:
    """One line per group whose ratio to the first group compares different hardware (`compare`'s
    `table.attrs["hardware"]`), naming both; [] when every group ran on the same hardware."""
    groups = list(hardware)
    if not groups:
        return []
    first = groups[0]
    mixed = [f"{group!r} mixes rows from {' and '.join(hardware[group])}: its medians pool different hardware"
             for group in groups if len(hardware[group]) > 1]
    return mixed + [f"{group!r} ran on {' + '.join(hardware[group])} but {first!r} on "
                    f"{' + '.join(hardware[first])}: the ratio '{group} / {first}' compares different hardware"
                    for group in groups[1:] if set(hardware[group]) != set(hardware[first])]

