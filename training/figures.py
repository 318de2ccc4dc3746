"""The figures of training runs, from their log.csv files: loss and error curves, one colour
a run and one line style a split, each run's reported result marked, runs that differ only
in their seed as their mean with a min-max band. plot.py draws them on the command line;
Background redraws them after each epoch of train.py. Torch-free.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from training import files, runtables

# The command that redraws a run's figures (Background runs it in a child process).
PLOT = Path(__file__).resolve().parents[1] / "plot.py"
# Error axes switch to log scale when the largest plotted error exceeds this many
# times the smallest positive one (e.g. 80% at epoch 1 vs 4% at the end).
LOG_SPAN = 10.0
SPLITS = {"train": "--", "val": "-", "test": "-"}  # line style per split
SPLIT_ALPHA = {"train": 1.0, "val": 0.55, "test": 1.0}  # val is a lighter solid line


def warn(msg: str) -> None:
    """Print a one-line warning on stderr."""
    print(f"plot.py: warning: {msg}", file=sys.stderr)


def load_log(run_dir: Path) -> pd.DataFrame | None:
    """Read run_dir/log.csv; None (with a warning) when it is missing or has no rows yet."""
    path = run_dir / "log.csv"
    if not path.is_file():
        warn(f"skipping {run_dir}: no log.csv")
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        warn(f"skipping {run_dir}: unreadable log.csv ({type(e).__name__})")
        return None
    if df.empty or "epoch" not in df.columns:
        warn(f"skipping {run_dir}: log.csv has no data rows yet")
        return None
    return df


def run_label(run_dir: Path) -> str:
    """Legend label: the folder name, plus dataset/depth/growth from args.json when present."""
    name = run_dir.resolve().name
    try:
        args = json.loads((run_dir / "args.json").read_text())
    except (OSError, ValueError):
        return name
    if not isinstance(args, dict):
        return name
    # DenseNet: depth L and growth rate k; DiracNet: depth and width multiplier
    second = ("width", "width ") if args.get("model") == "diracnet" else ("growth", "k=")
    keys = {"dataset": "", "depth": "L=", second[0]: second[1]}
    extra = " ".join(f"{prefix}{args[k]:g}" if isinstance(args.get(k), float) else f"{prefix}{args[k]}"
                     for k, prefix in keys.items() if args.get(k) is not None)  # fmt: skip
    return f"{name} ({extra})" if extra else name


class Reported(NamedTuple):
    """The run's reported result: the test error (%) of one epoch, and how it was chosen."""

    epoch: int
    test_err: float
    label: str


def reported_point(df: pd.DataFrame) -> Reported | None:
    """The final epoch's test error; with a val_err column, the test error at the epoch of
    lowest validation error (the first such epoch), as the trainer reports. None if no row
    has both."""
    if "test_err" not in df.columns:
        return None
    row = runtables.best_val_row(df)
    if row is not None:
        label = "best val epoch {}: test {:.2f} %"
    else:
        rows = df[df["test_err"].notna()]
        if rows.empty:
            return None
        row, label = rows.iloc[-1], "final epoch {}: {:.2f} %"
    if pd.isna(row["test_err"]):
        return None
    epoch, error = int(row["epoch"]), float(row["test_err"])
    return Reported(epoch, error, label.format(epoch, error))


def mark_reported(ax: Axes, runs: list[tuple[str, pd.DataFrame]]) -> list[Line2D]:
    """Mark each run's reported point on ax, in the run's colour; return the markers."""
    markers = []
    for i, (_, df) in enumerate(runs):
        point = reported_point(df)
        if point is not None:
            style = {"marker": "*", "markersize": 13, "markeredgecolor": "k", "zorder": 3}
            (marker,) = ax.plot([point.epoch], [point.test_err], color=f"C{i % 10}",
                                linestyle="none", label=point.label, **style)  # fmt: skip
            markers.append(marker)
    return markers


def plot_metric(
    ax: Axes, runs: list[tuple[str, pd.DataFrame]], metric: str, log_rule: bool
) -> None:
    """Draw `<split>_<metric>` for every run on ax: one colour per run, style per split."""
    values = []
    for i, (_, df) in enumerate(runs):
        color = f"C{i % 10}"
        marker = "o" if len(df) < 3 else None  # a lone point draws no line segment
        for split, style in SPLITS.items():
            col = f"{split}_{metric}"
            if col in df.columns and df[col].notna().any():
                ax.plot(
                    df["epoch"],
                    df[col],
                    style,
                    color=color,
                    alpha=SPLIT_ALPHA[split],
                    marker=marker,
                    linewidth=1.3,
                )
                values.extend(df[col].dropna().tolist())
                values.extend(draw_band(ax, df, col, color, SPLIT_ALPHA[split]))
        if "lr" in df.columns:  # mark a step schedule's drops with faint vertical lines
            drops = df["epoch"][df["lr"] < df["lr"].shift()]
            stepped = len(drops) <= len(df) / 2  # under cosine the lr falls every epoch
            for epoch in drops if stepped else []:
                ax.axvline(epoch, color=color, linestyle=":", alpha=0.3)
    positive = [v for v in values if v > 0]
    if positive and (not log_rule or max(positive) > LOG_SPAN * min(positive)):
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.grid(True, which="both", alpha=0.3)


def draw_band(ax: Axes, df: pd.DataFrame, col: str, color: str, alpha: float) -> list[float]:
    """Shade between <col>_min and <col>_max where a group of seeds has them; return the
    shaded values (for the choice of scale)."""
    low, high = f"{col}_min", f"{col}_max"
    if low not in df.columns or high not in df.columns:
        return []
    ax.fill_between(df["epoch"], df[low], df[high], color=color, alpha=0.2 * alpha, linewidth=0)
    return [*df[low].dropna(), *df[high].dropna()]


def add_legend(
    ax: Axes, runs: list[tuple[str, pd.DataFrame]], metric: str, marked: Sequence[Line2D] = ()
) -> None:
    """Legend: one colour entry per run, one line-style entry per split present, then the
    marked points with their labels."""
    handles = [Line2D([], [], color=f"C{i % 10}") for i in range(len(runs))]
    labels = [label for label, _ in runs]
    for split, style in SPLITS.items():
        if any(f"{split}_{metric}" in df.columns for _, df in runs):
            handles.append(Line2D([], [], linestyle=style, color="k", alpha=SPLIT_ALPHA[split]))
            labels.append(split)
    handles += marked
    labels += [marker.get_label() for marker in marked]
    ax.legend(handles, labels, fontsize="small")


def save_atomic(fig: Figure, path: Path) -> None:
    """Save fig in path's format, atomically (files.atomic_write): readers never see half a file."""
    files.atomic_write(
        path, lambda f: fig.savefig(f, format=path.suffix[1:], dpi=120, bbox_inches="tight")
    )


def save_table(table: pd.DataFrame, path: Path) -> Path:
    """Write the --table CSV atomically (files.atomic_write)."""
    files.atomic_write(path, lambda f: table.to_csv(f, index=False), mode="w")
    return path


def plot_runs(run_dirs: Sequence[Path | str], out_dir: Path | str, pdf: bool = False) -> list[Path]:
    """Write loss and error plots for the runs with data into out_dir (a folder that
    exists); return the written paths.

    Runs without data are skipped with a warning; returns [] when none has data.
    """
    runs = curves(run_dirs)
    if not runs:
        return []
    out_dir = Path(out_dir)
    written = []
    for name, fig in zip(("loss", "error"), figures(runs), strict=True):
        for ext in ("png", "pdf") if pdf else ("png",):
            path = out_dir / f"{name}.{ext}"
            save_atomic(fig, path)
            written.append(path)
    return written


def curves(run_dirs: Sequence[Path | str]) -> list[tuple[str, pd.DataFrame]]:
    """(legend label, log) to draw: each run with data; runs that differ only in their seed
    (runtables.key) as one mean log with a band."""
    runs = []
    for run_dir in map(Path, run_dirs):
        df = load_log(run_dir)
        if df is not None:
            runs.append(runtables.Run(run_dir, runtables.read_settings(run_dir) or {}, df))
    return [(single_label(g[0]), g[0].log) if len(g) == 1 else runtables.band(g)
            for g in runtables.group(runs)]  # fmt: skip


def single_label(run: runtables.Run) -> str:
    """A lone run's legend label; one still running or stopped says how far it got, so its
    last point does not read as a final result."""
    label = run_label(run.folder)
    return label if run.finished or not run.settings.get("epochs") else f"{label}: {run.progress}"


def figures(runs: list[tuple[str, pd.DataFrame]]) -> tuple[Figure, Figure]:
    """(loss figure, error figure) of the runs, given as (legend label, log) pairs.

    The first axes of the error figure is top-1 error, with each run's reported point marked.
    """
    has_top5 = any("test_top5" in df.columns for _, df in runs)

    # Figures are built without pyplot, so nothing is registered globally and
    # repeated calls (once per epoch from the trainer) leak no memory.
    loss_fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(loss_fig)
    ax = loss_fig.subplots()
    plot_metric(ax, runs, "loss", log_rule=False)  # loss: always log scale
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss")
    add_legend(ax, runs, "loss")

    err_fig = Figure(figsize=(12 if has_top5 else 7, 4.5))
    FigureCanvasAgg(err_fig)
    axes = err_fig.subplots(1, 2 if has_top5 else 1, squeeze=False)[0]
    metrics = zip(("err", "top5"), ("Top-1 error", "Top-5 error"), strict=True)
    for ax, (metric, title) in zip(axes, metrics, strict=False):  # top-5: only if logged
        plot_metric(ax, runs, metric, log_rule=True)
        ax.set_ylabel("error (%)")
        ax.set_title(title)
        add_legend(ax, runs, metric, mark_reported(ax, runs) if metric == "err" else ())
    return loss_fig, err_fig


class Background:
    """Redraws a run's figures in a child process after each epoch, so plotting never slows
    or breaks training: a failure is a warning, and a plot still running is not restarted."""

    def __init__(self, run_dir: Path | str, enabled: bool = True) -> None:
        self.run_dir, self.enabled, self.proc = str(run_dir), enabled, None

    def _collect(self) -> None:
        if self.proc is not None:
            _, err = self.proc.communicate()
            if self.proc.returncode:
                last = (err.decode(errors="replace").strip().splitlines() or ["?"])[-1]
                warn(f"plotting failed ({last}); training goes on")
            self.proc = None

    def refresh(self) -> None:
        if not self.enabled or (self.proc is not None and self.proc.poll() is None):
            return
        self._collect()
        cmd = [sys.executable, str(PLOT), self.run_dir, "--out", self.run_dir]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self) -> None:
        """Wait for the last refresh, then draw the final figures."""
        self._collect()
        self.refresh()
        self._collect()

