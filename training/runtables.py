"""Runs grouped by their settings except the seed: each group's test errors as mean ± std
over its seeds, beside the paper's figure (`plot.py --table`), and its curves as a mean
with a min-max band (training/figures.py). Torch-free, like plot.py.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from training import paper

# Settings that do not make runs different experiments: the seed, how this invocation ran
# (settings.INVOCATION and the run's own switches), the device's speed choices
# (recipes.device_defaults, and the timing behind the CPU's compile choice) and other paths
# to the same numbers, the machine, and what is derived from the settings (paper_*).
NOT_COMPARED = frozenset({
    "seed",
    "resume", "device", "evaluate", "pretrained", "export", "save", "plot", "tensorboard",
    "data_dir", "workers",
    "amp", "channels_last", "compile", "compile_mode", "device_chose", "compile_measured",
    "memory_efficient", "shared_stats", "deterministic",
    "torch", "host",
})  # fmt: skip
# Settings the model and data columns show already.
SHOWN = ("model", "dirac_version", "arch", "depth", "growth", "bottleneck", "compression",
         "width", "dataset", "augment")  # fmt: skip


class RunError(Exception):
    """A run folder that cannot be tabulated; the message is one line for the user."""


@dataclass
class Run:
    """One run folder: its settings (args.json) and its log (log.csv)."""

    folder: Path
    settings: dict
    log: pd.DataFrame

    @property
    def epochs_done(self) -> int:
        return int(self.log["epoch"].iloc[-1]) if len(self.log) else 0

    @property
    def finished(self) -> bool:
        """Whether the log reaches the run's last epoch (a run still running, or stopped,
        does not)."""
        return self.epochs_done >= int(self.settings.get("epochs") or 0) > 0

    @property
    def progress(self) -> str:
        return f"{self.epochs_done} of {self.settings.get('epochs')} epochs"

    @property
    def final_test_err(self) -> float:
        return float(self.log["test_err"].iloc[-1])

    @property
    def best_val_test_err(self) -> float | None:
        """The test error at the (first) epoch of lowest validation error; None without
        a validation split."""
        row = best_val_row(self.log)
        return None if row is None else float(row["test_err"])


def best_val_row(log: pd.DataFrame) -> pd.Series | None:
    """The log's row at the first epoch of lowest validation error, as best.pt holds it;
    None when the log has no validation error."""
    if "val_err" not in log.columns or not log["val_err"].notna().any():
        return None
    return log.loc[log["val_err"].idxmin()]


def read_settings(folder: Path) -> dict | None:
    """args.json of a run folder; None when it is missing or not a JSON object."""
    try:
        settings = json.loads((folder / "args.json").read_text())
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def load_run(folder: Path) -> Run:
    """A run folder with readable args.json and log.csv; RunError says what is wrong."""
    settings = read_settings(folder)
    if settings is None:
        raise RunError(f"{folder}: no readable args.json")
    try:
        log = pd.read_csv(folder / "log.csv")
    except FileNotFoundError:
        raise RunError(f"{folder}: no log.csv") from None
    except (OSError, ValueError) as e:  # pandas' EmptyDataError and ParserError included
        raise RunError(f"{folder}: unreadable log.csv ({type(e).__name__})") from None
    numeric = log.apply(pd.to_numeric, errors="coerce")
    if not {"epoch", "test_err"} <= set(log.columns) or numeric.isna().to_numpy().any():
        raise RunError(
            f"{folder}: corrupt log.csv (no epoch or test_err column, or a value that is no number)"
        )
    return Run(folder, settings, numeric)


def load_runs(folders: Sequence[Path]) -> list[Run]:
    """Each folder once, in the order given."""
    seen: dict[Path, Path] = {}
    for folder in folders:
        seen.setdefault(Path(folder).resolve(), Path(folder))
    return [load_run(folder) for folder in seen.values()]


def key(settings: dict) -> str:
    """What runs of one experiment share: every setting but NOT_COMPARED ones."""
    kept = {
        k: v for k, v in settings.items() if k not in NOT_COMPARED and not k.startswith("paper_")
    }
    return json.dumps(kept, sort_keys=True)


def group(runs: Sequence[Run]) -> list[list[Run]]:
    """The runs grouped by key(), groups and runs in the order first seen."""
    groups: dict[str, list[Run]] = {}
    for run in runs:  # a run without settings is a group of its own
        groups.setdefault(
            key(run.settings) if run.settings else str(run.folder.resolve()), []
        ).append(run)
    return list(groups.values())


def model_name(s: dict) -> str:
    """The network in the papers' terms: DenseNet-BC-100-12 (B: bottleneck, C: compression),
    DiracNet-34-2, or the ImageNet architecture."""
    if s.get("dataset") == "imagenet" and s.get("arch"):
        return s["arch"]
    if s.get("model") == "diracnet":
        version = "-v1" if s.get("dirac_version") == 1 else ""
        return f"DiracNet{version}-{s.get('depth')}-{s.get('width', 1):g}"
    variant = "B" * bool(s.get("bottleneck")) + "C" * ((s.get("compression") or 1) < 1)
    return f"DenseNet{'-' * bool(variant)}{variant}-{s.get('depth')}-{s.get('growth')}"


def data_name(s: dict) -> str:
    """Table 2's column (C10+, C100, SVHN), else the dataset with + for augmentation."""
    return paper.column(s) or f"{s.get('dataset')}{'+' * bool(s.get('augment'))}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values) if values else math.nan
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def summary(runs: list[Run], varying: Sequence[str]) -> dict:
    """One group's row: finished runs' final-epoch test error (and best-validation test
    error) as mean and sample std, the paper's figure and the difference, and the
    unfinished runs, which are not averaged."""
    s = runs[0].settings
    done = [r for r in runs if r.finished]
    final = _mean_std([r.final_test_err for r in done])
    best = _mean_std([r.best_val_test_err for r in done if r.best_val_test_err is not None])
    found = paper.lookup(s)
    ours = best[0] if found and found.reported == "best_val" else final[0]
    return {
        "model": model_name(s), "data": data_name(s),
        "settings": ", ".join(f"{k} {json.dumps(s.get(k))}" for k in varying),
        "runs": " ".join(r.folder.name for r in runs),
        "seeds": " ".join(str(r.settings.get("seed")) for r in done), "n": len(done),
        "final_test_err": final[0], "final_test_err_std": final[1],
        "best_val_test_err": best[0], "best_val_test_err_std": best[1],
        "paper_test_err": found.test_err if found else math.nan,
        "paper_reported": found.reported if found else "",
        "paper_differs": ", ".join(found.differs) if found else "",
        "difference": ours - found.test_err if found else math.nan,
        "unfinished": " ".join(f"{r.folder.name} ({r.progress})" for r in runs if not r.finished),
    }  # fmt: skip


def table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per group; "settings" names what differs between the groups beyond the
    model and data columns."""
    groups = group(runs)
    keys = sorted({k for g in groups for k in g[0].settings} - NOT_COMPARED - set(SHOWN))
    varying = [k for k in keys if not k.startswith("paper_")
               and len({json.dumps(g[0].settings.get(k)) for g in groups}) > 1]  # fmt: skip
    return pd.DataFrame([summary(g, varying) for g in groups])


def _pm(mean: float, std: float, n: int | None = None) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")
    return text + ("" if n is None else f" ({n})")


def markdown(df: pd.DataFrame) -> str:
    """The table for a README: errors in %, mean ± sample std over seeds (n finished)."""
    head = (
        "| model | data | settings | final test error (n) | best-val test error | paper "
        "| difference | unfinished |\n|---|---|---|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for r in df.itertuples():
        figure = "–" if math.isnan(r.paper_test_err) else f"{r.paper_test_err:.2f}"
        if r.paper_reported == "best_val":
            figure += " (best val)"
        if r.paper_differs:
            figure += f" at {r.paper_differs}"
        diff = "–" if math.isnan(r.difference) else f"{r.difference:+.2f}"
        cells = (r.model, r.data, r.settings, _pm(r.final_test_err, r.final_test_err_std, r.n),
                 _pm(r.best_val_test_err, r.best_val_test_err_std), figure, diff, r.unfinished or "–")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def band(runs: list[Run]) -> tuple[str, pd.DataFrame]:
    """Several seeds' legend label and their log to draw: the mean of each column per epoch,
    with <column>_min and <column>_max beside it (the band, min-max over the seeds that
    reached the epoch)."""
    stacked = pd.concat([r.log for r in runs]).groupby("epoch", sort=True)
    mean, low, high = (f(numeric_only=True) for f in (stacked.mean, stacked.min, stacked.max))
    merged = pd.concat([mean, low.add_suffix("_min"), high.add_suffix("_max")], axis=1)
    if "lr" in merged.columns:  # the seeds' common lr, not a mean that rounds differently
        merged["lr"] = low["lr"]
    unfinished = sum(not r.finished for r in runs)
    note = f", {unfinished} unfinished" if unfinished else ""
    s = runs[0].settings
    label = f"{model_name(s)} {data_name(s)}: mean of {len(runs)} seeds{note}, band min-max"
    return label, merged.reset_index()
