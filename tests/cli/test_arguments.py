"""labkit.cli.arguments and labkit.cli.reporting: every argument type's good and bad values, the one-line error,
the shared option blocks, and what a benchmark command does with its rows."""

import argparse
import json

import pytest

from labkit.cli import arguments as a
from labkit.cli.reporting import measure_and_report, report_rows
from labkit.lab import results


def _error(kind, text) -> str:
    with pytest.raises(argparse.ArgumentTypeError) as info:
        kind(text)
    return str(info.value)


@pytest.mark.parametrize("kind, text, value", [
    (a.positive_int, "1", 1), (a.positive_int, "007", 7), (a.positive_int, "99999999999999999999", 10**20 - 1),
    (a.non_negative_int, "0", 0), (a.non_negative_int, "12", 12),
    (a.seed, "0", 0), (a.seed, str(2**63 - 1), 2**63 - 1),
    (a.non_negative_float, "0", 0.0), (a.non_negative_float, "2.5", 2.5), (a.non_negative_float, "inf", float("inf")),
    (a.positive_float, "1e-3", 1e-3), (a.positive_float, "600", 600.0),
    (a.port, "0", 0), (a.port, "65535", 65535), (a.server_port, "1", 1), (a.server_port, "8000", 8000),
    (a.utf8_text, "café", "café"), (a.label, "  before fix ", "before fix"), (a.label, "x" * 100, "x" * 100),
])
def test_good_values_parse(kind, text, value):
    assert kind(text) == value


@pytest.mark.parametrize("kind, text, message", [
    (a.positive_int, "0", "expected a positive integer, got '0'"),
    (a.positive_int, "-3", "expected a positive integer, got '-3'"),
    (a.positive_int, "1.5", "expected a positive integer, got '1.5'"),
    (a.positive_int, "", "expected a positive integer, got ''"),
    (a.non_negative_int, "-1", "expected an integer >= 0, got '-1'"),
    (a.non_negative_int, "abc", "expected an integer >= 0, got 'abc'"),
    (a.seed, "-1", "expected a seed in 0..9223372036854775807, got '-1'"),
    (a.seed, str(2**63), f"expected a seed in 0..9223372036854775807, got '{2**63}'"),
    (a.seed, "x", "expected a seed in 0..9223372036854775807, got 'x'"),
    (a.non_negative_float, "abc", "expected a number, got 'abc'"),
    (a.non_negative_float, "-0.5", "expected a number >= 0, got '-0.5'"),
    (a.non_negative_float, "nan", "expected a number >= 0, got 'nan'"),
    (a.non_negative_float, "-inf", "expected a number >= 0, got '-inf'"),
    (a.positive_float, "abc", "expected a number, got 'abc'"),
    (a.positive_float, "0", "expected a finite number > 0, got '0'"),
    (a.positive_float, "-1", "expected a finite number > 0, got '-1'"),
    (a.positive_float, "inf", "expected a finite number > 0, got 'inf'"),
    (a.positive_float, "1e309", "expected a finite number > 0, got '1e309'"),
    (a.positive_float, "nan", "expected a finite number > 0, got 'nan'"),
    (a.port, "65536", "expected a port in 0..65535, got '65536'"),
    (a.port, "-1", "expected an integer >= 0, got '-1'"),
    (a.server_port, "0", "expected a port in 1..65535, got '0'"),
    (a.server_port, "70000", "expected a port in 0..65535, got '70000'"),
    (a.utf8_text, "caf\udce9", "expected UTF-8 text, got 'caf\\udce9'"),
    (a.label, " ", "expected one line of 1 to 100 characters, got ' '"),
    (a.label, "a\nb", "expected one line of 1 to 100 characters, got 'a\\nb'"),
    (a.label, "x" * 101, f"expected one line of 1 to 100 characters, got '{'x' * 101}'"),
    (a.label, "\udcff", "expected UTF-8 text, got '\\udcff'"),
])
def test_bad_values_name_what_was_expected_and_what_came(kind, text, message):
    assert _error(kind, text) == message


def test_comma_lists_parse_each_item():
    assert a.comma_list(a.positive_int)("1, 4,8,") == (1, 4, 8)
    assert a.comma_list(str)("static,continuous") == ("static", "continuous")
    assert _error(a.comma_list(str), " , ") == "expected a comma-separated list, got ' , '"
    assert _error(a.comma_list(a.positive_int), "1,,x") == "expected a positive integer, got 'x'"


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    assert a.output_file(str(tmp_path / "new" / "run.json")) == tmp_path / "new" / "run.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert a.output_dir(str(tmp_path / "runs")) == tmp_path / "runs"
    assert _error(a.output_file, " ") == "expected a path, got ''"
    assert "is a file, not a folder" in _error(a.output_file, str(tmp_path / "file" / "run.json"))
    assert "expected a file" in _error(a.output_file, str(tmp_path))
    assert "expected a folder" in _error(a.output_dir, str(tmp_path / "file"))


def test_the_parser_reports_an_error_in_one_line(capsys):
    parser = a.Parser(prog="labkit demo")
    parser.add_argument("--repeats", type=a.positive_int)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--repeats", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err == "labkit demo: argument --repeats: expected a positive integer, got '0'\n"


def _command(*add, argv=()):
    """A parser with one command `demo` built by `add(parser)` for each helper; its parsed argv."""
    root = a.Parser(prog="labkit")
    sub = root.add_subparsers(dest="command", required=True)
    parser = a.add_command(sub, "demo", lambda args: 0, "What demo does.", help="one line")
    for add_options in add:
        add_options(parser)
    return root, root.parse_args(["demo", *argv])


def test_add_command_registers_the_handler_help_and_description():
    root, args = _command()
    assert args.func(args) == 0
    (sub,) = [x for x in root._actions if isinstance(x, argparse._SubParsersAction)]
    assert sub.choices["demo"].description == "What demo does."
    assert [c.help for c in sub._choices_actions] == ["one line"]


def test_model_options_default_to_the_embedded_model_on_auto():
    from labkit.model.loader import EMBEDDED_MODEL

    _, args = _command(a.add_model_options)
    assert (args.model, args.dummy, args.device) == (EMBEDDED_MODEL, False, "auto")
    _, args = _command(lambda p: a.add_model_options(p, device_help=None), argv=["--dummy", "--model", "tiny"])
    assert (args.model, args.dummy, hasattr(args, "device")) == ("tiny", True, False)


def test_run_output_options_with_and_without_an_output_file(tmp_path):
    _, args = _command(lambda p: a.add_run_output_options(p, "bench_x.json"),
                       argv=["--output", str(tmp_path / "x.json"), "--label", "try", "--json", "--no-save"])
    assert (args.output, args.label, args.json, args.no_save, args.no_progress) == \
        (tmp_path / "x.json", "try", True, True, False)
    _, args = _command(lambda p: a.add_run_output_options(p, None, progress=False))
    assert not hasattr(args, "output") and not hasattr(args, "no_progress") and args.label is None


def _rows():
    return [results.make_row("demo", {"n": n}, {"tokens_per_s": float(n)}, env={"cpu": "test"}) for n in (1, 2)]


def _args(tmp_path, **kwargs):
    return argparse.Namespace(**{"label": "L", "no_save": False, "json": False, "output": None, **kwargs})


def test_report_rows_stores_writes_the_run_and_prints_the_table(tmp_path, capsys):
    assert report_rows(_rows(), _args(tmp_path), "bench_demo.json", lambda rows: f"{len(rows)} rows") == 0
    out = capsys.readouterr()
    assert out.out == "2 rows\n"
    assert out.err.startswith(f"results: {results.store_path()}, {results.data_dir() / 'bench_demo.json'} (run ")
    stored = results.read_rows()
    assert [r["params"]["n"] for r in stored] == [1, 2] and {r["label"] for r in stored} == {"L"}
    assert json.loads((results.data_dir() / "bench_demo.json").read_text()) == stored


def test_report_rows_with_json_and_without_saving(tmp_path, capsys):
    assert report_rows(_rows(), _args(tmp_path, json=True, no_save=True), "bench_demo.json", "the table") == 0
    out = capsys.readouterr()
    assert out.err == "the table\n" and [r["label"] for r in json.loads(out.out)] == ["L", "L"]
    assert results.read_rows() == [] and not (results.data_dir() / "bench_demo.json").exists()


def test_report_rows_without_a_run_file_writes_only_the_store(tmp_path, capsys):
    report_rows(_rows(), _args(tmp_path, output=tmp_path / "never.json"), None, "t")
    assert len(results.read_rows()) == 2 and not (tmp_path / "never.json").exists()


def test_measure_and_report_checks_the_store_before_measuring(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path / "file"))

    def measure():
        raise AssertionError("measured before the store was checked")

    with pytest.raises(ValueError, match="is a file, not a folder"):
        measure_and_report(_args(tmp_path), measure, "bench_demo.json", "t")
    assert measure_and_report(_args(tmp_path, no_save=True), _rows, "bench_demo.json", "t") == 0
    assert capsys.readouterr().out == "t\n"
