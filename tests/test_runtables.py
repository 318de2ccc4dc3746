"""runtables.py and plot.py --table: runs grouped by their settings except the seed, mean ± std
over seeds beside the paper, the band in the figures, and every refusal."""

import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

import plot
from runfolders import write_run
from training import figures, paper, recipes, runtables
from training.settings import INVOCATION, resolve

CPU = recipes.Capabilities("cpu", True, True)
BC_100_12 = {"depth": 100, "growth": 12}  # the default model: DenseNet-BC, C10+
DENSENET_40_12 = {"depth": 40, "growth": 12, "bottleneck": False}


def resolved_run(folder: Path, given: dict, test_err: list[float], val_err=None, epochs=3) -> Path:
    """A run folder as train.py leaves it: args.json with every setting resolved for these
    flags (and the paper's fields), and a log.csv of len(test_err) epochs out of `epochs`."""
    settings, _ = resolve({**given, "epochs": epochs, "save": str(folder)}, CPU)
    meta = {"torch": "2.x", "device": "cpu", "world_size": 1, "host": "Linux x86_64"}
    recorded = {**vars(settings), **meta, **paper.record(vars(settings))}
    columns = {"epoch": range(1, len(test_err) + 1), "lr": 0.1, "train_loss": 1.0}
    columns |= {"train_err": [e + 5 for e in test_err]}
    if val_err is not None:
        columns |= {"val_loss": 1.0, "val_err": val_err}
    columns |= {"test_loss": 1.0, "test_err": test_err, "seconds": 2.0}
    return write_run(folder, columns, recorded)


def table(capsys, runs: list[Path], out: Path) -> tuple[str, pd.DataFrame]:
    """plot.py --table's stdout and its CSV."""
    assert plot.main(["--table", *map(str, runs), "--out", str(out)]) == 0
    text = {
        c: str
        for c in ("settings", "runs", "seeds", "paper_reported", "paper_differs", "unfinished")
    }
    return capsys.readouterr().out, pd.read_csv(out / "table.csv", dtype=text).fillna(
        dict.fromkeys(text, "")
    )


def final_errors(runs: list[Path]) -> list[float]:
    return [float(pd.read_csv(r / "log.csv").test_err.iloc[-1]) for r in runs]


def test_seeds_group_and_other_configurations_do_not(tmp_path, capsys):
    # three seeds of BC-100-12 on C10+, run with different speed choices and folders
    bc = [resolved_run(tmp_path / f"bc.s{s}", {**BC_100_12, "seed": s, **speed}, [60.0, 30.0, 20 + s])
          for s, speed in enumerate([{}, {"amp": "off"}, {"channels_last": False, "device": "cpu"}])]  # fmt: skip
    stopped = resolved_run(tmp_path / "bc.s3", {**BC_100_12, "seed": 3}, [60.0, 40.0])
    dense = [resolved_run(tmp_path / f"d40.s{s}", {**DENSENET_40_12, "seed": s}, [50.0, 25.0, 18 + s / 2])
             for s in range(2)]  # fmt: skip
    longer = resolved_run(tmp_path / "bc.e4", {**BC_100_12, "seed": 0}, [60, 30, 25, 19.5], epochs=4)
    out = tmp_path / "new" / "tables"  # missing parents are created
    text, csv = table(capsys, [bc[0], dense[0], stopped, *bc[1:], dense[1], longer], out)

    assert list(csv.model) == ["DenseNet-BC-100-12", "DenseNet-40-12", "DenseNet-BC-100-12"]
    assert list(csv.data) == ["C10+"] * 3 and list(csv.n) == [3, 2, 1]
    assert list(csv.settings) == ["epochs 3", "epochs 3", "epochs 4"]  # what tells them apart
    for row, runs in zip(csv.itertuples(), (bc, dense, [longer]), strict=True):
        errors = final_errors(runs)
        assert row.final_test_err == pytest.approx(statistics.fmean(errors))
        if len(errors) > 1:
            assert row.final_test_err_std == pytest.approx(statistics.stdev(errors))
        found = paper.lookup(json.loads((runs[0] / "args.json").read_text()))
        assert row.paper_test_err == found.test_err
        assert row.difference == pytest.approx(statistics.fmean(errors) - found.test_err)
        assert row.paper_differs == ", ".join(found.differs)
    assert list(csv.paper_test_err) == [4.51, 5.24, 4.51]  # README's Table 2, C10+
    assert csv.paper_differs[0] == "300 epochs"
    # the stopped seed is named, not averaged in
    assert csv.unfinished[0] == "bc.s3 (2 of 3 epochs)" and csv.runs[0].split() == [
        "bc.s0", "bc.s3", "bc.s1", "bc.s2"]  # fmt: skip
    assert list(csv.seeds) == ["0 1 2", "0 1", "0"]

    lines = text.strip().splitlines()
    assert len(lines) == 2 + 3 and all(
        line.startswith("|") and line.endswith("|") for line in lines
    )
    mean, std = statistics.fmean(final_errors(bc)), statistics.stdev(final_errors(bc))
    assert f"| {mean:.2f} ± {std:.2f} (3) |" in lines[2]
    assert f"| 4.51 at 300 epochs | {mean - 4.51:+.2f} | bc.s3 (2 of 3 epochs) |" in lines[2]
    assert sorted(p.name for p in out.iterdir()) == ["error.png", "loss.png", "table.csv"]


def test_best_validation_figures_where_a_split_exists(tmp_path, capsys):
    val_errs = [[50.0, 9.0, 7.0, 8.0], [50.0, 7.5, 7.5, 9.0], [40.0, 8.0, 8.5, 6.0]]
    runs = [resolved_run(tmp_path / f"s{s}", {**BC_100_12, "seed": s, "val_split": 1000}, test, v, epochs=4)
            for s, (v, test) in enumerate(zip(val_errs, ([52, 10, 8.5, 7.9], [51, 9, 8, 7], [49, 9.5, 9, 8.2]), strict=True))]  # fmt: skip
    _, csv = table(capsys, runs, tmp_path / "out")
    # the first epoch of lowest validation error of each seed, as best.pt holds it
    at_best = [8.5, 9.0, 8.2]
    assert csv.best_val_test_err[0] == pytest.approx(statistics.fmean(at_best))
    assert csv.best_val_test_err_std[0] == pytest.approx(statistics.stdev(at_best))
    assert csv.final_test_err[0] == pytest.approx(statistics.fmean([7.9, 7, 8.2]))
    # CIFAR's figure is the final epoch's, trained on all 50,000 images
    assert csv.paper_differs[0] == "300 epochs, the whole training set"


def test_svhn_compares_the_test_error_at_the_lowest_validation_error(tmp_path, capsys):
    runs = [resolved_run(tmp_path / f"s{s}", {**BC_100_12, "dataset": "svhn", "seed": s},
                      [9.0, 2.5 + s] + [2.6] * 38, [8.0, 2.0] + [2.2] * 38, epochs=40)
            for s in range(2)]  # fmt: skip
    _, csv = table(capsys, runs, tmp_path / "out")
    assert csv.data[0] == "SVHN" and csv.paper_reported[0] == "best_val"
    assert csv.difference[0] == pytest.approx(statistics.fmean([2.5, 3.5]) - 1.76)


def test_a_table_of_runs_that_are_no_paper_configuration(tmp_path, capsys):
    runs = [resolved_run(tmp_path / f"s{s}", {"dataset": "fashion-mnist", "depth": 22, "seed": s},
                      [30.0, 12.0 + s]) for s in range(2)]  # fmt: skip
    text, csv = table(capsys, runs, tmp_path / "out")
    assert csv.model[0] == "DenseNet-BC-22-12" and csv.data[0] == "fashion-mnist+"
    assert np.isnan(csv.paper_test_err[0]) and np.isnan(csv.difference[0])
    assert "| – | – | – |" in text  # no best-val figure, no paper figure, no difference


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_args", "no readable args.json"),
        ("no_log", "no log.csv"),
        ("empty_log", "unreadable log.csv (EmptyDataError)"),
        ("not_a_number", "corrupt log.csv"),
        ("no_test_err", "corrupt log.csv"),
    ],
)
def test_table_refuses_a_run_it_cannot_read_in_one_line(tmp_path, capsys, case, message):
    good = resolved_run(tmp_path / "good", BC_100_12, [50.0, 20.0, 10.0])
    bad = resolved_run(tmp_path / "bad", {**BC_100_12, "seed": 1}, [50.0, 20.0, 10.0])
    log = bad / "log.csv"
    if case == "no_args":
        (bad / "args.json").write_text("{not json")
    elif case == "no_log":
        log.unlink()
    elif case == "empty_log":
        log.write_text("")
    elif case == "not_a_number":
        log.write_text(log.read_text().replace("10.0", "ten"))
    else:
        pd.read_csv(log).drop(columns="test_err").to_csv(log, index=False)
    out = tmp_path / "out"
    assert plot.main(["--table", str(good), str(bad), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"plot.py: error: --table: {bad}: {message}")
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert not out.exists()


def test_a_run_just_started_is_unfinished_not_an_error(tmp_path, capsys):
    runs = [
        resolved_run(tmp_path / f"s{s}", {**BC_100_12, "seed": s}, [50.0, 20.0, 10.0 + s])
        for s in range(2)
    ]
    started = resolved_run(tmp_path / "s2", {**BC_100_12, "seed": 2}, [])
    _, csv = table(capsys, [*runs, started], tmp_path / "out")
    assert csv.n[0] == 2 and csv.unfinished[0] == "s2 (0 of 3 epochs)"


def test_the_figures_draw_seeds_as_a_band_around_their_mean(tmp_path):
    tests = [[60.0, 30.0, 20.0], [64.0, 28.0, 21.0], [58.0, 33.0]]  # the third seed stopped
    runs = [resolved_run(tmp_path / f"s{s}", {**BC_100_12, "seed": s}, t) for s, t in enumerate(tests)]
    other = resolved_run(tmp_path / "d40", DENSENET_40_12, [55.0, 25.0, 15.0])
    drawn = figures.curves([*runs, other])
    assert [label for label, _ in drawn] == [
        "DenseNet-BC-100-12 C10+: mean of 3 seeds, 1 unfinished, band min-max",
        figures.run_label(other),
    ]
    _, err_fig = figures.figures(drawn)
    ax = err_fig.axes[0]
    by_epoch = [[t[e] for t in tests if len(t) > e] for e in range(3)]
    means = [statistics.fmean(v) for v in by_epoch]
    solid = [line for line in ax.get_lines() if list(line.get_ydata()) == pytest.approx(means)]
    assert solid and solid[0].get_color() == "C0"  # the mean test curve, in the group's colour
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # train and test of the group; none for the lone run
    corners = {(round(x, 6), round(y, 6)) for x, y in bands[1].get_paths()[0].vertices}
    for epoch, values in enumerate(by_epoch, start=1):
        assert {(epoch, min(values)), (epoch, max(values))} <= corners
    assert not [line for line in ax.get_lines() if line.get_linestyle() == ":"]  # lr never drops
    assert plot.main([*map(str, runs), "--out", str(tmp_path / "figs")]) == 0


def test_a_lone_unfinished_run_says_how_far_it_got_in_the_legend(tmp_path):
    running = resolved_run(tmp_path / "running", BC_100_12, [50.0, 20.0], epochs=100)
    done = resolved_run(tmp_path / "done", DENSENET_40_12, [50.0, 20.0, 10.0])
    no_args = write_run(tmp_path / "no-args", pd.read_csv(running / "log.csv").to_dict("list"))
    labels = [label for label, _ in figures.curves([running, done, no_args])]
    assert labels == [
        f"{figures.run_label(running)}: 2 of 100 epochs",
        figures.run_label(done),
        "no-args",
    ]


def test_settings_that_do_not_make_another_experiment_cover_the_trainers():
    assert set(INVOCATION) <= runtables.NOT_COMPARED
    assert set(recipes.device_defaults(CPU)) | {"device_chose"} <= runtables.NOT_COMPARED
    base, _ = resolve({"save": "x"}, CPU)
    elsewhere, _ = resolve({"save": "y", "seed": 1, "amp": "off", "compile": True}, CPU)
    elsewhere.compile_measured = {"speedup": 1.23, "compile": True}  # timed on another host
    other_lr, _ = resolve({"save": "x", "lr": 0.05}, CPU)
    assert runtables.key(vars(base)) == runtables.key(vars(elsewhere)) != runtables.key(vars(other_lr))
