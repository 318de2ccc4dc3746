"""Tests for plot.py (curves from log.csv) and make_graph.py (autograd graph as DOT)."""

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import make_graph
import plot
from runfolders import write_run
from training import figures

ROOT = Path(__file__).resolve().parents[1]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plausible_run(run_dir: Path, epochs: int = 12, val: bool = False, top5: bool = False) -> Path:
    """A run folder with a plausible log.csv (errors in %, lr drops at 50% and 75%) and
    args.json."""
    rows = []
    for e in range(1, epochs + 1):
        lr = 0.1 if e <= epochs // 2 else (0.01 if e <= 3 * epochs // 4 else 0.001)
        decay = math.exp(-e / 3)
        row = {
            "epoch": e,
            "lr": lr,
            "train_loss": 0.02 + 1.8 * decay,
            "train_err": 0.5 + 60 * decay,
            "test_loss": 0.30 + 1.6 * decay,
            "test_err": 6.0 + 55 * decay,
            "seconds": 41.5,
        }
        if val:
            row |= {"val_loss": 0.32 + 1.6 * decay, "val_err": 6.5 + 55 * decay}
        if top5:
            row |= {"train_top5": 0.1 + 30 * decay, "test_top5": 2.0 + 28 * decay}
        rows.append(row)
    args = {
        "dataset": "c10",
        "model": "densenet",
        "depth": 40,
        "growth": 12,
        "save": str(run_dir),
    }
    return write_run(run_dir, rows, args)


def assert_png(path: Path) -> None:
    """A real PNG file of a few KB at least."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))


def test_plot_single_run_defaults_to_run_folder(tmp_path):
    run = plausible_run(tmp_path / "c10_d40", val=True)
    assert plot.main([str(run)]) == 0
    assert_png(run / "loss.png")
    assert_png(run / "error.png")
    assert not (run / "loss.pdf").exists()
    assert not list(run.glob(".*tmp")), "temp files left behind"
    assert figures.run_label(run) == "c10_d40 (c10 L=40 k=12)"
    (run / "args.json").unlink()
    assert figures.run_label(run) == "c10_d40"


def test_plot_two_runs_overlaid_with_pdf(tmp_path):
    a = plausible_run(tmp_path / "a", epochs=20, top5=True)
    b = plausible_run(tmp_path / "b", epochs=8, val=True)
    out = tmp_path / "plots"
    assert plot.main([str(a), str(b), "--out", str(out), "--pdf"]) == 0
    for name in ("loss", "error"):
        assert_png(out / f"{name}.png")
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (a / "loss.png").exists()


def test_plot_runs_is_repeatable_and_handles_one_row(tmp_path):
    run = plausible_run(tmp_path / "running", epochs=1)
    first = figures.plot_runs([run], run)
    assert first == [run / "loss.png", run / "error.png"]
    assert figures.plot_runs([str(run)], str(run), pdf=True) == [
        run / "loss.png",
        run / "loss.pdf",
        run / "error.png",
        run / "error.pdf",
    ]
    assert_png(run / "error.png")


def test_plot_skips_empty_runs_and_fails_without_data(tmp_path, capsys):
    header_only = tmp_path / "header_only"
    header_only.mkdir()
    (header_only / "log.csv").write_text(
        "epoch,lr,train_loss,train_err,test_loss,test_err,seconds\n"
    )
    missing = tmp_path / "missing"
    missing.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.csv").write_text("")

    assert plot.main([str(header_only), str(missing), str(empty), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "header_only" in err and "missing" in err and "empty" in err
    assert "no run has any logged epochs" in err
    assert "Traceback" not in err
    assert not (tmp_path / "loss.png").exists()

    good = plausible_run(tmp_path / "good")
    assert plot.main([str(good), str(missing), "--out", str(tmp_path)]) == 0
    assert "missing" in capsys.readouterr().err
    assert_png(tmp_path / "error.png")


def test_plot_cli_subprocess(tmp_path):
    run = plausible_run(tmp_path / "cli_run")
    result = subprocess.run(
        [sys.executable, str(ROOT / "plot.py"), str(run)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert_png(run / "loss.png")
    assert_png(run / "error.png")

    result = subprocess.run(
        [sys.executable, str(ROOT / "plot.py"), str(tmp_path / "nope")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr


# A run whose validation error is lowest at epoch 4, whose test error is lowest at epoch 5,
# and whose last epoch is 6: each rule picks a different point.
VAL_ERR = [50.0, 20.0, 9.0, 7.0, 8.0, 10.0]
TEST_ERR = [52.0, 22.0, 10.0, 8.5, 7.5, 7.9]


def marked_run(run_dir: Path, val: bool) -> Path:
    """A run folder whose log.csv has the trainer's columns and the errors above."""
    columns = {"epoch": range(1, 7), "lr": [0.1] * 3 + [0.01] * 3, "train_loss": [1.0] * 6}
    columns |= {"train_err": [30.0] * 6}
    if val:
        columns |= {"val_loss": [1.0] * 6, "val_err": VAL_ERR}
    columns |= {"test_loss": [1.0] * 6, "test_err": TEST_ERR, "seconds": [2.0] * 6}
    return write_run(run_dir, columns)


def stars(fig) -> tuple[list, list[str]]:
    """The marked points (star markers) of the top-1 error axes, and its legend's texts."""
    ax = fig.axes[0]
    assert ax.get_title() == "Top-1 error"
    marked = [line for line in ax.get_lines() if line.get_marker() == "*"]
    return marked, [text.get_text() for text in ax.get_legend().get_texts()]


@pytest.mark.parametrize(
    ("val", "epoch", "error", "label"),
    [
        (False, 6, 7.9, "final epoch 6: 7.90 %"),
        (True, 4, 8.5, "best val epoch 4: test 8.50 %"),
    ],
)
def test_error_plot_marks_the_reported_point(tmp_path, val, epoch, error, label):
    run = marked_run(tmp_path / "run", val)
    assert figures.reported_point(figures.load_log(run)) == (epoch, error, label)
    _, err_fig = figures.figures([("run", figures.load_log(run))])
    marked, legend = stars(err_fig)
    assert len(marked) == 1 and marked[0].get_label() == label and label in legend
    assert list(marked[0].get_xdata()) == [epoch] and list(marked[0].get_ydata()) == [error]
    assert plot.main([str(run)]) == 0  # and the figure is drawn and written
    assert_png(run / "error.png")


def test_each_run_has_its_marked_point_in_its_colour(tmp_path):
    runs = [marked_run(tmp_path / "a", val=False), plausible_run(tmp_path / "b", top5=True)]
    err_fig = figures.figures([(r.name, figures.load_log(r)) for r in runs])[1]
    marked, legend = stars(err_fig)
    last_b = figures.load_log(runs[1]).iloc[-1]
    assert [m.get_label() for m in marked] == [
        "final epoch 6: 7.90 %",
        f"final epoch 12: {last_b.test_err:.2f} %",
    ]
    assert [m.get_color() for m in marked] == ["C0", "C1"]
    assert legend[-2:] == [m.get_label() for m in marked]
    assert not [line for line in err_fig.axes[1].get_lines() if line.get_marker() == "*"]


def test_a_step_schedule_marks_its_drops_and_cosine_none(tmp_path):
    step = figures.load_log(plausible_run(tmp_path / "step"))  # 0.1, 0.01 from 7, 0.001 from 10
    cosine = step.assign(lr=[0.05 * (1 + math.cos(math.pi * e / 12)) for e in range(12)])
    for log, drops in [(step, [7, 10]), (cosine, [])]:
        err_fig = figures.figures([("run", log)])[1]
        rules = [line for line in err_fig.axes[0].get_lines() if line.get_linestyle() == ":"]
        assert [line.get_xdata()[0] for line in rules] == drops


def test_plot_refuses_a_folder_that_does_not_exist(tmp_path):
    good = plausible_run(tmp_path / "good")
    missing = tmp_path / "no such run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "plot.py"), str(good), str(missing)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr == f"plot.py: error: no such run folder: {missing}\n"
    assert not (good / "error.png").exists()


def test_plot_refuses_an_out_that_is_a_file(tmp_path, capsys):
    run = plausible_run(tmp_path / "run")
    (tmp_path / "figures").write_text("mine")
    assert plot.main([str(run), "--out", str(tmp_path / "figures")]) == 1
    err = capsys.readouterr().err
    figures = tmp_path / "figures"
    assert err == f"plot.py: error: --out {figures}: cannot write there (it is a file, not a folder)\n"
    inside = tmp_path / "figures" / "sub"
    assert plot.main([str(run), "--out", str(inside)]) == 1
    err = capsys.readouterr().err
    assert err == f"plot.py: error: --out {inside}: cannot write there ({figures} is a file, not a folder)\n"
    assert err.count("\n") == 1 and (tmp_path / "figures").read_text() == "mine"


@pytest.mark.parametrize("module", [plot, make_graph])
def test_every_flag_has_a_help_text(module):
    for action in module.build_parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        assert len(action.help) > 10, action.option_strings


def assert_dot(path: Path) -> str:
    """A syntactically plausible digraph naming the DenseNet layers; returns its text."""
    text = path.read_text()
    assert text.startswith("digraph")
    assert text.count("{") == text.count("}") == 1
    assert text.rstrip().endswith("}")
    for name in (
        "features.conv0.weight",
        "features.denseblock1.denselayer1.conv1.weight",
        "features.transition1.conv.weight",
        "classifier.weight",
        "ConvolutionBackward0",
    ):
        assert name in text, name
    return text


def test_make_graph_renders_or_explains(tmp_path, capsys):
    out = tmp_path / "graph"
    assert make_graph.main(["--depth", "10", "--growth", "4", "--out", str(out)]) == 0
    text = assert_dot(tmp_path / "graph.dot")
    assert "denseblock3.denselayer2" not in text  # depth 10 BC: one layer per block
    printed = capsys.readouterr().out
    if shutil.which("dot"):
        assert (tmp_path / "graph.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
        assert "wrote" in printed and "graph.svg" in printed
    else:
        assert "dot -Tsvg" in printed and "install" in printed.lower()
        assert not (tmp_path / "graph.svg").exists()


def test_make_graph_without_dot_prints_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `dot` on PATH
    out = tmp_path / "plain"
    argv = ["--depth", "7", "--growth", "4", "--no-bottleneck", "--out", str(out)]
    assert make_graph.main(argv) == 0
    text = assert_dot(tmp_path / "plain.dot")
    assert "denselayer1.conv2" not in text  # no bottleneck: a single conv per layer
    printed = capsys.readouterr().out
    assert "dot -Tsvg" in printed and "plain.svg" in printed
    assert "install" in printed.lower()
    assert not (tmp_path / "plain.svg").exists()


def test_make_graph_refuses_an_out_inside_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "graph"
    assert make_graph.main(["--depth", "10", "--growth", "4", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"make_graph.py: error: cannot write {out}.dot (") and err.count("\n") == 1
    )
    assert (tmp_path / "file").read_text() == "mine"


def test_make_graph_hint_quotes_paths_for_the_shell(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot`
    out = tmp_path / "with space" / "graph"
    assert make_graph.main(["--depth", "10", "--growth", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    command = f"dot -Tsvg {make_graph.shell_line([str(out) + '.dot'])} -o"
    assert command in printed and make_graph.shell_line(["a b"]) != "a b"  # space quoted
    assert (tmp_path / "with space" / "graph.dot").is_file()


def test_make_graph_rejects_bad_depth(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_graph.main(["--depth", "41", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert "depth 41" in capsys.readouterr().err
    assert not (tmp_path / "bad.dot").exists()


def test_a_diracnet_run_is_labelled_by_depth_and_width(tmp_path):
    run = plausible_run(tmp_path / "d", val=False)
    args = {"dataset": "cifar10", "model": "diracnet", "depth": 34, "width": 2.0, "growth": None}
    (run / "args.json").write_text(json.dumps(args))
    assert figures.run_label(run) == "d (cifar10 L=34 width 2)"
