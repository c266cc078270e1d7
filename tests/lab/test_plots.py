"""Figures: the template, HTML export, static export through kaleido, the no-browser fallback, what a notebook
displays, readable axes and names, the statistics behind error bars and tails, and notebook export to HTML."""

import base64
import math
import os
import warnings

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from labkit.lab import stats as bench

from labkit.lab import plots

MAGIC = {"pdf": (b"%PDF",), "svg": (b"<svg", b"<?xml"), "png": (b"\x89PNG",)}


@pytest.fixture(autouse=True)
def figures_dir(tmp_path, monkeypatch):
    path = tmp_path / "figures"
    monkeypatch.setenv("LABKIT_FIGURES_DIR", str(path))
    monkeypatch.setattr(plots, "_static_warning_issued", False)
    monkeypatch.setattr(pio.templates, "default", pio.templates.default)  # restored after each test
    return path


@pytest.fixture
def no_browser(monkeypatch):
    """Hide every system browser: no candidates, nothing on PATH."""
    monkeypatch.setattr(plots, "BROWSER_CANDIDATES", ())
    monkeypatch.setenv("PATH", "")


def _figure():
    return go.Figure(go.Scatter(x=[1, 2, 3], y=[3.0, 1.0, 2.0], name="decode"))


def test_apply_template_registers_and_sets_default():
    assert plots.apply_template() == "labkit"
    assert pio.templates.default == "labkit"
    layout = pio.templates["labkit"].layout
    assert layout.colorway == plots.OKABE_ITO
    assert layout.font.size == plots.FONT_PX
    assert layout.plot_bgcolor == "white"
    assert layout.yaxis.exponentformat == "none" and layout.yaxis.separatethousands  # 10,000, not 10k


def test_template_fonts_print_at_least_8_pt_one_column_wide():
    layout = plots.build_template().layout
    sizes = {"font": layout.font.size, "title": layout.title.font.size, "legend": layout.legend.font.size,
             "legend title": layout.legend.title.font.size}
    assert all(sizes.values())
    for what, size in sizes.items():  # at the width save_figure exports by default
        assert plots.font_pt(size) >= plots.MIN_FONT_PT, (what, size, plots.font_pt(size))
    assert plots.font_pt(14, width_px=800) < 8  # the old 14 px at 800 px printed at 4.4 pt
    assert plots.font_pt(20, width_px=600, column_in=3.5) == pytest.approx(8.4)


def test_save_figure_writes_html_with_shared_plotlyjs(figures_dir, no_browser):
    fig = _figure()
    written = plots.save_figure(fig, "decode-latency_1", notebook="01_baseline", formats=("html",))
    html = figures_dir / "01_baseline" / "decode-latency_1.html"
    assert written == {"html": html}
    text = html.read_text()
    assert 'src="../plotly.min.js"' in text and len(text) < 100_000  # small: plotly.js is shared, not inlined
    assert (figures_dir / "plotly.min.js").stat().st_size > 1_000_000  # one copy for every notebook's figures
    assert not (figures_dir / "01_baseline" / "plotly.min.js").exists()
    plots.save_figure(fig, "other", notebook="05_batching", formats=("html",))
    assert sorted(p.name for p in figures_dir.rglob("plotly.min.js")) == ["plotly.min.js"]
    assert fig.layout.template.layout.colorway != plots.OKABE_ITO  # the caller's figure is not restyled
    plots.save_figure(fig, "decode-latency_1", notebook="01_baseline", formats=("html",))
    assert html.read_text() == text  # reruns give identical files


@pytest.mark.parametrize("name", ["", "a b", "../x", "fig.png", "ü"])
def test_bad_names_raise(name):
    with pytest.raises(ValueError, match="invalid"):
        plots.save_figure(_figure(), name)
    with pytest.raises(ValueError, match="invalid"):
        plots.save_figure(_figure(), "ok", notebook=name or "a/b")


def test_unknown_format_raises():
    with pytest.raises(ValueError, match="tiff"):
        plots.save_figure(_figure(), "fig", formats=("html", "tiff"))


def test_missing_browser_writes_html_only_and_warns_once(figures_dir, tmp_path, monkeypatch, no_browser):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = plots.save_figure(_figure(), "a")
        second = plots.save_figure(_figure(), "b")
    assert first == {"html": figures_dir / "a.html"} and second == {"html": figures_dir / "b.html"}
    assert [w.category for w in caught] == [plots.StaticExportWarning]
    message = str(caught[0].message)
    assert "no-such-chromium" in message and "apt-get install chromium" in message
    assert sorted(p.name for p in figures_dir.iterdir()) == ["a.html", "b.html", "plotly.min.js"]


def test_no_browser_anywhere_is_explained(monkeypatch, no_browser):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    assert plots.browser_path() is None
    with pytest.warns(plots.StaticExportWarning, match="none was found"):
        assert set(plots.save_figure(_figure(), "a")) == {"html"}


def test_browser_that_fails_to_start_falls_back_to_html(monkeypatch, tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("BROWSER_PATH", str(fake))
    with pytest.warns(plots.StaticExportWarning, match="failed to start"):
        assert set(plots.save_figure(_figure(), "a", formats=("html", "png"))) == {"html"}


def test_static_export_writes_every_format(figures_dir):
    browser = plots.browser_path()
    if browser is None or not os.access(browser, os.X_OK):
        pytest.skip("no Chromium for kaleido (apt-get install chromium, or set BROWSER_PATH)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", plots.StaticExportWarning)  # a working browser must not fall back
        written = plots.save_figure(_figure(), "throughput", notebook="02_batching")
    assert list(written) == ["html", "pdf", "svg", "png"]
    for fmt, path in written.items():
        assert path == figures_dir / "02_batching" / f"throughput.{fmt}"
        data = path.read_bytes()
        assert data
        if fmt in MAGIC:
            assert data.startswith(MAGIC[fmt]), (fmt, data[:16])
    assert not [p for p in (figures_dir / "02_batching").iterdir() if p.name.startswith(".")]  # no temp files
    assert b"Kaleido-fier" not in written["pdf"].read_bytes().split(b"%%EOF")[-1]  # the title is the figure's
    data, metadata = written._repr_mimebundle_()
    shown = base64.b64decode(data["image/png"])  # the notebook shows a lighter PNG than the file
    assert shown.startswith(MAGIC["png"][0]) and len(shown) < len(written["png"].read_bytes())
    assert metadata["image/png"] == {"width": plots.STATIC_WIDTH_PX, "height": plots.STATIC_HEIGHT_PX}


# -- what a notebook shows ---------------------------------------------------------------------------------------
PNG_1PX = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_saved_figure_displays_plotly_json_and_its_png(tmp_path):
    paths = {"html": tmp_path / "f.html", "png": tmp_path / "f.png"}
    saved = plots.SavedFigure(paths, _figure().update_layout(title_text="Decode<br>speed"), 600, 400, PNG_1PX)
    assert saved == paths  # still the {format: path} mapping
    data, metadata = saved._repr_mimebundle_()  # what IPython puts in the cell's output, with saved.text()
    assert data["application/vnd.plotly.v1+json"]["data"][0]["name"] == "decode"
    assert base64.b64decode(data["image/png"]) == PNG_1PX
    assert metadata["image/png"] == {"width": 600, "height": 400}  # shown at layout size, sharp on HiDPI
    assert saved.text() == f"Decode speed\n  {paths['html']}\n  {paths['png']}"
    assert "text/html" not in data  # nbconvert would prefer HTML (which needs plotly.js) over the PNG


def test_without_a_browser_the_display_has_no_png(no_browser):
    with pytest.warns(plots.StaticExportWarning):
        saved = plots.save_figure(_figure(), "a")
    data, _ = saved._repr_mimebundle_()
    assert "image/png" not in data and "application/vnd.plotly.v1+json" in data
    assert saved.figure.layout.width == plots.STATIC_WIDTH_PX  # the interactive view matches the static size


def test_style_problems_flag_column_names_not_words():
    frame = pd.DataFrame({"t_s": [0, 1], "num_running": [1, 2], "num_waiting": [3, 0]})
    raw = px.line(frame, x="t_s", y=["num_running", "num_waiting"])
    problems = plots.style_problems(raw)
    assert "legend entry 'num_running'" in problems and "legend title 'variable'" in problems
    assert "xaxis title 't_s'" in problems and "yaxis title 'value'" in problems
    human = px.line(frame.rename(columns=plots.LABELS), x="time (s)", y=["running", "waiting"],
                    labels={"value": "requests", "variable": "state"})
    assert plots.style_problems(human) == []


def test_save_figure_warns_about_machine_names(no_browser):
    fig = px.line(pd.DataFrame({"t_s": [0, 1], "num_tokens_in_cache": [1, 2]}), x="t_s", y="num_tokens_in_cache")
    with pytest.warns(plots.FigureStyleWarning, match="num_tokens_in_cache"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", plots.StaticExportWarning)
            plots.save_figure(fig, "a", formats=("html",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", plots.FigureStyleWarning)
        fig = px.line(pd.DataFrame({"t_s": [0, 1], "num_tokens_in_cache": [1, 2]}), x="t_s",
                      y="num_tokens_in_cache", labels=plots.LABELS)
        plots.save_figure(fig, "b", formats=("html",))


# -- readable axes and titles ------------------------------------------------------------------------------------
@pytest.mark.parametrize("low, high, expected", [
    (3, 4000, [3, 10, 30, 100, 300, 1000, 3000]),
    (80, 130, [80, 90, 100]),  # a fifth of a decade: every integer mantissa
    (25, 160, [30, 50, 100]),
    (40, 2100, [50, 100, 200, 500, 1000, 2000]),
    (95, 99, [95, 99]),  # no tick inside at any spacing: the ends
    (1e-3, 1e6, [1e-3, 1e-1, 10, 1e3, 1e5]),  # ten decades: powers of ten, every other one
])
def test_log_ticks(low, high, expected):
    ticks = plots.log_ticks(low, high)
    assert ticks == pytest.approx(expected)
    assert len(ticks) <= 8 and all(low <= t <= high for t in ticks)


@pytest.mark.parametrize("low, high", [(0, 10), (-1, 10), (10, 1), (1, math.inf)])
def test_log_ticks_reject_bad_ranges(low, high):
    with pytest.raises(ValueError, match="log axis"):
        plots.log_ticks(low, high)


def test_format_tick_is_plain():
    assert [plots.format_tick(v) for v in (0.05, 2, 500, 2000, 1e6)] == ["0.05", "2", "500", "2,000", "1,000,000"]


def test_log_axes_get_readable_ticks(no_browser):
    frame = pd.DataFrame({"prompt_tokens": [16, 64, 256], "ttft_ms": [30.0, 480.0, 2100.0],
                          "err": [5.0, 10.0, 300.0]})
    fig = px.line(frame, x="prompt_tokens", y="ttft_ms", error_y="err", log_x=True, log_y=True, labels=plots.LABELS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", plots.StaticExportWarning)
        shown = plots.save_figure(fig, "a").figure
    assert list(shown.layout.xaxis.tickvals) == [16, 64, 256]  # a sweep: ticks at the measured points
    # 25 to 2,400 ms with the error bars: two decades, 1-2-5 steps
    assert list(shown.layout.yaxis.tickvals) == pytest.approx([50, 100, 200, 500, 1000, 2000])
    assert "2,000" in shown.layout.yaxis.ticktext
    assert fig.layout.yaxis.tickvals is None  # the caller's figure is untouched
    fig.update_yaxes(tickvals=[100, 1000])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", plots.StaticExportWarning)
        assert list(plots.save_figure(fig, "b").figure.layout.yaxis.tickvals) == [100, 1000]  # explicit ticks win


def test_long_titles_wrap_and_make_room(no_browser):
    long_title = "Continuous batching served 2.3x the tokens/s of static batching, and the first token came sooner"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", plots.StaticExportWarning)
        warnings.simplefilter("ignore", plots.FigureStyleWarning)  # too long for a title: see the caption tests
        wrapped = plots.save_figure(go.Figure(layout_title_text=long_title), "a").figure
        short = plots.save_figure(go.Figure(layout_title_text="Short"), "b").figure
    lines = wrapped.layout.title.text.split("<br>")
    assert len(lines) >= 2 and " ".join(lines) == long_title
    assert wrapped.layout.margin.t > plots.TITLE_MARGIN_PX
    assert short.layout.title.text == "Short" and short.layout.margin.t is None  # the template's margin


# -- statistics for error bars, tails and claims -------------------------------------------------------------------
@pytest.mark.parametrize("n, expected", [(1, None), (8, None), (9, None), (10, 90), (99, 90), (100, 99), (1000, 99)])
def test_tail_percentile_needs_a_sample_beyond_it(n, expected):
    assert plots.tail_percentile(n) == expected


def test_tail_percentile_other_candidates():
    assert plots.tail_percentile(32, (99, 95, 90)) == 95
    assert plots.tail_percentile(3, (50,)) == 50


def test_summarize_samples_gives_median_ci_error_bars_and_tail():
    samples = pd.DataFrame({"engine": ["hf"] * 12 + ["labkit"] * 3,
                            "ttft_ms": [float(v) for v in range(1, 13)] + [5.0, 7.0, 6.0]})
    table = plots.summarize_samples(samples, "engine", "ttft_ms").set_index("engine")
    hf, labkit = table.loc["hf"], table.loc["labkit"]
    low, high = bench.median_ci(list(range(1, 13)))
    assert hf.ttft_ms == 6.5 and (hf.ttft_ms_ci_low, hf.ttft_ms_ci_high) == (low, high)
    assert hf.ttft_ms_ci == (low, high) and hf.ttft_ms_ci_method == "order statistics"
    assert hf.ttft_ms_ci_coverage == bench.median_ci(list(range(1, 13))).coverage >= 0.95
    assert (labkit.ttft_ms_ci_method, labkit.ttft_ms_ci_coverage) == ("min-max", 0.75)  # three runs: not 95 %
    assert plots.error_bar_note(table, "ttft_ms") == ("bars: min-max or order-statistic interval of 3-12 runs "
                                                      "(75-96.1 % coverage of the median)")
    assert plots.error_bar_note(table.loc[["labkit"]], "ttft_ms") == "bars: min-max of 3 runs (75 % coverage of the median)"
    assert hf.ttft_ms_error_plus == high - 6.5 and hf.ttft_ms_error_minus == 6.5 - low
    assert hf.ttft_ms_num_samples == 12 and hf.ttft_ms_tail_percentile == 90
    assert hf.ttft_ms_tail == pytest.approx(bench.percentile(list(range(1, 13)), 90))
    assert labkit.ttft_ms == 6.0 and labkit.ttft_ms_num_samples == 3
    assert math.isnan(labkit.ttft_ms_tail)  # three samples have no p90


def test_summarize_samples_groups_by_several_columns_and_skips_missing():
    samples = pd.DataFrame({"run": ["a", "a", "b", "b"], "metric": ["x", "x", "x", "y"],
                            "ms": [1.0, None, 3.0, 4.0], "other": [1.0, 2.0, 3.0, 4.0]})
    table = plots.summarize_samples(samples, ["run", "metric"], ["ms", "other"])
    assert list(zip(table.run, table.metric)) == [("a", "x"), ("b", "x"), ("b", "y")]
    assert list(table.ms_num_samples) == [1, 1, 1] and list(table.other) == [1.5, 3.0, 4.0]


@pytest.mark.parametrize("before, after, expected", [
    ((10, 20), (21, 30), 1), ((10, 20), (1, 9), -1), ((10, 20), (15, 25), 0), ((10, 20), (20, 20), 0),
    ((20, 10), (30, 21), 1),  # either order of the bounds
])
def test_trend_only_claims_a_change_beyond_the_intervals(before, after, expected):
    assert plots.trend(before, after) == expected


# -- figures a paper can take: short titles, captions, honest axes --------------------------------------------------
def _quiet_save(fig, name, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", plots.StaticExportWarning)
        return plots.save_figure(fig, name, formats=("html",), **kwargs)


def _caption(fig):
    return [a for a in fig.layout.annotations if a.name == "caption"]


def test_caption_goes_under_the_plot_and_adds_height(no_browser):
    finding = "Continuous batching served 2.3x the tokens/s of static batching, and the first token came sooner."
    saved = _quiet_save(_figure().update_layout(title_text="Throughput by policy"), "a", caption=finding)
    shown = saved.figure
    [caption] = _caption(shown)
    assert caption.text.replace("<br>", " ") == finding and caption.yanchor == "top"
    assert caption.y < shown.layout.legend.y < 0  # under the plot: x axis, then the legend, then the caption
    assert shown.layout.height > plots.STATIC_HEIGHT_PX and saved.height == shown.layout.height
    assert finding in saved.text() and shown.layout.title.text == "Throughput by policy"
    plain = _quiet_save(_figure(), "b").figure
    assert not _caption(plain) and plain.layout.height == plots.STATIC_HEIGHT_PX


def test_caption_must_be_text(no_browser):
    with pytest.raises(ValueError, match="caption must be a string"):
        plots.save_figure(_figure(), "a", formats=("html",), caption=3.5)


def test_long_title_is_flagged_toward_a_caption(no_browser):
    with pytest.warns(plots.FigureStyleWarning, match="caption="):
        plots.save_figure(_figure().update_layout(title_text="x" * (plots.MAX_TITLE_CHARS + 1)), "a",
                          formats=("html",))


@pytest.mark.parametrize("orientation", ["v", "h"])
def test_bars_on_a_log_axis_are_refused(no_browser, orientation):
    bars = go.Bar(x=[1, 2], y=["a", "b"], orientation="h", name="TTFT") if orientation == "h" else \
        go.Bar(x=["a", "b"], y=[1, 2], name="TTFT")
    fig = go.Figure(bars).update_layout(**{"xaxis_type" if orientation == "h" else "yaxis_type": "log"})
    with pytest.raises(ValueError, match=r"bars \(TTFT\) on a log axis"):
        plots.save_figure(fig, "a", formats=("html",))
    _quiet_save(go.Figure(go.Bar(x=["a", "b"], y=[1, 2])), "linear")  # bars on a linear axis are fine
    _quiet_save(go.Figure(go.Scatter(x=["a", "b"], y=[1, 2], mode="markers")).update_yaxes(type="log"), "dots")


def test_log_axes_say_so_and_keep_their_units(no_browser):
    fig = go.Figure(go.Scatter(x=[1, 10, 100], y=[1, 10, 100], name="measured"))
    fig.update_layout(xaxis=dict(type="log", title_text="message (KiB)"),
                      yaxis=dict(type="log", title_text="tokens/s"))
    shown = _quiet_save(fig, "a").figure
    assert shown.layout.xaxis.title.text == "message (KiB, log scale)"
    assert shown.layout.yaxis.title.text == "tokens/s (log scale)"
    fig.update_yaxes(title_text="latency (ms, log scale)")
    assert _quiet_save(fig, "b").figure.layout.yaxis.title.text == "latency (ms, log scale)"  # said once
    linear = _quiet_save(_figure().update_layout(yaxis_title="latency (ms)"), "c").figure
    assert linear.layout.yaxis.title.text == "latency (ms)"


def test_a_series_drawn_exactly_under_another_is_named_in_the_caption(no_browser):
    fig = go.Figure([go.Scatter(x=[0, 1, 2], y=[1, 2, 2], name="static"),
                     go.Scatter(x=[0, 1, 2], y=[1, 2, 2], name="continuous"),
                     go.Scatter(x=[0, 1, 2], y=[1, 2, 3], name="dynamic")])
    [caption] = _caption(_quiet_save(fig, "a", caption="Rows per step.").figure)
    assert caption.text.replace("<br>", " ") == "Rows per step. static is drawn exactly under continuous."
    frame = pd.DataFrame({"position": [1, 2] * 6, "share": [0, 0, 0, 0, 0, 0, 0.5, 0.3, 0, 0, 0, 0],
                          "draft": ["ngram"] * 2 + ["draft"] * 2 + ["eagle"] * 2 + ["ngram"] * 2 + ["draft"] * 2
                          + ["eagle"] * 2, "workload": ["free"] * 6 + ["summarise"] * 6})
    faceted = px.line(frame, x="position", y="share", color="draft", facet_col="workload")
    [caption] = _caption(_quiet_save(faceted, "facets").figure)
    assert caption.text.replace("<br>", " ") == ("ngram is drawn exactly under eagle (in 1 of 2 panels). "
                                                 "draft is drawn exactly under eagle.")
    apart = go.Figure([go.Scatter(x=[0, 1], y=[1, 2], name="a"), go.Scatter(x=[0, 1], y=[1, 3], name="b")])
    assert not _caption(_quiet_save(apart, "b").figure)


def test_title_stays_clear_of_subplot_titles(no_browser):
    frame = pd.DataFrame({"x": [1, 2, 1, 2], "y": [1, 2, 3, 4], "world": ["1 rank", "1 rank", "2 ranks", "2 ranks"]})
    faceted = px.bar(frame, x="x", y="y", facet_col="world", title="Decode step time")
    plain = px.bar(frame, x="x", y="y", title="Decode step time")
    assert _quiet_save(faceted, "a").figure.layout.margin.t > plots.TITLE_MARGIN_PX
    assert _quiet_save(plain, "b").figure.layout.margin.t is None


def _pdf_title(pdf: bytes) -> str:
    """The /Title of the Info object the last trailer names (hex UTF-16 as set_pdf_title writes it)."""
    import re

    info = re.findall(rb"/Info (\d+) 0 R", pdf)[-1]
    body = re.findall(rb"\n" + info + rb" 0 obj\n<<(.*?)>>", pdf, re.S)[-1]
    return bytes.fromhex(re.search(rb"/Title <FEFF([0-9A-F]*)>", body).group(1).decode()).decode("utf-16-be")


MINIMAL_PDF = (b"%PDF-1.4\n1 0 obj\n<</Title (Kaleido-fier)>>\nendobj\n2 0 obj\n<</Type /Catalog>>\nendobj\n"
               b"xref\n0 3\n0000000000 65535 f \n0000000009 00000 n \n0000000050 00000 n \n"
               b"trailer\n<</Size 3\n/Root 2 0 R\n/Info 1 0 R>>\nstartxref\n84\n%%EOF")


def test_set_pdf_title_appends_an_incremental_update():
    titled = plots.set_pdf_title(MINIMAL_PDF, "All-reduce latency (µs)")
    assert titled.startswith(MINIMAL_PDF) and _pdf_title(titled) == "All-reduce latency (µs)"
    tail = titled[len(MINIMAL_PDF):]
    assert b"/Prev 84" in tail and b"/Root 2 0 R" in tail and b"/Size 4" in tail
    xref_at = int(tail.rsplit(b"startxref\n", 1)[1].split(b"\n")[0])
    assert titled[xref_at:].startswith(b"xref\n3 1\n")  # startxref points at the new section
    info_at = int(titled[xref_at:].split(b"\n")[2].split()[0])
    assert titled[info_at:].startswith(b"3 0 obj")
    with pytest.raises(ValueError, match="cannot set its title"):
        plots.set_pdf_title(b"not a pdf", "x")


def test_static_pdf_carries_the_figure_title(figures_dir):
    browser = plots.browser_path()
    if browser is None or not os.access(browser, os.X_OK):
        pytest.skip("no Chromium for kaleido (apt-get install chromium, or set BROWSER_PATH)")
    fig = _figure().update_layout(title_text="Decode speed")
    written = plots.save_figure(fig, "speed", formats=("pdf",), caption="Faster than HF.")
    assert _pdf_title(written["pdf"].read_bytes()) == "Decode speed"
    try:
        import pypdf
    except ImportError:
        return
    assert pypdf.PdfReader(written["pdf"]).metadata.title == "Decode speed"


def test_save_figure_displays_itself_once_in_a_kernel(monkeypatch, no_browser):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.append((objs, kw)))
    monkeypatch.setattr(plots, "_in_kernel", lambda: True)
    saved = _quiet_save(_figure(), "a", caption="A finding.")
    assert len(shown) == 1 and shown[0][1]["raw"] is True
    bundle = shown[0][0][0]
    assert "application/vnd.plotly.v1+json" in bundle and "A finding." in bundle["text/plain"]
    saved._ipython_display_()  # display(saved), or the cell ending with it, shows nothing more
    assert len(shown) == 1
    monkeypatch.setattr(plots, "_in_kernel", lambda: False)
    _quiet_save(_figure(), "b")
    assert len(shown) == 1  # a script shows nothing


def test_a_y_title_longer_than_the_plot_breaks_in_two_and_point_labels_are_not_clipped(no_browser):
    fig = go.Figure(go.Scatter(x=[1, 2], y=[1, 2], mode="markers+text", text=["int8", "gguf"], name="schemes"))
    fig.update_layout(yaxis=dict(type="log", title_text="memory traffic (MB per layer)"))
    shown = _quiet_save(fig, "a").figure
    assert shown.layout.yaxis.title.text == "memory traffic (MB<br>per layer, log scale)"
    assert shown.data[0].cliponaxis is False
    short = _quiet_save(_figure().update_layout(yaxis_title="latency (ms)"), "b").figure
    assert short.layout.yaxis.title.text == "latency (ms)" and short.data[0].cliponaxis is None


def test_reference_lines_are_drawn(no_browser):
    """simple_white's shape defaults (line width 0) hid every add_hline, e.g. 03's "plain decoding" at 1.0x."""
    fig = _figure()
    fig.add_hline(y=1.0, line_dash="dot")
    shown = _quiet_save(fig, "a").figure
    defaults = shown.layout.template.layout.shapedefaults
    assert defaults.line.width > 0 and defaults.opacity == 1 and shown.layout.shapes[0].line.width is None
