"""The one publish path: every saved figure shows in the published notebook, the HTML carries no plotly.js, the
published notebook says which profile and machine made it, and figures/ and docs/notebooks/ come from one run."""

import json
import re
from pathlib import Path

import nbformat
import plotly.graph_objects as go
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit.lab import plots, publish, runner

REPO = Path(__file__).resolve().parents[2]
FIGURE_TYPES = ("image/png", "application/vnd.plotly.v1+json")


def figure_outputs(nb) -> int:
    """Outputs of a notebook that draw a figure: a PNG or plotly's JSON (save_figure gives both in one output)."""
    return sum(1 for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
               if any(kind in out.get("data", {}) for kind in FIGURE_TYPES))


def save_figure_calls(nb) -> tuple[int, int]:
    """(calls every run makes, calls in all): `save_figure` calls in the code, those under an `if` counted apart."""
    import ast

    always = every = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        tree = ast.parse(source)
        conditional = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.If, ast.For, ast.While))
                       for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "save_figure":
                every += 1
                always += id(node) not in conditional
    return always, every


def _notebook(path: Path, *cells: str, title: str | None = "# Demo") -> Path:
    nb = new_notebook(cells=[new_code_cell(source) for source in cells])
    nb.cells[0].metadata["tags"] = ["parameters"]
    if title:
        nb.cells.insert(0, new_markdown_cell(title))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


# a saved figure is shown wherever its call sits: mid-cell, inside display(), last line, and not when skipped
DEMO_CELLS = (
    "n = 2  # parameter",
    "import plotly.graph_objects as go\nfrom IPython.display import display\nfrom labkit.lab import plots\n"
    "fig = go.Figure(go.Scatter(x=[1, 2], y=[1, n], name='demo'))",
    "plots.save_figure(fig, 'first', notebook='01_demo', caption='The first figure.')\nafter = 1",
    "display(plots.save_figure(fig, 'second', notebook='01_demo'))",
    "plots.save_figure(fig, 'third', notebook='01_demo')",
    "if n > 5:\n    plots.save_figure(fig, 'never', notebook='01_demo')",
)


@pytest.fixture
def lab(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setenv("LABKIT_NOTEBOOKS_DIR", str(folder))
    monkeypatch.delenv("LABKIT_FIGURES_DIR", raising=False)
    (folder / "profiles.json").write_text(json.dumps({"publish": {"01": {"n": 3}}}))
    _notebook(folder / "01_demo.ipynb", *DEMO_CELLS)
    return folder


def test_publish_shows_every_saved_figure_and_makes_docs_and_figures_from_one_run(lab, tmp_path):
    docs, figures = tmp_path / "docs", tmp_path / "figures"
    (figures / "01_demo").mkdir(parents=True)
    (figures / "01_demo" / "stale.html").write_text("from an older run")
    done = publish.publish(["01"], run_dir=tmp_path / "run", docs=docs, figures=figures, progress=False)

    executed = nbformat.read(docs / "01_demo.ipynb", as_version=4)
    assert save_figure_calls(executed) == (3, 4)
    assert figure_outputs(executed) == 3  # one per call that ran: none lost, none twice
    html = (docs / "01_demo.html").read_text()
    assert publish.exported_plotlyjs_copies(html) == 0 and len(html) < 2_000_000
    if plots.browser_path():  # with a browser each figure is a PNG the page embeds
        assert html.count('src="data:image/png;base64,') == 3
    note = executed.cells[1]
    assert note.cell_type == "markdown" and "Profile `publish`" in note.source and "`n = 3`" in note.source
    assert publish.machine_description().split(" · ")[0] in note.source
    assert sorted(p.name for p in (figures / "01_demo").glob("*.html")) == ["first.html", "second.html",
                                                                           "third.html"]  # stale one gone
    assert (figures / "plotly.min.js").exists() and not list((figures / "01_demo").glob("plotly*"))
    assert done["figures"] == [figures / "01_demo"] and done["notebooks"] == [tmp_path / "run" / "01_demo.ipynb"]


def test_publish_refuses_an_unknown_profile_before_running(lab, tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        publish.publish(["01"], profile="huge", run_dir=tmp_path / "run", docs=tmp_path / "d", figures=tmp_path / "f")
    assert not (tmp_path / "run").exists() and not (tmp_path / "d").exists()


def test_cli_publish_flag_calls_the_publish_path(lab, tmp_path, monkeypatch, capsys):
    from labkit import cli
    from labkit.cli import run as run_command

    calls = []
    monkeypatch.setattr(run_command, "publish", lambda paths, **kw: calls.append((paths, kw)) or {"notebooks": [1]})
    assert cli.main(["run", "01", "--publish", "--profile", "publish", "--no-progress",
                     "--output-dir", str(tmp_path / "run")]) == 0
    [(paths, kw)] = calls
    assert paths == [str(lab / "01_demo.ipynb")] and kw["profile"] == "publish"
    assert kw["run_dir"] == tmp_path / "run" and "published 1 notebook(s)" in capsys.readouterr().out


def test_stamp_goes_after_the_title_and_a_restamp_replaces_it(tmp_path):
    path = _notebook(tmp_path / "01_x.ipynb", "n = 1")
    publish.stamp_notebook(path, "first note")
    publish.stamp_notebook(path, "second note")
    cells = nbformat.read(path, as_version=4).cells
    assert [c.source for c in cells] == ["# Demo", "second note", "n = 1"]
    untitled = _notebook(tmp_path / "02_y.ipynb", "n = 1", title=None)
    publish.stamp_notebook(untitled, "note")
    assert nbformat.read(untitled, as_version=4).cells[0].source == "note"


def test_provenance_names_profile_parameters_machine_and_run():
    text = publish.provenance_text("publish", {"repeats": 5}, "Xeon (2 cpus)", run_id="r1")
    assert "Profile `publish`" in text and "`repeats = 5`" in text and "Xeon (2 cpus)" in text and "`r1`" in text
    assert "the notebook's defaults" in publish.provenance_text("default", {}, "m")


def test_exported_html_shows_the_png_of_a_saved_figure_and_no_plotlyjs(tmp_path):
    png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")  # enough for the page
    data, metadata = plots.SavedFigure({}, go.Figure(go.Scatter(x=[1], y=[1])), 600, 400, png)._repr_mimebundle_()
    nb = new_notebook(cells=[new_markdown_cell("# Title"), new_code_cell("fig", outputs=[
        nbformat.v4.new_output("display_data", data=data, metadata=metadata)])])
    path = tmp_path / "01_demo.ipynb"
    nbformat.write(nb, path)
    html = publish.export_notebook_html(path, tmp_path / "docs").read_text()
    assert "data:image/png;base64," in html and 'width="600"' in html
    assert publish.exported_plotlyjs_copies(html) == 0


def test_publish_notebooks_writes_html_and_the_executed_notebook(tmp_path):
    run = tmp_path / "runs" / "20260101T000000Z"
    run.mkdir(parents=True)
    notebooks = [_notebook(run / name, "n = 1") for name in ("01_a.ipynb", "05_b.ipynb")]
    written = publish.publish_notebooks(notebooks, tmp_path / "docs")
    assert [p.name for p in written] == ["01_a.html", "01_a.ipynb", "05_b.html", "05_b.ipynb"]
    published, executed = (nbformat.read(p, as_version=4) for p in (tmp_path / "docs" / "05_b.ipynb", notebooks[1]))
    assert [c.source for c in published.cells] == [c.source for c in executed.cells]


def test_a_progress_bar_is_published_as_its_last_state(tmp_path):
    nb = new_notebook(cells=[new_code_cell("run()")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr", text="sweep:  50%|#  | 1/2\r"),
                           nbformat.v4.new_output("stream", name="stderr", text="sweep: 100%|##| 2/2 [00:04]\n")]
    path = tmp_path / "01_bar.ipynb"
    nbformat.write(nb, path)
    html_path, ipynb_path = publish.publish_notebooks([path], tmp_path / "docs")
    for text in (html_path.read_text(), ipynb_path.read_text()):
        assert "2/2" in text and "1/2" not in text


# -- the repository's own notebooks, profiles and published files --------------------------------------------------
NOTEBOOKS = sorted((REPO / "notebooks").glob("0*.ipynb"))


def test_publish_profile_covers_every_notebook_with_its_own_parameters(monkeypatch):
    monkeypatch.setenv("LABKIT_NOTEBOOKS_DIR", str(REPO / "notebooks"))
    profile = runner.load_profiles()[publish.PUBLISH_PROFILE]
    assert sorted(profile) == [p.name[:2] for p in NOTEBOOKS]
    runner.resolve_parameters(NOTEBOOKS, profile, {})  # every name exists and keeps its kind


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_has_one_widgets_cell(path):
    nb = nbformat.read(path, as_version=4)
    assert sum("widgets." in c.source for c in nb.cells if c.cell_type == "code") >= 1


@pytest.mark.parametrize("path", sorted((REPO / "docs" / "notebooks").glob("0*.ipynb")), ids=lambda p: p.stem)
def test_published_notebooks_show_every_figure_they_save(path):
    nb = nbformat.read(path, as_version=4)
    if not any(publish.PROVENANCE_TAG in c.metadata.get("tags", []) for c in nb.cells):
        pytest.skip("published before `make publish` existed: the next publish makes it checkable")
    always, every = save_figure_calls(nb)
    assert always <= figure_outputs(nb) <= every
    html = (path.with_suffix(".html")).read_text()
    assert publish.exported_plotlyjs_copies(html) == 0


def test_committed_figures_share_one_plotlyjs():
    figures = REPO / "figures"
    assert [p.relative_to(figures).as_posix() for p in figures.rglob("plotly*.js")] == ["plotly.min.js"]
    for page in figures.glob("*/*.html"):
        text = page.read_text()
        assert 'src="../plotly.min.js"' in text and publish.exported_plotlyjs_copies(text) == 0, page
        assert not re.search(r"<script[^>]*src=\"https?://", text), page  # offline: no CDN
