"""The notebooks' shared preamble as one call, `env = lab.setup(seed)`, and a progress bar for long cells."""

from __future__ import annotations


def setup(seed: int, device=None) -> dict:
    """Apply the "labkit" plot template, seed every generator (`device.seed_everything`), describe the
    environment (with `device`, a torch.device or its name, as the run's device; None names none), print it in
    one line and return it: the stamp that results rows carry."""
    # imported here: `import labkit.lab` must not pull in plotly or torch (the GPU check runs without plotly)
    from labkit.device import describe_environment, format_environment, seed_everything
    from labkit.lab.plots import apply_template

    apply_template()
    seed_everything(seed)
    env = describe_environment(device)
    print(format_environment(env))
    return env


def progress(iterable, desc: str, total: int | None = None):
    """`iterable` with a text progress bar on stderr for a long notebook cell: a plain tqdm bar (no widget), so
    it reads the same live in JupyterLab, in a papermill log and, collapsed to its last state, in a published
    page (`labkit.lab.publish` keeps only the text after a carriage return)."""
    import sys

    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, mininterval=1.0, dynamic_ncols=False, ncols=90)


__all__ = ["setup", "progress"]
