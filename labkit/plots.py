"""Figures: the paper-ready "labkit" plotly template and `save_figure`, which writes HTML plus PDF/SVG/PNG."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from labkit.results import write_bytes_atomic

TEMPLATE_NAME = "labkit"
# Okabe & Ito 2008, "Color Universal Design"; yellow last because it is faint on white
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
STATIC_FORMATS = ("pdf", "svg", "png", "jpg", "webp")
RASTER_FORMATS = ("png", "jpg", "webp")  # `scale` multiplies pixels only for these; vector output keeps its size
BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
EXPORT_TIMEOUT_S = 180  # browser start plus every format of one figure; a hung browser must not hang a notebook
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")

# One warning per process: a notebook that saves twenty figures without a browser should say so once.
_static_warning_issued = False


class StaticExportWarning(UserWarning):
    """Static figure files (PDF/SVG/PNG) were not written because no usable browser was found."""


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def build_template() -> go.layout.Template:
    """The house style: white background, 14 px fonts, thin grid, Okabe–Ito colours, compact margins."""
    axis = dict(showgrid=True, gridcolor="#E5E5E5", gridwidth=1, zeroline=False, showline=True,
                linecolor="#444444", linewidth=1, ticks="outside", tickcolor="#444444", automargin=True,
                title=dict(standoff=10))
    template = go.layout.Template(pio.templates["simple_white"])
    template.layout.update(
        font=dict(family="Helvetica, Arial, 'Liberation Sans', sans-serif", size=14, color="#222222"),
        title=dict(font=dict(size=16), x=0.0, xref="paper", xanchor="left"),  # aligned with the axes
        colorway=OKABE_ITO,
        paper_bgcolor="white",
        plot_bgcolor="white",
        margin=dict(l=60, r=20, t=50, b=50),
        xaxis=axis,
        yaxis=axis,
        legend=dict(bgcolor="rgba(255,255,255,0.8)", borderwidth=0, font=dict(size=13)),
        hoverlabel=dict(font=dict(size=13)),
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
    path = Path(os.environ.get("LABKIT_FIGURES_DIR") or _repo_root() / "figures")
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


def _render_static(fig_dict: dict, formats: list[str], width: int, height: int, scale: float,
                   browser: str) -> dict[str, bytes]:
    """Render every format of one figure in one browser session (starting Chromium costs ~2 s)."""
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
            return {fmt: await k.calc_fig(fig_dict, opts=dict(format=fmt, width=width, height=height,
                                                              scale=scale if fmt in RASTER_FORMATS else 1))
                    for fmt in formats}
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
    warnings.warn(f"labkit.plots wrote HTML only: static {'/'.join(formats)} figures need Chromium, but "
                  f"{reason}. Fix: `apt-get install chromium`, or set BROWSER_PATH to a Chrome/Chromium binary. "
                  "(Shown once per process.)", StaticExportWarning, stacklevel=3)


def save_figure(fig: go.Figure | dict, name: str, notebook: str | None = None,
                formats: tuple[str, ...] = ("html", "pdf", "svg", "png"), width: int = 800, height: int = 500,
                scale: float = 2, template: str | None = TEMPLATE_NAME) -> dict[str, Path]:
    """Write `figures/<notebook>/<name>.<ext>` for each format; returns {format: path} of files written.

    Static sizes are in layout pixels (PNG is `scale`× that); `template` restyles a copy (None keeps the figure's).
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
    if not static:
        return written
    browser = browser_path()
    if browser is None:
        _warn_static_missing(f"none was found (looked at {', '.join(BROWSER_CANDIDATES)} and PATH)", static)
        return written
    if not os.access(browser, os.X_OK):
        _warn_static_missing(f"BROWSER_PATH={browser} is not an executable file", static)
        return written
    try:
        images = _render_static(fig.to_dict(), static, width, height, scale, browser)
    except _BrowserUnavailable as exc:
        _warn_static_missing(str(exc), static)
        return written
    for fmt in static:
        written[fmt] = folder / f"{name}.{fmt}"
        write_bytes_atomic(written[fmt], images[fmt])
    return written
