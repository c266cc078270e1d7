"""`lab.setup(seed)`: the notebooks' preamble in one call."""

import plotly.io as pio
import pytest
import torch

from labkit import lab
from labkit.device import format_environment
from labkit.lab import plots


@pytest.fixture(autouse=True)
def _plotly_default(monkeypatch):
    """setup() makes the labkit template plotly's default: put the old default back for the tests after these."""
    monkeypatch.setattr(pio.templates, "default", "plotly")


def test_setup_applies_the_template_seeds_and_prints_the_environment(capsys):
    env = lab.setup(7)
    first = torch.rand(3)
    assert pio.templates.default == plots.TEMPLATE_NAME
    assert capsys.readouterr().out == format_environment(env) + "\n"
    assert env["torch"] and env["cpu"] and env["device"] is None
    lab.setup(7)
    assert torch.equal(torch.rand(3), first)  # seeded: the same numbers again
    capsys.readouterr()


def test_setup_names_the_device_it_is_given(capsys):
    env = lab.setup(0, device="cpu")
    assert env["device"] == "cpu" and "cpu" in capsys.readouterr().out


def test_importing_the_lab_package_is_light():
    import subprocess
    import sys

    code = "import sys; import labkit.lab; assert 'plotly' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
