"""Figures: the paper-ready "labkit" plotly template, `save_figure` (HTML plus PDF/SVG/PNG, shown in notebooks with
its PNG so exported notebooks draw it), statistics for error bars and tails, and notebook export to HTML."""

from __future__ import annotations

import asyncio
import base64
import math
import numbers
import os
import re
import shutil
import statistics
import textwrap
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from labkit.device import repo_root
from labkit.lab.results import write_bytes_atomic

TEMPLATE_NAME = "labkit"
# Okabe & Ito 2008, "Color Universal Design"; yellow last because it is faint on white
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
STATIC_FORMATS = ("pdf", "svg", "png", "jpg", "webp")
RASTER_FORMATS = ("png", "jpg", "webp")  # `scale` multiplies pixels only for these; vector output keeps its size
BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
EXPORT_TIMEOUT_S = 180  # browser start plus every format of one figure; a hung browser must not hang a notebook
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")

# Static figures are drawn at STATIC_WIDTH_PX and printed one column wide, so a font of f px prints at
# f * COLUMN_WIDTH_IN * 72 / STATIC_WIDTH_PX points: 20 px -> 8.4 pt at 3.5 in (see `font_pt`).
COLUMN_WIDTH_IN = 3.5  # a single column of a two-column paper
MIN_FONT_PT = 8
STATIC_WIDTH_PX, STATIC_HEIGHT_PX = 600, 400
STATIC_SCALE = 3  # PNG pixels per layout pixel: 1800 px over 3.5 in is 514 dpi
DISPLAY_SCALE = 1.5  # the PNG a notebook output carries: sharp on a HiDPI screen, a quarter of the file's bytes
_DISPLAY_PNG = "display-png"
FONT_PX, TITLE_FONT_PX = 20, 22
TITLE_MARGIN_PX = 50  # the top margin for a one-line title; each further line adds 1.25 lines
_CHAR_WIDTH = 0.55  # average glyph width of Helvetica/Arial in ems, to wrap titles before they are clipped

# Human names for the columns and values the notebooks plot; px's `labels=` takes this dict as it is.
LABELS = {
    "hf": "HF generate", "labkit": "labkit engine", "hf-sequential": "sequential HF",
    "engine": "engine", "policy": "policy", "prompt_tokens": "prompt tokens", "new_tokens": "new tokens",
    "ttft_ms": "time to first token (ms)", "tpot_ms": "time per output token (ms)",
    "e2el_ms": "end-to-end latency (ms)", "decode_tokens_per_s": "decode tokens/s",
    "output_tokens_per_s": "output tokens/s", "output_len": "output tokens", "request_rate": "requests/s offered",
    "sent_at_ms": "sent at (ms from start)", "latency_ms": "latency (ms)", "t_s": "time (s)",
    "num_tokens_in_cache": "tokens stored", "allocated_slots": "slots in allocated blocks",
    "reserved_slots": "slots a contiguous cache reserves", "num_running": "running", "num_waiting": "waiting",
}
# px's defaults and anything shaped like a column name (snake_case) are not names a reader should see
_MACHINE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)+|variable|value|index")

# One warning per process: a notebook that saves twenty figures without a browser should say so once.
_static_warning_issued = False


class StaticExportWarning(UserWarning):
    """Static figure files (PDF/SVG/PNG) were not written because no usable browser was found."""


class FigureStyleWarning(UserWarning):
    """A figure shows a column name (e.g. `num_tokens_in_cache`) where a reader expects words."""


def font_pt(font_px: float, width_px: float = STATIC_WIDTH_PX, column_in: float = COLUMN_WIDTH_IN) -> float:
    """Printed size in points of a font of `font_px` layout pixels when a figure `width_px` wide fills `column_in`."""
    return font_px * column_in * 72 / width_px


def build_template() -> go.layout.Template:
    """The house style: white background, fonts >= 8 pt at one column, thin grid, Okabe–Ito colours, legend below."""
    axis = dict(showgrid=True, gridcolor="#E5E5E5", gridwidth=1, zeroline=False, showline=True,
                linecolor="#444444", linewidth=1, ticks="outside", tickcolor="#444444", automargin=True,
                exponentformat="none", separatethousands=True,  # 10,000 rather than 10k or 1e4
                title=dict(standoff=8))
    template = go.layout.Template(pio.templates["simple_white"])
    template.layout.update(
        font=dict(family="Helvetica, Arial, 'Liberation Sans', sans-serif", size=FONT_PX, color="#222222"),
        # aligned with the axes, at the top of the figure (long titles wrap downwards: see `_wrap_title`)
        title=dict(font=dict(size=TITLE_FONT_PX), x=0.0, xref="paper", xanchor="left", y=0.98, yref="container",
                   yanchor="top"),
        colorway=OKABE_ITO,
        paper_bgcolor="white",
        plot_bgcolor="white",
        margin=dict(l=70, r=20, t=TITLE_MARGIN_PX, b=20),  # axes and the legend push the margins they need
        xaxis=axis,
        yaxis=axis,
        # a horizontal legend under the plot keeps the plot's full width at one column; long ones wrap
        legend=dict(orientation="h", x=0.0, xanchor="left", y=0.0, yref="container", yanchor="bottom",
                    bgcolor="rgba(255,255,255,0)", borderwidth=0, font=dict(size=FONT_PX),
                    title=dict(font=dict(size=FONT_PX))),
        hoverlabel=dict(font=dict(size=FONT_PX - 4)),
    )
    return template


def apply_template() -> str:
    """Register the "labkit" template (once) and make it plotly's default; returns its name."""
    if TEMPLATE_NAME not in pio.templates:
        pio.templates[TEMPLATE_NAME] = build_template()
    pio.templates.default = TEMPLATE_NAME
    return TEMPLATE_NAME


def figures_dir() -> Path:
    """The figures folder: `$LABKIT_FIGURES_DIR`, else `<repo>/figures`; created on demand."""
    path = Path(os.environ.get("LABKIT_FIGURES_DIR") or repo_root() / "figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def browser_path() -> str | None:
    """The Chromium that kaleido should drive: `$BROWSER_PATH`, else a system Chromium, else None."""
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]  # returned even if missing, so the warning can name it
    for candidate in BROWSER_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    for name in BROWSER_NAMES:
        if found := shutil.which(name):
            return found
    return None


def _check_name(kind: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(f"figure {kind} {value!r} is invalid: use only letters, digits, '-' and '_'")


def _write_plotlyjs(folder: Path) -> None:
    """One shared plotly.min.js per folder keeps each HTML file small and working offline."""
    from plotly.offline import get_plotlyjs

    script = get_plotlyjs().encode()
    target = folder / "plotly.min.js"
    if not target.exists() or target.read_bytes() != script:  # a stale copy from an older plotly is replaced
        write_bytes_atomic(target, script)


class _BrowserUnavailable(Exception):
    pass


async def _close_quietly(k) -> None:
    try:
        await k.close()
    except Exception:  # already dead: nothing left to clean up
        pass


def _render_static(fig_dict: dict, jobs: dict[str, tuple[str, float]], width: int, height: int,
                   browser: str) -> dict[str, bytes]:
    """Render every {key: (format, scale)} job of one figure in one browser session (starting Chromium costs ~2 s)."""
    import kaleido  # heavy and only needed for static export

    async def render() -> dict[str, bytes]:
        k = None
        try:
            # mathjax=False: the lab is offline and kaleido would fetch MathJax from a CDN
            k = kaleido.Kaleido(n=1, path=browser, mathjax=False)
            await k.open()
        except Exception as exc:
            if k is not None:
                await asyncio.shield(_close_quietly(k))  # a half-started browser must not outlive the call
            detail = str(exc.args[0]) if exc.args else ""  # choreographer packs a tuple of hints into args
            raise _BrowserUnavailable(f"the browser at {browser} failed to start "
                                      f"({type(exc).__name__}: {detail})") from exc
        try:
            return {key: await k.calc_fig(fig_dict, opts=dict(format=fmt, width=width, height=height,
                                                              scale=scale if fmt in RASTER_FORMATS else 1))
                    for key, (fmt, scale) in jobs.items()}
        finally:
            await k.close()

    # A thread with its own event loop: inside Jupyter the kernel's loop is already running.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, asyncio.wait_for(render(), EXPORT_TIMEOUT_S)).result()


def _warn_static_missing(reason: str, formats: list[str]) -> None:
    global _static_warning_issued
    if _static_warning_issued:
        return
    _static_warning_issued = True
    warnings.warn(f"labkit.lab.plots wrote HTML only: static {'/'.join(formats)} figures need Chromium, but "
                  f"{reason}. Fix: `apt-get install chromium`, or set BROWSER_PATH to a Chrome/Chromium binary. "
                  "(Shown once per process.)", StaticExportWarning, stacklevel=3)


class SavedFigure(dict):
    """{format: path} of the files `save_figure` wrote. In Jupyter it displays as the interactive figure *and* a
    PNG of it, so that nbconvert's HTML and GitHub, which cannot draw plotly's JSON, show the static image."""

    def __init__(self, paths: dict[str, Path], figure: go.Figure, width: int, height: int,
                 display_png: bytes | None = None):
        super().__init__(paths)
        self.figure, self.width, self.height, self.display_png = figure, width, height, display_png

    def _repr_pretty_(self, p, cycle) -> None:  # IPython's text/plain, for consoles and text-only exports
        title = self.figure.layout.title.text or "figure"
        p.text(f"{title.replace('<br>', ' ')}\n" + "\n".join(f"  {path}" for path in self.values()))

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = dict(pio.renderers["plotly_mimetype"].to_mimebundle(self.figure.to_dict()))
        metadata = {}
        if self.display_png is not None:
            bundle["image/png"] = base64.b64encode(self.display_png).decode()
            metadata["image/png"] = {"width": self.width, "height": self.height}  # layout size
        return bundle, metadata


def _axis_names(fig: go.Figure) -> list[str]:
    """"xaxis", "yaxis" and any subplot axes ("xaxis2", ...) the figure has."""
    extra = [key for key in fig.layout.to_plotly_json() if re.fullmatch(r"[xy]axis\d+", key)]
    return ["xaxis", "yaxis", *sorted(extra)]


def style_problems(fig: go.Figure) -> list[str]:
    """What a reader would see as machine names: column-like trace names, legend or axis titles."""
    fig = go.Figure(fig)
    seen = [("legend entry", t.name) for t in fig.data if t.name and t.showlegend is not False]
    seen.append(("legend title", fig.layout.legend.title.text))
    seen += [(f"{axis} title", fig.layout[axis].title.text) for axis in _axis_names(fig)]
    return [f"{what} {text!r}" for what, text in seen
            if isinstance(text, str) and _MACHINE_NAME_RE.fullmatch(text.strip())]


def log_ticks(low: float, high: float, max_ticks: int = 8) -> list[float]:
    """Tick values for a log axis spanning [low, high], spaced by how many decades it spans: every integer
    mantissa within one decade, 1-2-3-5, 1-2-5, 1-3, then powers of ten (every k-th one past `max_ticks`)."""
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(f"a log axis needs 0 < low <= high, got {low!r}, {high!r}")
    decades = math.log10(high / low)
    steps = [(0.5, tuple(range(1, 10))), (1.5, (1, 2, 3, 5)), (3, (1, 2, 5)), (5, (1, 3)), (math.inf, (1,))]
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    start = next(i for i, (span, _) in enumerate(steps) if decades < span)
    for _, mantissas in reversed(steps[:start + 1]):  # the set for this span; finer ones if it gives < 2 ticks
        ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in mantissas if low <= m * 10.0 ** e <= high]
        if len(ticks) >= 2:
            break
    else:
        ticks = sorted({low, high})  # no round number inside: label the ends
    if len(ticks) > max_ticks:
        ticks = ticks[::math.ceil(len(ticks) / max_ticks)]
    return ticks


def format_tick(value: float) -> str:
    """A tick label a reader parses at a glance: 0.05, 2, 500, 2,000 (no SI 'k' or 'µ')."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:g}"


def _axis_values(fig: go.Figure, axis: str) -> list[float]:
    """Finite positive numbers plotted against one axis ("xaxis", "yaxis2", ...), error bars included."""
    letter, ref = axis[0], axis[0] + axis[5:]  # "yaxis2" -> "y", "y2"
    values: list[float] = []
    for trace in fig.data:
        if (getattr(trace, f"{letter}axis", None) or letter) != ref:
            continue
        data = getattr(trace, letter, None)
        if data is None:
            continue
        data = [float(v) for v in data if isinstance(v, numbers.Real) and not isinstance(v, bool)]
        error = getattr(trace, f"error_{letter}", None)
        plus = list(error.array) if error is not None and error.array is not None else []
        minus = list(error.arrayminus) if error is not None and error.arrayminus is not None else plus
        values += data
        values += [v + e for v, e in zip(data, plus) if e is not None]
        values += [v - e for v, e in zip(data, minus) if e is not None]
    return [v for v in values if math.isfinite(v) and v > 0]


def _readable_log_axes(fig: go.Figure) -> None:
    """Give every log axis without explicit ticks plain labels: on x, at the measured points when there are few
    (a sweep over 16, 64, 256 tokens); otherwise at 1-2-5 steps (`log_ticks`)."""
    for axis in _axis_names(fig):
        layout = fig.layout[axis]
        if layout.type != "log" or layout.tickvals is not None or layout.dtick is not None:
            continue
        values = _axis_values(fig, axis)
        if not values:
            continue
        points = sorted(set(values))
        ticks = points if axis.startswith("x") and len(points) <= 8 else log_ticks(min(values), max(values))
        layout.update(tickvals=ticks, ticktext=[format_tick(v) for v in ticks])


def _wrap_title(fig: go.Figure, width: int, height: int) -> None:
    """Break a long title into lines that fit the figure (plotly clips it) and make room for them."""
    title = fig.layout.title.text
    if not title or "<br>" in title:
        return
    size = fig.layout.title.font.size or TITLE_FONT_PX
    margin = fig.layout.margin
    usable = width - (margin.l if margin.l is not None else 70) - (margin.r if margin.r is not None else 20)
    lines = textwrap.wrap(title, max(20, int(usable / (size * _CHAR_WIDTH))))
    if len(lines) < 2:
        return
    top = margin.t if margin.t is not None else TITLE_MARGIN_PX
    # plotly anchors a multi-line title at its first baseline, not its top: put that baseline one line down
    fig.update_layout(title_text="<br>".join(lines), title_y=1 - (size + 6) / height, title_yanchor="top",
                      title_yref="container", margin_t=top + (len(lines) - 1) * int(size * 1.3))


def save_figure(fig: go.Figure | dict, name: str, notebook: str | None = None,
                formats: tuple[str, ...] = ("html", "pdf", "svg", "png"), width: int = STATIC_WIDTH_PX,
                height: int = STATIC_HEIGHT_PX, scale: float = STATIC_SCALE,
                template: str | None = TEMPLATE_NAME) -> SavedFigure:
    """Write `figures/<notebook>/<name>.<ext>` for each format; returns {format: path} of the files written.

    Static sizes are in layout pixels (PNG is `scale`× that); the defaults print fonts >= 8 pt one column wide.
    `template` restyles a copy (None keeps the figure's); long titles wrap, log axes get readable ticks. The
    result, the last expression of a notebook cell, shows the figure with its PNG (see `SavedFigure`).
    """
    _check_name("name", name)
    if notebook is not None:
        _check_name("notebook", notebook)
    formats = [fmt.lower().lstrip(".") for fmt in formats]
    unknown = [fmt for fmt in formats if fmt != "html" and fmt not in STATIC_FORMATS]
    if unknown:
        raise ValueError(f"unknown figure format(s) {unknown}: choose from html, {', '.join(STATIC_FORMATS)}")

    fig = go.Figure(fig)  # a copy: restyling must not change the notebook's figure
    if template is not None:
        if template == TEMPLATE_NAME:
            apply_template()
        fig.update_layout(template=template)
    _wrap_title(fig, width, height)
    _readable_log_axes(fig)
    if problems := style_problems(fig):
        warnings.warn(f"figure {name!r} shows machine names: {', '.join(problems)}; pass human names "
                      "(labels=plots.LABELS, or rename the values)", FigureStyleWarning, stacklevel=2)
    folder = figures_dir() / notebook if notebook else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    if "html" in formats:
        _write_plotlyjs(folder)
        # div_id=name keeps the HTML byte-identical across reruns instead of a random id each time
        html = fig.to_html(include_plotlyjs="directory", full_html=True, div_id=name,
                           config={"displaylogo": False})
        written["html"] = folder / f"{name}.html"
        write_bytes_atomic(written["html"], html.encode())

    static = [fmt for fmt in formats if fmt != "html"]
    browser = browser_path() if static else None
    images: dict[str, bytes] = {}
    if not static:
        pass
    elif browser is None:
        _warn_static_missing(f"none was found (looked at {', '.join(BROWSER_CANDIDATES)} and PATH)", static)
    elif not os.access(browser, os.X_OK):
        _warn_static_missing(f"BROWSER_PATH={browser} is not an executable file", static)
    else:
        try:
            jobs = {fmt: (fmt, scale) for fmt in static}
            if "png" in static:  # a lighter PNG for the notebook to show: it is stored in every executed copy
                jobs[_DISPLAY_PNG] = ("png", DISPLAY_SCALE)
            images = _render_static(fig.to_dict(), jobs, width, height, browser)
        except _BrowserUnavailable as exc:
            _warn_static_missing(str(exc), static)
        else:
            for fmt in static:
                written[fmt] = folder / f"{name}.{fmt}"
                write_bytes_atomic(written[fmt], images[fmt])
    fig.update_layout(width=width, height=height)  # the notebook's interactive view matches the static image
    return SavedFigure(written, fig, width, height, display_png=images.get(_DISPLAY_PNG))


# -- statistics for figures: error bars, tails, and claims chosen by the numbers --------------------------------
def tail_percentile(num_samples: int, candidates: Sequence[float] = (99, 90)) -> float | None:
    """The highest candidate percentile that `num_samples` samples can estimate, or None if none.

    A q-th percentile needs at least one sample above it, n * (1 - q/100) >= 1: p99 needs 100 samples, p90 ten;
    below that the "p99" of linear interpolation is a point between the two largest samples, not a tail.
    """
    fits = [q for q in candidates if num_samples * (100 - q) >= 100 - 1e-9]
    return max(fits) if fits else None


def summarize_samples(samples, by: str | Sequence[str], values: str | Sequence[str],
                      tail_candidates: Sequence[float] = (99, 90)):
    """One row per group of `by`: for each column in `values`, its median, the median's interval
    (`labkit.lab.stats.median_ci`: `<v>_ci_low/high`, as a tuple `<v>_ci`, its exact coverage `<v>_ci_coverage`
    and method `<v>_ci_method`, min-max below 6 samples), the error-bar lengths plotly takes
    (`<v>_error_plus/minus`; `error_bar_note` says what they are) and the tail (`<v>_tail`) at `tail_percentile`
    of the group's count (NaN when too few).

    `samples` is a pandas DataFrame with one row per measurement; the medians keep the value's column name, so
    the same `labels=` apply.
    """
    import pandas as pd

    from labkit.lab.stats import median_ci, percentile

    by = [by] if isinstance(by, str) else list(by)
    values = [values] if isinstance(values, str) else list(values)
    rows = []
    for key, group in samples.groupby(by, sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for value in values:
            data = [float(v) for v in group[value] if v is not None and not pd.isna(v)]
            if not data:
                continue
            median = statistics.median(data)
            ci = median_ci(data)
            low, high = ci
            q = tail_percentile(len(data), tail_candidates)
            row.update({value: median, f"{value}_ci": (low, high), f"{value}_ci_low": low, f"{value}_ci_high": high,
                        f"{value}_ci_coverage": ci.coverage, f"{value}_ci_method": ci.method,
                        f"{value}_error_plus": high - median,
                        f"{value}_error_minus": median - low, f"{value}_num_samples": len(data),
                        f"{value}_tail_percentile": q, f"{value}_tail": percentile(data, q) if q else math.nan})
        rows.append(row)
    return pd.DataFrame(rows)


def error_bar_note(table, value: str) -> str:
    """What a `summarize_samples` table's error bars on `value` show, for a legend or caption: e.g. "bars: min-max
    of 3 runs (75 % coverage of the median)", or a range of coverages where the groups' counts differ."""
    from labkit.lab.stats import format_coverage

    counts, coverages = table[f"{value}_num_samples"], table[f"{value}_ci_coverage"]
    methods = set(table[f"{value}_ci_method"])
    what = "min-max" if methods == {"min-max"} else "order-statistic interval of the median" \
        if methods == {"order statistics"} else "min-max or order-statistic interval"
    runs = f"{counts.min():.0f}" if counts.min() == counts.max() else f"{counts.min():.0f}-{counts.max():.0f}"
    cover = format_coverage(coverages.min()) if coverages.min() == coverages.max() else \
        f"{format_coverage(coverages.min())[:-2]}-{format_coverage(coverages.max())}"
    return f"bars: {what} of {runs} runs ({cover} coverage of the median)"


def trend(before: Sequence[float], after: Sequence[float]) -> int:
    """+1 if the interval `after` (low, high) lies wholly above `before`, -1 wholly below, 0 if they overlap.

    Choose a figure's or a takeaway's verb with it, so that "grows" is only written over data that grows.
    """
    (before_low, before_high), (after_low, after_high) = sorted(before), sorted(after)
    if after_low > before_high:
        return 1
    if after_high < before_low:
        return -1
    return 0


# -- notebooks as documents -------------------------------------------------------------------------------------
def export_notebook_html(notebook: str | Path, output_dir: str | Path) -> Path:
    """Write an executed notebook as a self-contained HTML page (nbconvert's "lab" template); returns its path.

    Figures saved with `save_figure` carry their PNG, which the page embeds; plotly's JSON alone would be blank.
    """
    import nbformat
    from nbconvert import HTMLExporter

    notebook, output_dir = Path(notebook), Path(output_dir)
    nb = nbformat.read(notebook, as_version=4)
    html, _ = HTMLExporter(template_name="lab").from_notebook_node(nb, resources={"metadata": {
        "name": notebook.stem}})
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{notebook.stem}.html"
    write_bytes_atomic(target, html.encode())
    return target


def publish_notebooks(notebooks: Iterable[str | Path], output_dir: str | Path | None = None) -> list[Path]:
    """Publish executed notebooks (e.g. `runs/<timestamp>/*.ipynb` from `labkit run`) to `docs/notebooks/`: each
    as HTML for a browser and as the executed .ipynb, which GitHub renders with its figures' PNGs."""
    output_dir = Path(output_dir) if output_dir is not None else repo_root() / "docs" / "notebooks"
    written = []
    for notebook in map(Path, notebooks):
        written.append(export_notebook_html(notebook, output_dir))
        target = output_dir / notebook.name
        if notebook.resolve() != target.resolve():
            write_bytes_atomic(target, notebook.read_bytes())
        written.append(target)
    return written
