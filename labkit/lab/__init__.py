"""The lab bench: results store and analysis, plots, notebook runner, timing statistics, the notebooks' setup."""

from labkit.lab.notebook import setup

__all__ = ["setup"]
