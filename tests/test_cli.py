import subprocess
import sys

import pytest

from labkit import cli

COMMANDS = [["baseline"], ["run"], ["serve"], ["ping"], ["bench"], ["bench", "decode"], ["bench", "serve"],
            ["bench", "batching"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    assert "usage: labkit" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "bench" in out.stdout


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "frobnicate" in err[0]


def test_bench_decode_json_stdout_is_only_json(capsys, tmp_path):
    import json

    code = cli.main(["bench", "decode", "--model", "tiny-smollm2", "--dummy", "--engines", "labkit-fp32",
                     "--max-tokens", "4", "--repeats", "1", "--json", "--output", str(tmp_path / "b.json")])
    out = capsys.readouterr()
    assert code == 0
    rows = json.loads(out.out)
    assert {r["params"]["variant"] for r in rows} == {"hf-fp32", "labkit-fp32"}
    assert "tok/s" in out.err and json.loads((tmp_path / "b.json").read_text()) == rows
