"""The lab bench: results store and analysis, plots, notebook runner, timing statistics, notebook setup, progress."""

from labkit.lab.notebook import progress, setup

__all__ = ["progress", "setup"]
