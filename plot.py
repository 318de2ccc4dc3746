#!/usr/bin/env python3
"""Plot loss and error curves of one or more training runs from their log.csv files.

Usage: plot.py RUN_DIR [RUN_DIR ...] [--out DIR] [--pdf] [--table]
Writes loss.png and error.png (plus .pdf with --pdf). Safe on runs still in progress.
The error plot marks each run's reported result: the final epoch's test error, or with a
validation split the test error at the epoch of lowest validation error. Runs that differ
only in their seed are drawn as their mean with a min-max band; --table also prints their
errors as mean ± std beside the paper's (markdown) and writes them to table.csv.
"""

import argparse
import sys
from pathlib import Path

from training import files, runtables
from training.figures import plot_runs, save_table


def build_parser() -> argparse.ArgumentParser:
    """The command line: run folders, --out, --pdf."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folder(s) holding log.csv"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: the run folder when one run is given, "
        "else the current directory)",
    )
    parser.add_argument("--pdf", action="store_true", help="also write PDF versions")
    parser.add_argument(
        "--table",
        action="store_true",
        help="also group the runs by their settings except the seed: final-epoch (and "
        "best-validation) test error as mean ± std over seeds beside the paper's, as "
        "markdown on stdout and table.csv in the output folder",
    )
    return parser


def error(msg: str) -> int:
    """Print a one-line error on stderr; return the exit code 1."""
    print(f"plot.py: error: {msg}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    missing = [str(run) for run in args.runs if not run.is_dir()]
    if missing:
        return error(f"no such run folder: {', '.join(missing)}")
    try:  # every run is checked before anything is written
        table = runtables.table(runtables.load_runs(args.runs)) if args.table else None
    except runtables.RunError as e:
        return error(f"--table: {e}")
    try:
        out = files.output(
            args.out or (args.runs[0] if len(args.runs) == 1 else Path.cwd()), "--out", folder=True
        )
    except files.OutputError as e:
        return error(str(e))
    try:
        written = plot_runs(args.runs, out.path, pdf=args.pdf)
        if table is not None and written:
            written.append(save_table(table, out.path / "table.csv"))
    except OSError as e:  # e.g. the disk full
        out.undo()
        return error(f"cannot write the figures in {out.path} ({e.strerror or e})")
    if not written:
        out.undo()
        return error("no run has any logged epochs to plot")
    if table is not None:  # stdout is the table alone
        print(runtables.markdown(table))
    for path in written:
        print(path, file=sys.stdout if table is None else sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
