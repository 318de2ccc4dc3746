"""Tests for plot.py (curves from log.csv) and make_graph.py (autograd graph as DOT)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import make_graph
import plot

ROOT = Path(__file__).resolve().parents[1]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(
    run_dir: Path, epochs: int = 12, val: bool = False, top5: bool = False
) -> Path:
    """Write a plausible log.csv (errors in %, lr drops at 50% and 75%) and args.json."""
    run_dir.mkdir(parents=True)
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
    pd.DataFrame(rows).to_csv(run_dir / "log.csv", index=False)
    args = {
        "dataset": "c10",
        "model": "densenet",
        "depth": 40,
        "growth": 12,
        "save": str(run_dir),
    }
    (run_dir / "args.json").write_text(json.dumps(args))
    return run_dir


def assert_png(path: Path) -> None:
    """A real PNG file of a few KB at least."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))


def test_plot_single_run_defaults_to_run_folder(tmp_path):
    run = write_run(tmp_path / "c10_d40", val=True)
    assert plot.main([str(run)]) == 0
    assert_png(run / "loss.png")
    assert_png(run / "error.png")
    assert not (run / "loss.pdf").exists()
    assert not list(run.glob(".*tmp")), "temp files left behind"
    assert plot.run_label(run) == "c10_d40 (c10 L=40 k=12)"
    (run / "args.json").unlink()
    assert plot.run_label(run) == "c10_d40"


def test_plot_two_runs_overlaid_with_pdf(tmp_path):
    a = write_run(tmp_path / "a", epochs=20, top5=True)
    b = write_run(tmp_path / "b", epochs=8, val=True)
    out = tmp_path / "plots"
    assert plot.main([str(a), str(b), "--out", str(out), "--pdf"]) == 0
    for name in ("loss", "error"):
        assert_png(out / f"{name}.png")
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (a / "loss.png").exists()


def test_plot_runs_is_repeatable_and_handles_one_row(tmp_path):
    run = write_run(tmp_path / "running", epochs=1)
    first = plot.plot_runs([run], run)
    assert first == [run / "loss.png", run / "error.png"]
    assert plot.plot_runs([str(run)], str(run), pdf=True) == [
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

    assert (
        plot.main([str(header_only), str(missing), str(empty), "--out", str(tmp_path)])
        == 1
    )
    err = capsys.readouterr().err
    assert "header_only" in err and "missing" in err and "empty" in err
    assert "no run has any logged epochs" in err
    assert "Traceback" not in err
    assert not (tmp_path / "loss.png").exists()

    good = write_run(tmp_path / "good")
    assert plot.main([str(good), str(missing), "--out", str(tmp_path)]) == 0
    assert "missing" in capsys.readouterr().err
    assert_png(tmp_path / "error.png")


def test_plot_cli_subprocess(tmp_path):
    run = write_run(tmp_path / "cli_run")
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
        assert (
            (tmp_path / "graph.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
        )
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


def test_make_graph_rejects_bad_depth(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_graph.main(["--depth", "41", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert "depth 41" in capsys.readouterr().err
    assert not (tmp_path / "bad.dot").exists()
