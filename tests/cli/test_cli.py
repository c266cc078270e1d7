"""The command line: help everywhere, --version, and bad values as one line on stderr, never a traceback."""

import argparse
import importlib
import json
import subprocess
import sys

import pytest

from labkit import cli

REGISTRY = importlib.import_module("labkit.cli.main")  # the module (`labkit.cli.main` is also the function)
# every registered command, so that a new one cannot go without --help
COMMANDS = [*([name] for name in REGISTRY.COMMANDS), ["bench"], *(["bench", name] for name in REGISTRY.BENCH_COMMANDS),
            ["spec", "train"], ["tp", "generate"], ["tp", "bench"]]


def assert_one_line_error(code, err, *needles, status=2):
    lines = err.strip().splitlines()
    assert code == status, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    assert "usage: labkit" in capsys.readouterr().out


def test_version(run_cli):
    from labkit import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"labkit {__version__}"


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "bench" in out.stdout and "results" in out.stdout


def test_unknown_command_is_one_line(run_cli):
    code, _, err = run_cli("frobnicate")
    assert_one_line_error(code, err, "frobnicate")


def _options(parser, prefix=()):
    """(command words, option, action) for every option that takes a value, in every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*prefix, name))
        elif action.option_strings and action.nargs != 0 and action.dest != "help":
            yield prefix, action.option_strings[-1], action


OPTIONS = list(_options(cli.build_parser()))
BAD_VALUES = ["", "abc", "-1", "nan", "-inf", "1e309", "99999999999999999999", "\udcff", ",", "1,,x"]


@pytest.mark.parametrize("words, option, action", OPTIONS, ids=[f"{' '.join(w)} {o}" for w, o, _ in OPTIONS])
def test_no_option_value_gives_a_traceback_while_parsing(words, option, action, capsys):
    parser = cli.build_parser()
    for value in BAD_VALUES:
        argv = [*words, option, *([value] * (action.nargs if isinstance(action.nargs, int) else 1))]
        try:
            parser.parse_args(argv)  # accepted: the command itself checks it (tests below and per command)
        except SystemExit as exc:
            assert_one_line_error(exc.code, capsys.readouterr().err, option)


@pytest.mark.parametrize("argv, needles", [
    (["baseline", "--seed", "99999999999999999999"], ["--seed"]),
    (["baseline", "--prompt", "caf\udce9"], ["--prompt", "UTF-8"]),
    (["baseline", "--repeats", "0"], ["--repeats"]),
    (["baseline", "--label", " "], ["--label"]),
    (["bench", "decode", "--batch-sizes", "1,,x"], ["--batch-sizes", "'x'"]),
    (["bench", "decode", "--engines", "turbo"], ["'turbo'"]),
    (["bench", "decode", "--device", "tpu"], ["'tpu'"]),
    (["bench", "decode", "--prompt", " "], ["--prompt"]),
    (["bench", "batching", "--max-num-seqs", "0"], ["--max-num-seqs"]),
    (["run", "--cell-timeout", "-1"], ["--cell-timeout", "'-1'"]),
    (["run", "--cell-timeout", "inf"], ["--cell-timeout"]),
    (["results", "--compare", "colour"], ["--compare"]),
    (["serve", "--port", "70000"], ["--port"]),
    (["bench", "serve", "--port", "99999"], ["--port"]),
])
def test_bad_values_are_one_line(argv, needles, run_cli):
    code, _, err = run_cli(*argv)
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("command", [["bench", "decode"], ["bench", "batching"]], ids=" ".join)
def test_a_bad_output_path_fails_before_the_work(command, run_cli, tmp_path, monkeypatch):
    import labkit.model.loader

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load before the output path is checked")

    monkeypatch.setattr(labkit.model.loader, "load_model", no_loading)
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(*command, "--output", str(tmp_path / "file" / "run.json"))
    assert_one_line_error(code, err, "--output", "is a file, not a folder")
    code, _, err = run_cli(*command, "--output", str(tmp_path))
    assert_one_line_error(code, err, "--output", "expected a file")


@pytest.mark.parametrize("command", [["baseline"], ["bench", "decode"], ["bench", "batching"]], ids=" ".join)
def test_an_unwritable_results_store_fails_before_the_work(command, run_cli, tmp_path, monkeypatch):
    from labkit.bench import baseline
    from labkit.bench import decode as bench_decode
    from labkit.cli import bench_batching

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load before the store is checked")

    for module in (baseline, bench_decode, bench_batching):
        monkeypatch.setattr(module, "load_model", no_loading)
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path / "file"))
    code, _, err = run_cli(*command, "--model", "tiny-smollm2", "--dummy")
    assert_one_line_error(code, err, "is a file, not a folder")


def test_llama_cpp_asked_for_but_not_installed_names_the_install(run_cli, monkeypatch):
    from labkit.bench import decode as bench_decode

    monkeypatch.setattr(bench_decode, "llama_cpp_available", lambda: False)
    code, _, err = run_cli("bench", "decode", "--engines", "llama.cpp", "--no-save")
    assert_one_line_error(code, err, "llama-cpp-python", "pip install")


def test_bench_decode_json_stdout_is_only_json_with_label_and_progress(capsys, tmp_path):
    code = cli.main(["bench", "decode", "--model", "tiny-smollm2", "--dummy", "--engines", "labkit-fp32",
                     "--max-tokens", "4", "--repeats", "1", "--batch-sizes", "1", "--json", "--label", "try 1",
                     "--output", str(tmp_path / "new" / "b.json")])
    out = capsys.readouterr()
    assert code == 0
    rows = json.loads(out.out)
    assert {r["params"]["variant"] for r in rows} == {"hf-fp32", "labkit-fp32"}
    assert {r["label"] for r in rows} == {"try 1"} and len({r["run_id"] for r in rows}) == 1
    assert "tok/s" in out.err and "bench decode" in out.err  # the table and the progress bar
    assert json.loads((tmp_path / "new" / "b.json").read_text()) == rows
    from labkit.lab.results import load_results

    stored = load_results()
    assert list(stored["label"]) == ["try 1"] * 2 and set(stored["env.device"]) == {"cpu"}
