"""A run folder as train.py leaves one, for the tests of what reads finished runs (plot.py,
the tables of runs, the paper's figures beside them)."""

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def write_run(folder: Path, log: dict | Sequence[dict], settings: dict | None = None) -> Path:
    """log.csv from `log` (columns by name, or rows), and args.json holding `settings` where
    they are given. Returns the folder."""
    folder.mkdir(parents=True)
    pd.DataFrame(log).to_csv(folder / "log.csv", index=False)
    if settings is not None:
        (folder / "args.json").write_text(json.dumps(settings))
    return folder
