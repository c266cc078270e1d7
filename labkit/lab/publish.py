"""One publish path: `labkit run --publish` (`make publish`) executes the notebooks once, under one profile, and
makes both `docs/notebooks/` (each notebook as HTML and as the executed .ipynb) and `figures/<notebook>/` from
that one run, so the two cannot disagree. Each published notebook opens with a note of the profile, parameters
and machine that made it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from labkit.device import repo_root
from labkit.lab.results import write_bytes_atomic

PUBLISH_PROFILE = "publish"  # the profile `make publish` uses: see notebooks/profiles.json
PROVENANCE_TAG = "published-run"  # the tag of the note `stamp_notebook` adds, so a re-stamp replaces it
PLOTLYJS = "plotly.min.js"


def docs_dir() -> Path:
    """Where published notebooks go: `<repo>/docs/notebooks`."""
    return repo_root() / "docs" / "notebooks"


def reference_figures_dir() -> Path:
    """Where published figures go: the committed `<repo>/figures`."""
    return repo_root() / "figures"


def machine_description() -> str:
    """The machine in one line (CPU or GPU, versions, git SHA) and the torch threads a run gets."""
    from labkit.device import describe_environment, format_environment

    threads = os.environ.get("OMP_NUM_THREADS")
    return format_environment(describe_environment()) + (f" · OMP_NUM_THREADS={threads}" if threads else "")


def provenance_text(profile: str, parameters: Mapping[str, Any], machine: str, run_id: str | None = None,
                    when: datetime | None = None) -> str:
    """The note a published notebook opens with: which profile, parameters and machine made it, and when."""
    when = when or datetime.now(timezone.utc)
    shown = ", ".join(f"`{name} = {value!r}`" for name, value in parameters.items()) or "the notebook's defaults"
    run = f", run `{run_id}`" if run_id else ""
    return (f"> **Published run.** Profile `{profile}` ({shown}){run}, executed {when:%Y-%m-%d %H:%M} UTC on: "
            f"{machine}. Made by `labkit run --publish` (`make publish`), which also wrote this notebook's "
            f"`figures/` from the same run.")


def stamp_notebook(notebook: str | Path, text: str) -> None:
    """Insert (or replace) the provenance note as a markdown cell after the notebook's title cell, in place."""
    import nbformat

    notebook = Path(notebook)
    nb = nbformat.read(notebook, as_version=4)
    nb.cells = [c for c in nb.cells if PROVENANCE_TAG not in c.metadata.get("tags", [])]
    cell = nbformat.v4.new_markdown_cell(text, metadata={"tags": [PROVENANCE_TAG]})
    cell.pop("id", None)  # ids are optional before nbformat 4.5; the notebook's own version decides
    if nb.nbformat_minor >= 5:
        cell["id"] = PROVENANCE_TAG
    nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, cell)
    write_bytes_atomic(notebook, (nbformat.writes(nb) + "\n").encode())


def coalesce_streams(nb):
    """The notebook with each cell's consecutive stream outputs merged and text overwritten by a carriage return
    dropped (nbconvert's CoalesceStreamsPreprocessor): a progress bar shows as its last state, not every update."""
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    return nb


def export_notebook_html(notebook: str | Path, output_dir: str | Path) -> Path:
    """Write an executed notebook as an HTML page (nbconvert's "lab" template); returns its path.

    Figures saved with `save_figure` carry their PNG, which the page embeds; plotly's JSON alone would be blank,
    and plotly.js itself is never inlined (the PNG is what the page shows).
    """
    import nbformat
    from nbconvert import HTMLExporter

    notebook, output_dir = Path(notebook), Path(output_dir)
    nb = coalesce_streams(nbformat.read(notebook, as_version=4))
    html, _ = HTMLExporter(template_name="lab").from_notebook_node(nb, resources={"metadata": {
        "name": notebook.stem}})
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{notebook.stem}.html"
    write_bytes_atomic(target, html.encode())
    return target


def publish_notebooks(notebooks: Iterable[str | Path], output_dir: str | Path | None = None) -> list[Path]:
    """Publish executed notebooks (e.g. `runs/<run id>/*.ipynb` from `labkit run`) to `docs/notebooks/`: each
    as HTML for a browser and as the executed .ipynb, which GitHub renders with its figures' PNGs; both with
    their streams coalesced (`coalesce_streams`)."""
    import nbformat

    output_dir = Path(output_dir) if output_dir is not None else docs_dir()
    written = []
    for notebook in map(Path, notebooks):
        written.append(export_notebook_html(notebook, output_dir))
        target = output_dir / notebook.name
        nb = coalesce_streams(nbformat.read(notebook, as_version=4))
        write_bytes_atomic(target, (nbformat.writes(nb) + "\n").encode())
        written.append(target)
    return written


def replace_figures(run_figures: str | Path, notebooks: Sequence[str], target: str | Path | None = None) -> list[Path]:
    """Make `target/<notebook>/` exactly the run's `run_figures/<notebook>/` for each notebook (stale figures go)
    and copy the run's shared plotly.min.js to `target/`; returns the folders written."""
    run_figures = Path(run_figures)
    target = Path(target) if target is not None else reference_figures_dir()
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for stem in notebooks:
        source, folder = run_figures / stem, target / stem
        if folder.exists():
            shutil.rmtree(folder)
        if source.is_dir():
            shutil.copytree(source, folder)
            written.append(folder)
    if (run_figures / PLOTLYJS).exists():
        write_bytes_atomic(target / PLOTLYJS, (run_figures / PLOTLYJS).read_bytes())
    return written


def publish(selection: Sequence[str] = (), profile: str = PUBLISH_PROFILE, parameters: Mapping[str, Any] | None = None,
            run_dir: str | Path | None = None, docs: str | Path | None = None, figures: str | Path | None = None,
            **run_options) -> dict[str, list[Path]]:
    """Run the selected notebooks (all by default) once under `profile` into `run_dir` (default `runs/<run
    id>/`), stamp each executed copy with its provenance, then publish them to `docs` (default
    `docs/notebooks/`) and their figures to `figures` (default the committed `figures/`).

    `run_options` go to `runner.run_notebooks` (cell_timeout_s, progress, label, run_id, refresh_reference).
    Nothing is published unless every selected notebook ran. Returns {"notebooks", "docs", "figures"}: paths.
    """
    from labkit.lab.results import RUN_ID_ENV, new_run_id
    from labkit.lab.runner import (default_output_dir, find_notebooks, load_profiles, output_environment,
                                   resolve_parameters, run_notebooks)

    paths = find_notebooks(selection)
    if not paths:
        raise ValueError("no numbered notebooks (NN_name.ipynb) to publish")
    profiles = load_profiles()
    if profile not in profiles:
        raise ValueError(f"unknown profile {profile!r}; available: {', '.join(sorted(profiles))}")
    run_dir = Path(run_dir) if run_dir is not None else default_output_dir()
    run_options.setdefault("run_id", new_run_id())  # one id for the rows, the notebooks' stamps and the note
    # the run's own figures folder, whatever $LABKIT_FIGURES_DIR says: published figures come from this run only
    environment = output_environment(run_dir, run_options.get("refresh_reference", False), run_options.get(
        "run_id"), run_options.get("label"))
    run_figures = run_dir / "figures"
    saved = os.environ.get("LABKIT_FIGURES_DIR")
    os.environ["LABKIT_FIGURES_DIR"] = str(run_figures)
    try:
        outputs = run_notebooks(paths, parameters, profile=profile, output_dir=run_dir, **run_options)
    finally:
        if saved is None:
            os.environ.pop("LABKIT_FIGURES_DIR", None)
        else:
            os.environ["LABKIT_FIGURES_DIR"] = saved
    resolved = resolve_parameters(paths, profiles[profile], parameters or {})
    machine = machine_description()
    for source, output in zip(paths, outputs):
        stamp_notebook(output, provenance_text(profile, resolved[source], machine,
                                               environment[RUN_ID_ENV]))
    return {"notebooks": outputs, "docs": publish_notebooks(outputs, docs),
            "figures": replace_figures(run_figures, [p.stem for p in paths], figures)}


def exported_plotlyjs_copies(html: str) -> int:
    """How many inline copies of plotly.js an HTML page carries (each is ~4.8 MB); 0 for a published page."""
    return html.count("plotly.js v") + html.count("Plotly.js v")


__all__ = ["PUBLISH_PROFILE", "docs_dir", "export_notebook_html", "exported_plotlyjs_copies", "machine_description",
           "provenance_text", "publish", "publish_notebooks", "reference_figures_dir", "replace_figures",
           "stamp_notebook"]
