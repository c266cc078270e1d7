"""Figures: the template, HTML export, static export through kaleido, and the no-browser fallback."""

import os
import warnings

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from labkit import plots

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
    assert layout.font.size == 14
    assert layout.plot_bgcolor == "white"


def test_save_figure_writes_html_with_shared_plotlyjs(figures_dir, no_browser):
    fig = _figure()
    written = plots.save_figure(fig, "decode-latency_1", notebook="01_baseline", formats=("html",))
    html = figures_dir / "01_baseline" / "decode-latency_1.html"
    assert written == {"html": html}
    text = html.read_text()
    assert 'src="plotly.min.js"' in text and len(text) < 100_000  # small: plotly.js is shared, not inlined
    assert (figures_dir / "01_baseline" / "plotly.min.js").stat().st_size > 1_000_000
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
