"""The parent side of `labkit tp` and the ranks' options: typed options that travel as JSON, the torchrun launch
(with a stand-in program: rank 0's result back, its one-line error, a crash's log tail), and the command line's
defaults against the library's."""

import json
import sys
import textwrap

import pytest

from labkit.cli.tp import action_options
from labkit.parallel.distributed import DEFAULT_ALL_REDUCE_BYTES, LaunchConfig
from labkit.parallel.launch import LaunchError, check_split, launch
from labkit.parallel.worker import BenchOptions, GenerateOptions, from_json, worker_options
from labkit.parallel.tp import TensorParallelError


@pytest.mark.parametrize("options", [GenerateOptions(prompt="hi", temperature=0.7, chat=True),
                                     BenchOptions(world_sizes=[1, 2], batch_sizes=[1, 4], all_reduce_bytes=[1024])])
def test_options_travel_as_json_and_come_back_equal(options):
    payload = json.loads(json.dumps(options.to_json()))
    assert payload["action"] == options.action
    assert from_json(payload) == options


def test_bench_options_hold_tuples_and_the_sweep_default():
    options = BenchOptions(world_sizes=[2, 1])
    assert options.world_sizes == (2, 1) and options.batch_sizes == (1,)
    assert options.all_reduce_bytes == DEFAULT_ALL_REDUCE_BYTES and options.world_sizes is not None


@pytest.mark.parametrize("make, message", [
    (lambda: BenchOptions(repeats=0), "repeats must be an integer >= 1, got 0"),
    (lambda: BenchOptions(batch_sizes=(1, 0)), "batch_sizes must be an integer >= 1, got 0"),
    (lambda: GenerateOptions(max_tokens=True), "max_tokens must be an integer >= 1, got True"),
    (lambda: GenerateOptions(seed=-1), "seed must be an integer >= 0, got -1"),
    (lambda: GenerateOptions(quantize="int3"), "unknown quantization 'int3'"),
    (lambda: GenerateOptions(linear_layout="mk"), "unknown linear layout 'mk'"),
    (lambda: from_json({"action": "train"}), "unknown action 'train'"),
])
def test_bad_options_are_refused_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("action, cls", [("generate", GenerateOptions), ("bench", BenchOptions)])
def test_the_command_lines_defaults_are_the_options_defaults(action, cls):
    assert action_options([action]) == cls()
    assert action_options(["bench", "--world-sizes", "1,2", "--max-tokens", "6"]) == BenchOptions(
        world_sizes=(1, 2), max_tokens=6)


def test_worker_options_read_the_options_file_and_set_the_threads(tmp_path):
    import torch

    before = torch.get_num_threads()
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps(GenerateOptions(max_tokens=5).to_json()))
    try:
        own, options = worker_options(["--result-file", str(tmp_path / "r.json"), "--args-file", str(args_file),
                                       "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert own.result_file == tmp_path / "r.json" and options == GenerateOptions(max_tokens=5)


def test_check_split_refuses_before_any_process_starts():
    assert "6q/2kv + 3q/1kv" in check_split(GenerateOptions(), 2)  # the embedded model's 9 heads, unevenly
    with pytest.raises(TensorParallelError, match="cannot be split over 2 ranks"):
        check_split(GenerateOptions(even_heads=True), 2)


@pytest.mark.parametrize("argv, message", [
    (["tp", "--nproc", "2"], "labkit tp: choose an action: generate or bench (labkit tp --help)"),
    (["tp", "--nproc", "2", "bench", "--model", "tiny-llama", "--dummy", "--world-sizes", "1,4", "--no-save"],
     "labkit tp: --world-sizes 1,4: 4 is more than the 2 ranks launched (--nproc)"),
    (["tp", "--nproc", "2", "--nnodes", "2", "generate"], "labkit tp: nnodes=2 needs a rendezvous"),
])
def test_labkit_tp_refuses_bad_launches_in_one_line_before_starting_ranks(argv, message, capsys):
    from labkit import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


# a stand-in for the worker: rank 0 writes what the prompt asks for, as the worker would
FAKE_WORKER = textwrap.dedent("""
    import json, sys
    from labkit.parallel.worker import worker_options
    from labkit.lab.results import write_json_atomic

    own, options = worker_options(sys.argv[1:])
    if options.prompt == "crash":
        print("rank 0: something broke", file=sys.stderr)
        sys.exit(3)
    result = {"error": "bad input, one line"} if options.prompt == "error" else {"rows": [], "text": options.prompt}
    write_json_atomic(own.result_file, result)
""")


@pytest.mark.slow
def test_launch_returns_rank_0s_result_its_error_or_the_log_tail(tmp_path):
    program = tmp_path / "fake_worker.py"
    program.write_text(FAKE_WORKER)
    config = LaunchConfig(nproc=1, threads_per_rank=1)
    logged = []
    result = launch(GenerateOptions(prompt="hello"), config, log=logged.append, timeout_s=300, program=str(program))
    assert result == {"rows": [], "text": "hello"}
    assert logged == ["starting 1 ranks with torchrun for generate"]
    with pytest.raises(ValueError, match="^bad input, one line$"):
        launch(GenerateOptions(prompt="error"), config, timeout_s=300, program=str(program))
    crash = r"(?s)^torchrun exited with status \d+; the ranks. last lines:.*exitcode\s*: 3"
    with pytest.raises(LaunchError, match=crash):
        launch(GenerateOptions(prompt="crash"), config, timeout_s=300, program=str(program))
