"""files.py: atomic writes, output paths made ready or refused before any work, the run lock;
and every script's output flags through them (train.py --export and --save, plot.py --out)."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from test_train import run

import plot
import synthetic
from training import files


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_replaces_whole_files_with_the_umask_permissions(tmp_path, umask):
    path = tmp_path / "out.txt"
    old = os.umask(umask)
    try:
        files.write_text(path, "first\n")
        assert path.read_text() == "first\n" and path.stat().st_mode & 0o777 == 0o666 & ~umask
        with pytest.raises(ZeroDivisionError):  # a writer that fails halfway
            files.atomic_write(path, lambda f: (f.write(b"half"), 1 / 0))
    finally:
        os.umask(old)
    assert path.read_text() == "first\n" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_output_makes_missing_folders_and_undo_removes_them(tmp_path):
    made = files.output(tmp_path / "a" / "b" / "out.json", "--out")
    assert made.path == tmp_path / "a" / "b" / "out.json" and (tmp_path / "a" / "b").is_dir()
    assert made.created == (tmp_path / "a", tmp_path / "a" / "b")
    assert not any((tmp_path / "a" / "b").iterdir())  # the write probe is gone
    made.undo()
    assert not (tmp_path / "a").exists()
    # an existing folder given for a file: the default name inside it
    inside = files.output(tmp_path, "--out", default_name="bench.json")
    assert inside.path == tmp_path / "bench.json"
    folder = files.output(tmp_path / "runs" / "r1", "--save", folder=True)
    assert folder.path.is_dir() and folder.created == (tmp_path / "runs", tmp_path / "runs" / "r1")


def test_output_refuses_in_one_line_leaving_nothing(tmp_path):
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "read-only").write_text("kept")
    (tmp_path / "read-only").chmod(0o444)
    (tmp_path / "a-folder").mkdir()
    blocked = f"({tmp_path / 'a-file'} is a file, not a folder)"
    cases = [
        (tmp_path / "a-file" / "x" / "out.json", {}, blocked),
        (tmp_path / "a-file", {"folder": True}, "(it is a file, not a folder)"),
        (tmp_path / "a-folder", {}, "(it is a folder)"),
        (Path("/proc/densenet-out/x.json"), {}, "cannot write there ("),
        (Path("/proc/densenet-run"), {"folder": True}, "cannot write there ("),
    ]
    if os.geteuid() != 0:  # root may write a read-only file
        cases.append((tmp_path / "read-only", {}, "(the file is read-only)"))
    for path, kw, why in cases:
        with pytest.raises(files.OutputError) as e:
            files.output(path, "--flag", **kw)
        line = str(e.value)
        assert line.startswith(f"--flag {path}: cannot write there (") and why in line
        assert "\n" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder", "read-only"]
    assert (tmp_path / "a-file").read_text() == "mine"
    assert not any((tmp_path / "a-folder").iterdir())


def test_run_lock_is_exclusive_names_its_holder_and_restores_what_it_found(tmp_path):
    run_dir = tmp_path / "new" / "run"
    first = files.RunLock(run_dir, "--save")  # an open file description of its own
    holder = json.loads((run_dir / ".lock").read_text())
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    with pytest.raises(files.OutputError) as e:
        files.RunLock(run_dir, "--save")
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    assert str(e.value).startswith(f"--save {run_dir}: in use by {me} since ")
    first.release()  # refused before keep(): the lock file and the folders it made go again
    assert not (tmp_path / "new").exists()

    run_dir.mkdir(parents=True)
    (run_dir / ".lock").write_bytes(b"an earlier run's line\n")
    second = files.RunLock(run_dir, "--save")
    second.release()
    assert (run_dir / ".lock").read_bytes() == b"an earlier run's line\n"
    third = files.RunLock(run_dir, "--save")  # the lock was given back
    third.keep()
    third.release()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------- the scripts


def test_export_makes_its_folders_or_refuses_before_any_work(tmp_path, capsys):
    synthetic.make_mnist(tmp_path / "data", "mnist", n_train=64, n_test=32)
    common = ["--dataset", "mnist", "--data-dir", tmp_path / "data", "--depth", 10, "--batch-size", 32,
              "--epochs", 1, "--no-plot", "--device", "cpu"]  # fmt: skip
    dirac, dense = tmp_path / "runs" / "dirac", tmp_path / "runs" / "dense"  # missing parents
    assert run([*common, "--model", "diracnet", "--width", 0.25, "--save", dirac], capsys)[0] == 0
    assert run([*common, "--growth", 4, "--save", dense], capsys)[0] == 0
    evaluate = ["--data-dir", tmp_path / "data", "--device", "cpu", "--evaluate"]
    target = tmp_path / "new" / "folder" / "folded.pt"
    code, out, _ = run([*evaluate, dirac / "latest.pt", "--export", target], capsys)
    assert code == 0 and f"wrote the folded network to {target}" in out
    assert "state_dict" in torch.load(target, weights_only=True)
    (tmp_path / "a-file").write_text("mine")
    for checkpoint, export, message in [
        (dirac / "latest.pt", tmp_path / "a-file" / "folded.pt", "is a file, not a folder"),
        (dense / "latest.pt", tmp_path / "other" / "folded.pt", "this network is a DenseNet"),
    ]:
        code, out, err = run([*evaluate, checkpoint, "--export", export], capsys)
        assert code == 2 and message in err and err.count("\n") == 1 and out == ""  # no evaluation
    assert not (tmp_path / "other").exists() and (tmp_path / "a-file").read_text() == "mine"
    code, out, err = run([*common, "--save", tmp_path / "r", "--export", target], capsys)
    assert code == 2 and err == "error: --export goes with --evaluate\n"
    assert not (tmp_path / "r").exists()


def test_plot_makes_its_out_folders(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    header = "epoch,lr,train_loss,train_err,test_loss,test_err"
    (run_dir / "log.csv").write_text(f"{header}\n1,0.1,2,80,2,79\n")
    out = tmp_path / "figures" / "today"
    assert plot.main([str(run_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["error.png", "loss.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot.main([str(empty), "--out", str(tmp_path / "unused" / "figures")]) == 1
    assert not (tmp_path / "unused").exists()  # nothing plotted: the folders made go again
