"""`labkit run`: selectors, profiles, parameter parsing, and real papermill runs of tiny notebooks."""

import argparse
import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from labkit import runner


def _write_notebook(path: Path, *cells: str) -> Path:
    """Cell 0 is tagged `parameters`, as papermill expects."""
    nb = new_notebook(cells=[new_code_cell(source) for source in cells])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def notebooks(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setenv("LABKIT_NOTEBOOKS_DIR", str(folder))
    _write_notebook(
        folder / "01_params.ipynb",
        'x = 1  # overridden by -p\nlabel = "nb"  # set by the profile\nexpected_cwd = ""',
        "import os\nassert x == 3, x\nassert label == 'from-profile', label\n"
        "assert os.getcwd() == expected_cwd, os.getcwd()",
    )
    _write_notebook(folder / "02_fails.ipynb", "n = 1", "y = n + 1", "raise ValueError(f'boom {y}')")
    (folder / "profiles.json").write_text(json.dumps({
        "_doc": "notes are ignored",
        "full": {"*": {"label": "from-profile", "x": 100}, "01": {"x": 2}},
    }))
    (folder / "scratch.ipynb").write_text("{}")  # not numbered: never selected
    return folder


def _cli(argv):
    parser = argparse.ArgumentParser(prog="labkit")
    runner.add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_selectors_resolve(notebooks):
    first, second = notebooks / "01_params.ipynb", notebooks / "02_fails.ipynb"
    assert runner.find_notebooks([]) == [first, second]
    assert runner.find_notebooks(["2", "01"]) == [second, first]
    assert runner.find_notebooks(["01_params", "02_fails.ipynb", "1"]) == [first, second]
    assert runner.find_notebooks([str(second)]) == [second]


def test_unknown_selector_names_it_and_lists_available(notebooks):
    with pytest.raises(ValueError, match=r"'07'.*01_params, 02_fails"):
        runner.find_notebooks(["07"])


@pytest.mark.parametrize("text, value", [("3", 3), ("-2.5", -2.5), ("1e-3", 1e-3), ("True", True),
                                         ("false", False), ("None", None), ("cuda", "cuda"),
                                         ("[1, 2]", [1, 2]), ('{"a": 1}', {"a": 1}), ("[oops", "[oops")])
def test_parse_value(text, value):
    assert runner.parse_value(text) == value


def test_profiles_merge_star_then_notebook(notebooks):
    profiles = runner.load_profiles()
    assert set(profiles) == {"default", "full"}
    assert runner.profile_parameters(profiles["full"], notebooks / "01_params.ipynb") == \
        {"label": "from-profile", "x": 2}
    assert runner.profile_parameters(profiles["full"], notebooks / "02_fails.ipynb") == \
        {"label": "from-profile", "x": 100}


def test_shipped_profiles_file_is_valid():
    profiles = runner.load_profiles(Path(runner.__file__).resolve().parent.parent / "notebooks")
    assert {"default", "full"} <= set(profiles)


def test_parameters_injected_with_overrides_winning(notebooks, tmp_path):
    out = tmp_path / "run"
    paths = runner.run_notebooks(runner.find_notebooks(["01"]), {"x": 3, "expected_cwd": str(notebooks)},
                                 profile="full", output_dir=out, progress=False)
    assert paths == [out / "01_params.ipynb"]
    executed = nbformat.read(paths[0], as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "x = 3" in injected[0].source and 'label = "from-profile"' in injected[0].source


def test_failing_notebook_raises_naming_notebook_and_cell(notebooks, tmp_path):
    with pytest.raises(runner.NotebookFailed) as info:
        runner.run_notebooks(runner.find_notebooks(["02"]), {}, output_dir=tmp_path / "run", progress=False)
    message = str(info.value)
    assert "02_fails.ipynb" in message and "cell [3]" in message and "ValueError: boom 2" in message
    kept = tmp_path / "run" / "02_fails.ipynb"
    assert str(kept) in message and kept.exists()


def test_unknown_profile_fails_before_running(notebooks, tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'huge'.*default, full"):
        runner.run_notebooks(runner.find_notebooks(["01"]), {}, profile="huge", output_dir=tmp_path / "run")


def test_cli_run_succeeds(notebooks, tmp_path, capsys):
    args = _cli(["run", "01", "-p", "x", "3", "-p", "expected_cwd", str(notebooks), "--profile", "full",
                 "--output-dir", str(tmp_path / "cli"), "--no-progress", "--cell-timeout", "60"])
    assert args.func(args) == 0
    assert (tmp_path / "cli" / "01_params.ipynb").exists()


def test_cli_reports_bad_selector_on_one_line(notebooks, capsys):
    args = _cli(["run", "nope"])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("labkit run: unknown notebook 'nope'") and err.count("\n") == 1
