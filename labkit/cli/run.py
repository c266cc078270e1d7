"""Execute the numbered notebooks (notebooks/NN_name.ipynb) top to bottom with papermill,
in order, stopping at the first failure. Parameters come from a profile in
notebooks/profiles.json, then from -p overrides (which win), and are injected after
the notebook's 'parameters' cell; a name no selected notebook has is an error. Executed
copies, failed ones included, go to runs/<run id>/ (or --output-dir), and so do the
results (data/) and figures (figures/) the notebooks write, so the git tree stays clean;
--refresh-reference writes them to the committed data/ and figures/ instead. --publish
(`make publish`) then publishes that one run: docs/notebooks/ (HTML and executed .ipynb,
each noting its profile and machine) and figures/ both come from it.
"""

from __future__ import annotations

import argparse
import sys

from labkit.cli.arguments import add_command, add_label_option, output_dir, positive_float
from labkit.lab.publish import docs_dir, publish, reference_figures_dir
from labkit.lab.results import check_writable, new_run_id
from labkit.lab.runner import (NotebookFailed, default_output_dir, find_notebooks, notebooks_dir, one_line,
                               output_environment, parse_value, run_notebooks)


def cmd_run(args: argparse.Namespace) -> int:
    """The `labkit run` command: 0 on success, else one `labkit run: ...` line on stderr and 1."""
    run_id = new_run_id()
    folder = args.output_dir or default_output_dir(run_id)
    where = output_environment(folder, args.refresh_reference, run_id, args.label)
    try:
        for name in ("LABKIT_DATA_DIR", "LABKIT_FIGURES_DIR"):  # before minutes of notebooks, not after
            check_writable(where[name], is_dir=True)
        paths = find_notebooks(args.notebooks)
        if not paths:
            raise ValueError(f"no numbered notebooks (NN_name.ipynb) in {notebooks_dir()}")
        parameters = {name: parse_value(value) for name, value in args.parameter or []}
        if args.publish:
            done = publish([str(p) for p in paths], profile=args.profile, parameters=parameters, run_dir=folder,
                           cell_timeout_s=args.cell_timeout, progress=not args.no_progress,
                           refresh_reference=args.refresh_reference, label=args.label, run_id=run_id)
            print(f"labkit run: published {len(done['notebooks'])} notebook(s) to {docs_dir()} and their figures "
                  f"to {reference_figures_dir()}, from the run in {folder}")
            return 0
        outputs = run_notebooks(paths, parameters, profile=args.profile, output_dir=folder,
                                cell_timeout_s=args.cell_timeout, progress=not args.no_progress,
                                refresh_reference=args.refresh_reference, label=args.label, run_id=run_id)
    except (NotebookFailed, ValueError) as exc:
        print(f"labkit run: {one_line(exc)}", file=sys.stderr)
        return 1
    print(f"labkit run: {len(outputs)} notebook(s) executed, copies in {outputs[0].parent}; results in "
          f"{where['LABKIT_DATA_DIR']} (run {run_id}), figures in {where['LABKIT_FIGURES_DIR']}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `labkit run` on the CLI's subparsers."""
    parser = add_command(subparsers, "run", cmd_run, __doc__,
                         help="execute notebooks headless through papermill",
                         epilog="examples:\n"
                                "  labkit run                       # every notebook, default parameters\n"
                                "  labkit run 01 05_batching        # two notebooks, by number or name\n"
                                "  labkit run 02 -p device cuda -p num_prompts 50\n"
                                "  labkit run --profile full        # the bigger settings for a GPU machine\n"
                                "  labkit run --refresh-reference   # rewrite the committed reference results\n"
                                "  labkit run --publish --profile publish   # docs/notebooks/ and figures/, one run",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                        help="number (01 or 1), name (01_baseline) or path of a notebook; default: all")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                        help="set a notebook parameter, overriding the profile; VALUE is read as "
                             "int/float/True/False/None or a JSON list/dict when it parses, else a string "
                             "(repeatable)")
    parser.add_argument("--profile", default="default",
                        help="parameter profile from notebooks/profiles.json (default: %(default)s)")
    parser.add_argument("--output-dir", type=output_dir, metavar="DIR",
                        help="executed copies, data/ and figures/ (default: runs/<run id>/, or in $LABKIT_RUNS_DIR)")
    parser.add_argument("--refresh-reference", action="store_true",
                        help="write results and figures to the committed data/ and figures/ (the reference "
                             "results) instead of the run folder")
    parser.add_argument("--publish", action="store_true",
                        help="publish the run: write docs/notebooks/ (HTML and executed .ipynb) and figures/ from "
                             "it, replacing the selected notebooks' earlier ones (make publish: --profile publish)")
    add_label_option(parser)
    parser.add_argument("--cell-timeout", type=positive_float, default=600, metavar="SECONDS",
                        help="fail a cell that runs longer than this (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser
