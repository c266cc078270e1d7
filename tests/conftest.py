"""Shared fixtures: the embedded model loaded once per session, tiny random models built in-process."""

import pytest
import torch

from labkit import cli
from labkit.model.loader import load_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path_factory, monkeypatch):
    """Each test writes results and figures into folders of its own: never the repository's data/ or figures/,
    and never the folders `make test` shares with the notebooks it runs under nbval."""
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    monkeypatch.setenv("LABKIT_FIGURES_DIR", str(tmp_path_factory.mktemp("figures")))


@pytest.fixture(scope="session")
def embedded():
    """The real SmolLM2-135M-Instruct (fp32, CPU), from the converted cache."""
    return load_model(device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer random Llama with the embedded tokenizer: fast, and text still round-trips."""
    return load_model("tiny-smollm2", dummy=True, device="cpu", dtype="fp32")


@pytest.fixture
def run_cli(capsys):
    """`labkit ARGV` in this process: run_cli(*argv) -> (exit status, stdout, stderr); argparse errors exit
    through SystemExit, which gives the status too."""

    def run(*argv):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
