"""Figures: the paper-ready "labkit" plotly template, `save_figure` (HTML plus PDF/SVG/PNG with a short title and
the finding as a caption, always shown in a notebook with its PNG so exported notebooks draw it), and statistics
for error bars and tails. Publishing executed notebooks is `labkit.lab.publish`."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import shutil
import statistics
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from labkit.device import repo_root
from labkit.lab import figure_layout as layout
from labkit.lab.figure_layout import FONT_PX, TITLE_FONT_PX, TITLE_MARGIN_PX, format_tick, log_ticks, style_problems
from labkit.lab.results import write_bytes_atomic

TEMPLATE_NAME = "labkit"
# Okabe & Ito 2008, "Color Universal Design"; yellow last because it is faint on white
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
STATIC_FORMATS = ("pdf", "svg", "png", "jpg", "webp")
RASTER_FORMATS = ("png", "jpg", "webp")  # `scale` multiplies pixels only for these; vector output keeps its size
BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
PLOTLYJS = "plotly.min.js"  # at the top of the figures folder, shared by every notebook's HTML figures
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
        # aligned with the axes, at the top of the figure (long titles wrap downwards: see `figure_layout.wrap_title`)
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
        # simple_white draws shapes with a line width of 0: every add_hline (a baseline, a policy) was invisible
        shapedefaults=dict(line=dict(color="#444444", width=1.5), fillcolor="rgba(68, 68, 68, 0.15)", opacity=1),
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


def _write_plotlyjs(folder: Path) -> Path:
    """One plotly.min.js for the whole figures folder (4.8 MB: one copy per notebook was most of the folder) keeps
    each HTML file small and working offline; returns its path."""
    from plotly.offline import get_plotlyjs

    script = get_plotlyjs().encode()
    target = folder / PLOTLYJS
    if not target.exists() or target.read_bytes() != script:  # a stale copy from an older plotly is replaced
        write_bytes_atomic(target, script)
    return target


def _pdf_string(text: str) -> bytes:
    """A PDF text string for any text: UTF-16BE with its byte-order mark, written in hex (PDF 1.7, 7.9.2.2)."""
    return b"<FEFF" + text.encode("utf-16-be").hex().upper().encode() + b">"


def set_pdf_title(pdf: bytes, title: str) -> bytes:
    """`pdf` with its document title set to `title` (Chromium writes "Kaleido-fier"), by an incremental update: a
    new Info object, an xref section for it and a trailer pointing back to the old one, appended (PDF 1.7, 7.5.6)."""
    trailers = list(re.finditer(rb"trailer\s*<<(.*?)>>\s*startxref\s*(\d+)", pdf, re.S))
    if not trailers:
        raise ValueError("not a PDF with a classic trailer: cannot set its title")
    trailer, previous = trailers[-1].group(1), int(trailers[-1].group(2))
    size = int(re.search(rb"/Size\s+(\d+)", trailer).group(1))
    root = re.search(rb"/Root\s+(\d+\s+\d+\s+R)", trailer).group(1)
    body = pdf if pdf.endswith(b"\n") else pdf + b"\n"
    info_at = len(body)
    info = b"%d 0 obj\n<</Title %s /Producer (labkit, plotly, Chromium)>>\nendobj\n" % (size, _pdf_string(title))
    xref_at = info_at + len(info)
    xref = b"xref\n%d 1\n%010d 00000 n \n" % (size, info_at)
    tail = b"trailer\n<</Size %d /Root %s /Info %d 0 R /Prev %d>>\nstartxref\n%d\n%%%%EOF\n" % (
        size + 1, root, size, previous, xref_at)
    return body + info + xref + tail


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


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (papermill and nbval included), where a saved figure is displayed."""
    import sys

    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    return getattr(shell, "kernel", None) is not None


class SavedFigure(dict):
    """{format: path} of the files `save_figure` wrote. In Jupyter it displays, once, as the interactive figure
    *and* a PNG of it, so that nbconvert's HTML and GitHub, which cannot draw plotly's JSON, show the static image;
    `save_figure` displays it itself, so a later `display(saved)` or a cell ending with it adds nothing."""

    def __init__(self, paths: dict[str, Path], figure: go.Figure, width: int, height: int,
                 display_png: bytes | None = None):
        super().__init__(paths)
        self.figure, self.width, self.height, self.display_png = figure, width, height, display_png
        self.is_displayed = False

    def text(self) -> str:
        """The title, the caption and the files written, as plain text for consoles and text-only exports."""
        title = (self.figure.layout.title.text or "figure").replace("<br>", " ")
        captions = [a.text.replace("<br>", " ") for a in self.figure.layout.annotations if a.name == "caption"]
        return "\n".join([title, *captions, *(f"  {path}" for path in self.values())])

    def _ipython_display_(self) -> None:
        if self.is_displayed:
            return
        self.is_displayed = True
        from IPython.display import display

        bundle, metadata = self._repr_mimebundle_()
        display({**bundle, "text/plain": self.text()}, metadata=metadata, raw=True)

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = dict(pio.renderers["plotly_mimetype"].to_mimebundle(self.figure.to_dict()))
        metadata = {}
        if self.display_png is not None:
            bundle["image/png"] = base64.b64encode(self.display_png).decode()
            metadata["image/png"] = {"width": self.width, "height": self.height}  # layout size
        return bundle, metadata


MAX_TITLE_CHARS = 60  # a title names the figure; the finding goes in the caption under it


def _title_text(fig: go.Figure) -> str:
    return re.sub(r"<[^>]+>", " ", fig.layout.title.text or "").replace("  ", " ").strip()


def _prepare(fig: go.Figure | dict, name: str, width: int, height: int, template: str | None,
             caption: str | None) -> tuple[go.Figure, int]:
    """The copy `save_figure` exports, restyled and checked, with its caption; returns it and its height."""
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"figure {name!r}: caption must be a string, got {caption!r}")
    fig = go.Figure(fig)  # a copy: restyling must not change the notebook's figure
    if template is not None:
        if template == TEMPLATE_NAME:
            apply_template()
        fig.update_layout(template=template)
    if bars := layout.bars_on_log_axes(fig):
        raise ValueError(f"figure {name!r} draws bars ({', '.join(map(str, bars))}) on a log axis, where a bar's "
                         "length means nothing: use markers (a dot plot) or a linear axis")
    layout.wrap_title(fig, width, height)
    layout.room_for_subplot_titles(fig)
    layout.readable_log_axes(fig)
    layout.label_log_axes(fig)
    layout.wrap_axis_titles(fig, width, height)
    layout.unclip_point_labels(fig)
    problems = style_problems(fig)
    if len(title := _title_text(fig)) > MAX_TITLE_CHARS:
        problems.append(f"a title of {len(title)} characters (at most {MAX_TITLE_CHARS}: move the finding to "
                        "caption=)")
    if problems:
        warnings.warn(f"figure {name!r} shows {', '.join(problems)}; pass human names (labels=plots.LABELS, or "
                      "rename the values) and a short title", FigureStyleWarning, stacklevel=3)
    notes = layout.hidden_series(fig)
    parts = ([caption.strip()] if caption and caption.strip() else []) + notes
    if parts:
        height = layout.add_caption(fig, " ".join(parts), width, height)
    return fig, height


def _export_static(fig: go.Figure, formats: list[str], width: int, height: int, scale: float) -> dict[str, bytes]:
    """{format: bytes} of the static files (and the notebook's lighter PNG); {} without a working browser."""
    static = [fmt for fmt in formats if fmt != "html"]
    browser = browser_path() if static else None
    if not static:
        return {}
    if browser is None:
        _warn_static_missing(f"none was found (looked at {', '.join(BROWSER_CANDIDATES)} and PATH)", static)
        return {}
    if not os.access(browser, os.X_OK):
        _warn_static_missing(f"BROWSER_PATH={browser} is not an executable file", static)
        return {}
    jobs = {fmt: (fmt, scale) for fmt in static}
    if "png" in static:  # a lighter PNG for the notebook to show: it is stored in every executed copy
        jobs[_DISPLAY_PNG] = ("png", DISPLAY_SCALE)
    try:
        images = _render_static(fig.to_dict(), jobs, width, height, browser)
    except _BrowserUnavailable as exc:
        _warn_static_missing(str(exc), static)
        return {}
    if "pdf" in images:  # the document title a PDF viewer and a reference manager show
        images["pdf"] = set_pdf_title(images["pdf"], _title_text(fig) or "figure")
    return images


def save_figure(fig: go.Figure | dict, name: str, notebook: str | None = None,
                formats: tuple[str, ...] = ("html", "pdf", "svg", "png"), width: int = STATIC_WIDTH_PX,
                height: int = STATIC_HEIGHT_PX, scale: float = STATIC_SCALE,
                template: str | None = TEMPLATE_NAME, caption: str | None = None) -> SavedFigure:
    """Write `figures/<notebook>/<name>.<ext>` for each format, display the figure in a notebook, and return
    {format: path} of the files written.

    Keep the title short and pass the finding as `caption`, drawn under the plot in every format (and a note for
    any series drawn exactly under another). Every format has the same layout: sizes are in layout pixels, PNG
    is `scale`× that, and the defaults print fonts >= 8 pt one column wide. `template` restyles a copy (None keeps
    the figure's); long titles wrap, log axes get readable ticks and say "log scale"; bars on a log axis are
    refused. In a Jupyter kernel the figure is displayed here, with its PNG (see `SavedFigure`), once.
    """
    _check_name("name", name)
    if notebook is not None:
        _check_name("notebook", notebook)
    formats = [fmt.lower().lstrip(".") for fmt in formats]
    unknown = [fmt for fmt in formats if fmt != "html" and fmt not in STATIC_FORMATS]
    if unknown:
        raise ValueError(f"unknown figure format(s) {unknown}: choose from html, {', '.join(STATIC_FORMATS)}")
    fig, height = _prepare(fig, name, width, height, template, caption)
    folder = figures_dir() / notebook if notebook else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if "html" in formats:
        script = _write_plotlyjs(figures_dir())
        # div_id=name keeps the HTML byte-identical across reruns instead of a random id each time
        html = fig.to_html(include_plotlyjs=os.path.relpath(script, folder), full_html=True, div_id=name,
                           config={"displaylogo": False})
        written["html"] = folder / f"{name}.html"
        write_bytes_atomic(written["html"], html.encode())
    images = _export_static(fig, formats, width, height, scale)
    for fmt in formats:
        if fmt in images:
            written[fmt] = folder / f"{name}.{fmt}"
            write_bytes_atomic(written[fmt], images[fmt])
    fig.update_layout(width=width, height=height)  # the notebook's interactive view matches the static image
    saved = SavedFigure(written, fig, width, height, display_png=images.get(_DISPLAY_PNG))
    if _in_kernel():
        saved._ipython_display_()
    return saved


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


# the layout helpers' public names stay here too, where the notebooks and tests have always found them
__all__ = ["BROWSER_CANDIDATES", "BROWSER_NAMES", "COLUMN_WIDTH_IN", "DISPLAY_SCALE", "EXPORT_TIMEOUT_S", "FONT_PX",
           "FigureStyleWarning", "LABELS", "MAX_TITLE_CHARS", "MIN_FONT_PT", "OKABE_ITO", "PLOTLYJS",
           "RASTER_FORMATS", "STATIC_FORMATS", "STATIC_HEIGHT_PX", "STATIC_SCALE", "STATIC_WIDTH_PX", "SavedFigure",
           "StaticExportWarning", "TEMPLATE_NAME", "TITLE_FONT_PX", "TITLE_MARGIN_PX", "apply_template",
           "browser_path", "build_template", "figures_dir", "font_pt", "format_tick", "log_ticks", "save_figure",
           "set_pdf_title", "style_problems", "summarize_samples", "tail_percentile", "trend"]
