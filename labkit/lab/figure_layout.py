"""Layout fixes `plots.save_figure` applies to the copy it exports: readable log axes that say they are log,
wrapped titles clear of subplot titles, a caption under the plot, and the checks that refuse or flag what a reader
would misread (column names, bars on a log axis, a series drawn exactly under another)."""

from __future__ import annotations

import math
import numbers
import re
import textwrap

import plotly.graph_objects as go

FONT_PX, TITLE_FONT_PX = 20, 22
TITLE_MARGIN_PX = 50  # the top margin for a one-line title; each further line adds 1.25 lines
CAPTION_FONT_PX = FONT_PX  # 8.4 pt one column wide, the smallest size the template prints
LINE_HEIGHT = 1.3  # plotly's line spacing for multi-line text, in ems
_CHAR_WIDTH = 0.55  # average glyph width of Helvetica/Arial in ems, to wrap titles before they are clipped
# px's defaults and anything shaped like a column name (snake_case) are not names a reader should see
_MACHINE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)+|variable|value|index")
_LOG_SCALE = "log scale"


def axis_names(fig: go.Figure) -> list[str]:
    """"xaxis", "yaxis" and any subplot axes ("xaxis2", ...) the figure has."""
    extra = [key for key in fig.layout.to_plotly_json() if re.fullmatch(r"[xy]axis\d+", key)]
    return ["xaxis", "yaxis", *sorted(extra)]


def style_problems(fig: go.Figure) -> list[str]:
    """What a reader would see as machine names: column-like trace names, legend or axis titles."""
    fig = go.Figure(fig)
    seen = [("legend entry", t.name) for t in fig.data if t.name and t.showlegend is not False]
    seen.append(("legend title", fig.layout.legend.title.text))
    seen += [(f"{axis} title", fig.layout[axis].title.text) for axis in axis_names(fig)]
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


def readable_log_axes(fig: go.Figure) -> None:
    """Give every log axis without explicit ticks plain labels: on x, at the measured points when there are few
    (a sweep over 16, 64, 256 tokens); otherwise at 1-2-5 steps (`log_ticks`)."""
    for axis in axis_names(fig):
        layout = fig.layout[axis]
        if layout.type != "log" or layout.tickvals is not None or layout.dtick is not None:
            continue
        values = _axis_values(fig, axis)
        if not values:
            continue
        points = sorted(set(values))
        ticks = points if axis.startswith("x") and len(points) <= 8 else log_ticks(min(values), max(values))
        layout.update(tickvals=ticks, ticktext=[format_tick(v) for v in ticks])


def wrap_title(fig: go.Figure, width: int, height: int) -> None:
    """Break a long title into lines that fit the figure (plotly clips it) and make room for them."""
    title = fig.layout.title.text
    if not title or "<br>" in title:
        return
    size = fig.layout.title.font.size or TITLE_FONT_PX
    margin = fig.layout.margin
    usable = width - (margin.l if margin.l is not None else 70) - (margin.r if margin.r is not None else 20)
    lines = wrap_lines(title, usable, size)
    if len(lines) < 2:
        return
    top = margin.t if margin.t is not None else TITLE_MARGIN_PX
    # plotly anchors a multi-line title at its first baseline, not its top: put that baseline one line down
    fig.update_layout(title_text="<br>".join(lines), title_y=1 - (size + 6) / height, title_yanchor="top",
                      title_yref="container", margin_t=top + (len(lines) - 1) * int(size * 1.3))


def label_log_axes(fig: go.Figure) -> None:
    """Say "log scale" in the title of every titled log axis: "latency (µs)" -> "latency (µs, log scale)"."""
    for axis in axis_names(fig):
        layout = fig.layout[axis]
        title = layout.title.text
        if layout.type != "log" or not title or "log" in title.lower():
            continue
        layout.title.text = f"{title[:-1]}, {_LOG_SCALE})" if title.endswith(")") else f"{title} ({_LOG_SCALE})"


def wrap_axis_titles(fig: go.Figure, width: int, height: int) -> None:
    """Break a y-axis title into two lines when it would run past the figure's top: plotly centres it on the plot
    and clips it at the edge instead of wrapping it."""
    margin = fig.layout.margin
    top = margin.t if margin.t is not None else TITLE_MARGIN_PX
    usable = width - (margin.l if margin.l is not None else 70) - (margin.r if margin.r is not None else 20)
    room_px = 2 * top + (height - top - sum(_below_plot_px(fig, usable))) - 10  # twice the plot centre's distance to the top
    for axis in axis_names(fig):
        title = fig.layout[axis].title.text
        if not axis.startswith("y") or not title or "<br>" in title or len(title) * FONT_PX * 0.58 <= room_px:
            continue
        spaces = [i for i, c in enumerate(title) if c == " "]
        if spaces:
            cut = min(spaces, key=lambda i: abs(i - len(title) / 2))  # the space nearest the middle
            fig.layout[axis].title.text = f"{title[:cut]}<br>{title[cut + 1:]}"


def unclip_point_labels(fig: go.Figure) -> None:
    """Let the text written beside markers (a scheme's name, a request rate) run past the plot's edge."""
    for trace in fig.data:
        if trace.type == "scatter" and trace.mode and "text" in trace.mode and trace.cliponaxis is None:
            trace.cliponaxis = False


def bars_on_log_axes(fig: go.Figure) -> list[str]:
    """The names of bar traces drawn against a log axis, whose lengths would start at an arbitrary floor."""
    found = []
    for index, trace in enumerate(fig.data):
        if trace.type != "bar":
            continue
        value_axis = "x" if trace.orientation == "h" else "y"
        ref = getattr(trace, f"{value_axis}axis", None) or value_axis  # "y", "y2", ...
        if fig.layout[f"{value_axis}axis{ref[1:]}"].type == "log":
            found.append(trace.name or f"trace {index}")
    return found


def _points(trace) -> tuple | None:
    xs, ys = getattr(trace, "x", None), getattr(trace, "y", None)
    if xs is None or ys is None or len(xs) == 0:
        return None
    return (getattr(trace, "xaxis", None), getattr(trace, "yaxis", None), tuple(xs), tuple(ys))


def hidden_series(fig: go.Figure) -> list[str]:
    """One sentence per group of named line or marker series drawn exactly under a later one, e.g. "ngram and
    draft are drawn exactly under eagle (in 1 of 2 panels)." A series is matched panel by panel (facets repeat
    a name with the legend entry shown once)."""
    drawn = [(trace.name, _points(trace)) for trace in fig.data
             if trace.type in ("scatter", "scattergl") and trace.name and trace.visible is not False]
    panels: dict[str, int] = {}
    covered: dict[str, dict[str, int]] = {}  # hidden name -> {covering name: panels}
    for i, (name, points) in enumerate(drawn):
        panels[name] = panels.get(name, 0) + 1
        covers = [other for other, other_points in drawn[i + 1:] if points and other_points == points]
        if covers and covers[-1] != name:
            counts = covered.setdefault(name, {})
            counts[covers[-1]] = counts.get(covers[-1], 0) + 1  # the last one drawn is the one seen
    groups: dict[str, list[str]] = {}
    for name, counts in covered.items():
        cover = " and ".join(counts)
        hidden_in = sum(counts.values())
        where = "" if hidden_in == panels[name] else f" (in {hidden_in} of {panels[name]} panels)"
        groups.setdefault(f"{cover}{where}", []).append(str(name))
    return [f"{_and(names)} {'is' if len(names) == 1 else 'are'} drawn exactly under {cover}."
            for cover, names in groups.items()]


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _below_plot_px(fig: go.Figure, usable_px: float) -> tuple[float, float]:
    """Heights under the plot: the x axis (tick labels, then its title if any), then the legend's rows."""
    line_px = FONT_PX * LINE_HEIGHT
    has_x_title = any(fig.layout[axis].title.text for axis in axis_names(fig) if axis.startswith("x"))
    return line_px + 12 + (line_px + 8 if has_x_title else 0), _legend_rows(fig, usable_px) * (line_px + 13) + 6  # rows are ~39 px apart


def wrap_lines(text: str, width_px: float, font_px: float, char_width: float = _CHAR_WIDTH) -> list[str]:
    """`text` broken into lines that fit `width_px` at `font_px` (plotly clips text instead of wrapping it)."""
    return textwrap.wrap(text, max(20, int(width_px / (font_px * char_width))))


def room_for_subplot_titles(fig: go.Figure) -> None:
    """Push the plot down by a line when subplot or facet titles sit above it, so the title cannot cover them."""
    above = [a for a in fig.layout.annotations if a.yref == "paper" and a.y is not None and a.y >= 1]
    if above and fig.layout.title.text:
        top = fig.layout.margin.t if fig.layout.margin.t is not None else TITLE_MARGIN_PX
        fig.update_layout(margin_t=top + int(FONT_PX * LINE_HEIGHT))


def _legend_rows(fig: go.Figure, usable_px: float) -> int:
    """Rows a horizontal legend takes: entries are a 40 px symbol plus their text, wrapped at the plot's width."""
    names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    if fig.layout.showlegend is False or len(names) < 2:
        return 0
    title = fig.layout.legend.title.text or ""
    rows, used = 1, len(title) * FONT_PX * _CHAR_WIDTH
    for name in dict.fromkeys(names):
        entry = 40 + len(re.sub(r"<[^>]+>", "", str(name))) * FONT_PX * _CHAR_WIDTH
        if used and used + entry > usable_px:
            rows, used = rows + 1, 0
        used += entry
    return rows


def add_caption(fig: go.Figure, caption: str, width: int, height: int) -> int:
    """Write `caption` under the plot, left-aligned, below the x axis and the legend, and return the figure's new
    height: the plot keeps its size and the caption's lines add to it. Annotations cannot be placed in the
    figure's own coordinates, so the axis, legend and caption are stacked by their line heights below the plot."""
    margin = fig.layout.margin
    usable = width - (margin.l if margin.l is not None else 70) - (margin.r if margin.r is not None else 20)
    lines = wrap_lines(caption, usable, CAPTION_FONT_PX, char_width=0.52)  # running text: fewer capitals
    axis_px, legend_px = _below_plot_px(fig, usable)
    caption_px = len(lines) * CAPTION_FONT_PX * LINE_HEIGHT + 8
    total = int(height + caption_px)
    top = margin.t if margin.t is not None else TITLE_MARGIN_PX
    bottom = int(axis_px + legend_px + caption_px + 10)
    plot_px = total - top - bottom
    fig.add_annotation(text="<br>".join(lines), xref="paper", x=0, xanchor="left", yref="paper",
                       y=-(axis_px + legend_px) / plot_px, yanchor="top", align="left", showarrow=False,
                       font=dict(size=CAPTION_FONT_PX, color="#222222"), name="caption")
    fig.update_layout(legend_y=-axis_px / plot_px, legend_yref="paper", legend_yanchor="top", margin_t=top,
                      margin_b=bottom)
    return total
