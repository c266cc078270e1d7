"""The lab bench: results store, plots, notebook runner, timing statistics."""
