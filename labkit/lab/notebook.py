"""The notebooks' shared preamble as one call: `env = lab.setup(seed)`."""

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


__all__ = ["setup"]
