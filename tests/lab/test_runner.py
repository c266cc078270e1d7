"""`labkit run`: selectors, profiles, parameter parsing, and real papermill runs of tiny notebooks."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from labkit.cli import run as run_command
from labkit.lab import runner


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
    run_command.add_parser(parser.add_subparsers())
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
    profiles = runner.load_profiles(Path(runner.__file__).resolve().parents[2] / "notebooks")
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


def test_notebook_parameters_read_the_tagged_cell(notebooks):
    assert runner.notebook_parameters(notebooks / "01_params.ipynb") == {"x": 1, "label": "nb", "expected_cwd": ""}
    shipped = Path(runner.__file__).resolve().parents[2] / "notebooks" / "01_baseline.ipynb"
    assert {"model", "device", "seed", "repeats"} <= set(runner.notebook_parameters(shipped))


def test_a_mistyped_parameter_is_an_error_naming_the_parameters(notebooks):
    paths = runner.find_notebooks(["01"])
    with pytest.raises(ValueError, match=r"unknown parameter 'lable' \(did you mean 'label'\?\); the parameters "
                                         r"are 01_params: x, label, expected_cwd"):
        runner.resolve_parameters(paths, {}, {"lable": "a"})
    with pytest.raises(ValueError, match=r"'x': 01_params expects an integer \(default 1\), got 'three'"):
        runner.resolve_parameters(paths, {}, {"x": "three"})


def test_parameters_go_only_to_the_notebooks_that_have_them(notebooks):
    first, second = runner.find_notebooks([])
    resolved = runner.resolve_parameters([first, second], runner.load_profiles()["full"], {"n": 5})
    assert resolved == {first: {"label": "from-profile", "x": 2}, second: {"n": 5}}
    with pytest.raises(ValueError, match="profile entry 02 sets 'x', which 02_fails does not have"):
        runner.resolve_parameters([second], {"02": {"x": 1}}, {})


def test_cli_refuses_a_typo_and_a_negative_timeout_in_one_line(notebooks, capsys):
    from labkit import cli

    assert cli.main(["run", "01", "-p", "xx", "3", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown parameter 'xx'" in err and "x, label, expected_cwd" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "01", "--cell-timeout", "-5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--cell-timeout" in err and "'-5'" in err
    with pytest.raises(ValueError, match="cell timeout"):
        runner.run_notebooks(runner.find_notebooks(["01"]), cell_timeout_s=-1)


def test_cli_checks_the_output_folder_first(notebooks, tmp_path, capsys):
    from labkit import cli

    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "01", "--output-dir", str(tmp_path / "taken")])
    assert info.value.code == 2 and "expected a folder" in capsys.readouterr().err


def test_a_run_writes_results_and_figures_under_its_folder(notebooks, tmp_path, monkeypatch):
    monkeypatch.delenv("LABKIT_DATA_DIR")
    monkeypatch.delenv("LABKIT_FIGURES_DIR")
    _write_notebook(
        notebooks / "03_env.ipynb", "expected = ''",
        "import os\nfrom labkit.lab import results\n"
        "assert os.environ['LABKIT_FIGURES_DIR'] == expected + '/figures', os.environ['LABKIT_FIGURES_DIR']\n"
        "results.append_rows([results.make_row('t', {}, {'x': 1.0}, env={})])")
    out = tmp_path / "run"
    runner.run_notebooks(runner.find_notebooks(["03"]), {"expected": str(out)}, output_dir=out, progress=False,
                         label="nightly", run_id="run-7")
    (row,) = [json.loads(line) for line in (out / "data" / "results.jsonl").read_text().splitlines()]
    assert (row["run_id"], row["label"]) == ("run-7", "nightly")
    assert "LABKIT_DATA_DIR" not in os.environ and "LABKIT_RUN_ID" not in os.environ  # restored after the run


def test_refresh_reference_targets_the_committed_folders(tmp_path, monkeypatch):
    repo = Path(runner.__file__).resolve().parents[2]
    env = runner.output_environment(tmp_path, refresh_reference=True, run_id="r")
    assert env["LABKIT_DATA_DIR"] == str(repo / "data") and env["LABKIT_FIGURES_DIR"] == str(repo / "figures")
    monkeypatch.setenv("LABKIT_DATA_DIR", "/elsewhere")  # an explicit choice wins over the run folder
    env = runner.output_environment(tmp_path, label="x")
    assert env["LABKIT_DATA_DIR"] == "/elsewhere" and env["LABKIT_LABEL"] == "x" and env["LABKIT_RUN_ID"]


@pytest.mark.slow
def test_a_cell_timeout_prints_only_labkits_line(notebooks, tmp_path, capfd):
    from labkit import cli

    _write_notebook(notebooks / "04_sleeps.ipynb", "seconds = 60", "import time\ntime.sleep(seconds)")
    code = cli.main(["run", "04", "--cell-timeout", "2", "--no-progress", "--output-dir", str(tmp_path / "out")])
    err = capfd.readouterr().err  # the kernel's stderr is this process's fd 2: captured too
    assert code == 1 and "Traceback" not in err and "ZMQError" not in err and "Timeout waiting" not in err
    assert err.strip().splitlines()[-1].startswith("labkit run: 04_sleeps.ipynb failed at cell [2] (index 1): ran "
                                                   "longer than the 2 s cell timeout")


# -- run folders and kernels ---------------------------------------------------------------------------------
def _labkit_run(notebooks: Path, runs: Path, *argv: str) -> subprocess.Popen:
    """`python -m labkit run ARGV` in a process of its own, its run folders under `runs`."""
    env = {**os.environ, "LABKIT_NOTEBOOKS_DIR": str(notebooks), "LABKIT_RUNS_DIR": str(runs)}
    env.pop("LABKIT_DATA_DIR", None)
    env.pop("LABKIT_FIGURES_DIR", None)
    return subprocess.Popen([sys.executable, "-m", "labkit", "run", *argv, "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cell_text(notebook: Path) -> str:
    cells = nbformat.read(notebook, as_version=4).cells
    return "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_a_run_folder_is_named_by_its_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RUNS_DIR", str(tmp_path))
    assert runner.default_output_dir("20260101T000000Z-abc123") == tmp_path / "20260101T000000Z-abc123"
    first, second = runner.default_output_dir(), runner.default_output_dir()  # the same second, two runs
    assert first != second and first.parent == second.parent == tmp_path


def test_concurrent_runs_keep_their_own_notebooks(notebooks, tmp_path):
    _write_notebook(notebooks / "05_who.ipynb", "pause = 2.0",
                    "import os, time\ntime.sleep(pause)\nprint('run', os.environ['LABKIT_RUN_ID'])")
    runs = tmp_path / "runs"
    procs = [_labkit_run(notebooks, runs, "05") for _ in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    folders = sorted(runs.iterdir())
    assert len(folders) == 2
    for folder in folders:  # each run's executed copy is its own, in the folder named by its run id
        assert f"run {folder.name}\n" in _cell_text(folder / "05_who.ipynb")
        assert not (folder / runner.KERNELS_DIR).exists()


def test_a_killed_run_leaves_no_kernel_file_outside_its_folder_and_the_next_run_removes_it(notebooks, tmp_path):
    kernel_pid = tmp_path / "kernel.pid"
    _write_notebook(notebooks / "06_hangs.ipynb", f"path = {str(kernel_pid)!r}",
                    "import os, time\nopen(path, 'w').write(str(os.getpid()))\ntime.sleep(600)")
    _write_notebook(notebooks / "07_quick.ipynb", "n = 1", "n + 1")
    runs = tmp_path / "runs"
    killed = _labkit_run(notebooks, runs, "06")
    try:
        deadline = time.monotonic() + 120
        while not kernel_pid.exists() or not kernel_pid.read_text():
            assert killed.poll() is None and time.monotonic() < deadline, "the kernel did not start"
            time.sleep(0.2)
        pid = int(kernel_pid.read_text())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if sys.platform == "linux" else None
    finally:
        killed.kill()  # SIGKILL: no Python cleanup runs
        killed.wait()
    (folder,) = runs.iterdir()
    kernels = folder / runner.KERNELS_DIR
    if args is not None:  # the kernel's connection file was the run folder's, never a temporary file in /tmp
        connection = Path(args[args.index(b"-f") + 1].decode())
        assert connection.parent == kernels, connection
    assert [p.name for p in kernels.iterdir()] and (kernels / runner.OWNER_FILE).exists()
    deadline = time.monotonic() + 30
    while runner._is_alive(pid):  # the orphaned kernel notices its parent is gone and exits
        assert time.monotonic() < deadline, "the killed run's kernel lives on"
        time.sleep(0.2)
    nxt = _labkit_run(notebooks, runs, "07")
    out, _ = nxt.communicate(timeout=300)
    assert nxt.returncode == 0, out
    assert not list(runs.glob(f"*/{runner.KERNELS_DIR}"))  # the dead run's kernel files, and the new run's own
    assert len(list(runs.iterdir())) == 2


def test_stale_kernel_folders_are_those_of_dead_processes(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("dead", str(dead.pid)), ("alive", str(os.getppid())), ("broken", "x"), ("starting", None)):
        kernels = tmp_path / name / runner.KERNELS_DIR
        kernels.mkdir(parents=True)
        (kernels / "kernel-01.json").write_text("{}")
        if pid is not None:
            (kernels / runner.OWNER_FILE).write_text(pid)
    assert runner.remove_stale_kernel_files(tmp_path) == [tmp_path / "dead" / runner.KERNELS_DIR]
    assert sorted(p.parent.name for p in tmp_path.glob(f"*/{runner.KERNELS_DIR}")) == ["alive", "broken", "starting"]
