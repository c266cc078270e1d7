"""Where commands write: the untracked store by default, the committed reference only with --refresh-reference,
$LABKIT_DATA_DIR when set; output paths checked before any work; `labkit run --help`'s examples exist."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from labkit.lab import results

REPO = Path(results.__file__).resolve().parents[2]


def _git(repo: Path, *argv: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git checkout with the lab's .gitignore and a committed data/results.jsonl, standing in for the repo."""
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    (root / "data" / "results.jsonl").write_text("")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "reference")
    monkeypatch.setattr(results, "repo_root", lambda: root)
    monkeypatch.delenv("LABKIT_DATA_DIR", raising=False)
    return root


@pytest.fixture
def fake_decode(monkeypatch):
    """`labkit bench decode` without a model: two rows at once."""
    from labkit.cli import bench_decode

    def measure(**kwargs):
        return [results.make_row("decode", {"variant": v}, {"tokens_per_s": 1.0}, env={"cpu": "c"}) for v in "ab"]

    monkeypatch.setattr(bench_decode, "run_decode_bench", measure)
    monkeypatch.setattr(bench_decode, "format_table", lambda rows: f"{len(rows)} rows")


def test_a_benchmark_writes_the_untracked_store_and_git_stays_clean(repo, fake_decode, run_cli):
    code, out, err = run_cli("bench", "decode", "--no-progress")
    assert code == 0 and out == "2 rows\n"
    store = repo / "runs" / "store"
    assert len(results.read_rows(store / "results.jsonl")) == 2 and (store / "bench_decode.json").exists()
    assert f"results: {store / 'results.jsonl'}, {store / 'bench_decode.json'}" in err
    assert _git(repo, "status", "--porcelain") == ""


def test_only_refresh_reference_writes_the_committed_data(repo, fake_decode, run_cli):
    import os

    assert run_cli("bench", "decode", "--no-progress", "--refresh-reference")[0] == 0
    assert len(results.read_rows(repo / "data" / "results.jsonl")) == 2
    assert sorted(_git(repo, "status", "--porcelain").split()) == ["??", "M", "data/bench_decode.json",
                                                                   "data/results.jsonl"]
    assert "LABKIT_DATA_DIR" not in os.environ  # restored after the command
    code, _, err = run_cli("bench", "decode", "--refresh-reference", "--no-save")
    assert code == 2 and err.count("\n") == 1 and "choose one" in err


def test_labkit_data_dir_keeps_overriding(repo, fake_decode, run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path / "mine"))
    assert run_cli("bench", "decode", "--no-progress")[0] == 0
    assert len(results.read_rows(tmp_path / "mine" / "results.jsonl")) == 2 and not (repo / "runs").exists()


def test_bench_serve_refuses_a_result_file_in_a_missing_folder(run_cli, tmp_path, monkeypatch):
    from labkit.serving import loadgen

    monkeypatch.setattr(loadgen, "benchmark", lambda config: pytest.fail("requests sent before the check"))
    code, _, err = run_cli("bench", "serve", "--result-file", str(tmp_path / "nonexistent" / "x.json"))
    assert code == 2 and err == (f"labkit bench serve: --result-file {tmp_path / 'nonexistent' / 'x.json'}: "
                                 f"the folder {tmp_path / 'nonexistent'} does not exist\n")
    assert not (tmp_path / "nonexistent").exists()


def test_bench_serve_checks_the_store_before_sending(run_cli, tmp_path, monkeypatch):
    from labkit.serving import loadgen

    monkeypatch.setattr(loadgen, "benchmark", lambda config: pytest.fail("requests sent before the check"))
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path / "file"))
    code, _, err = run_cli("bench", "serve")
    assert code == 2 and err.count("\n") == 1 and "is a file, not a folder" in err


def test_run_checks_its_results_folder_before_any_notebook(run_cli, tmp_path, monkeypatch):
    from labkit.cli import run

    monkeypatch.setattr(run, "run_notebooks", lambda *a, **k: pytest.fail("notebooks ran before the check"))
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path / "file"))
    code, _, err = run_cli("run", "01", "--output-dir", str(tmp_path / "out"))
    assert code == 1 and err == f"labkit run: {tmp_path / 'file'} is not a folder: expected a folder\n"


def test_run_help_examples_name_real_notebooks_and_parameters():
    from labkit.cli.main import build_parser
    from labkit.lab.runner import find_notebooks, load_profiles, notebook_parameters

    parser = build_parser()
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    examples = [line.split("#")[0].split() for line in run_parser.epilog.splitlines() if "labkit run" in line]
    assert len(examples) >= 4
    for words in examples:
        args = parser.parse_args(words[1:])  # parses as the command line it shows
        notebooks = find_notebooks(args.notebooks)  # each named notebook exists
        known = {name for nb in notebooks for name in notebook_parameters(nb)}
        for name, _ in args.parameter or []:
            assert name in known, f"{' '.join(words)}: no notebook of {args.notebooks} has a parameter {name!r}"
        assert args.profile in load_profiles()


def test_tp_with_a_missing_hub_model_fails_at_once_like_baseline(run_cli, monkeypatch):
    from labkit.model import loader

    monkeypatch.setattr(loader, "_hub_reachable", lambda *a, **k: False)  # this machine: no network
    for command in (["tp", "--nproc", "2", "bench"], ["baseline", "--no-save"]):
        code, _, err = run_cli(*command, "--model", "no-such/model-xyz")
        assert code == 2 and err.count("\n") == 1, err
        assert re.search(r"cannot load model 'no-such/model-xyz' from the Hugging Face Hub .*; offline, use the "
                         r"embedded default", err)
