"""Rows for the analysis and `labkit results` tests: two labelled runs of decode rows in the store."""

import warnings

from labkit.lab import results

ENV = {"cpu": "test-cpu", "gpu": None, "torch": "x"}


def decode_row(variant, batch_size, tokens_per_s):
    return results.make_row("decode", {"variant": variant, "engine": variant.split("-")[0], "batch_size": batch_size,
                                       "repeats": 3}, {"tokens_per_s": tokens_per_s, "ttft_ms": 5.0}, env=ENV)


def append_two_runs():
    """Runs "run-a" (label "before") and "run-b" ("after", 1.5x the tokens/s), four rows each; the store's frame."""
    before = [decode_row(v, b, 10.0 * b) for v in ("hf-fp32", "labkit-fp32") for b in (1, 4)]
    after = [decode_row(v, b, 15.0 * b) for v in ("hf-fp32", "labkit-fp32") for b in (1, 4)]
    results.append_rows(before, run_id="run-a", label="before")
    results.append_rows(after, run_id="run-b", label="after")
    return results.load_results()


def warnings_of(fn):
    """fn()'s value and the messages of the ResultsWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    return value, [str(w.message) for w in caught if issubclass(w.category, results.ResultsWarning)]
