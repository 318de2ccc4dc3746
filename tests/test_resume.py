"""--resume: one writer per run folder (two real train.py processes), and log.csv repaired
to the checkpoint."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_train import (
    final_state,
    mnist_run,
    run,
    snapshot,
    subprocess_train,
)

import recipes
import train

RECIPE = recipes.recipe("densenet", "mnist")


def wait_for_rows(log: Path, rows: int, proc: subprocess.Popen) -> None:
    """Until the running train.py has logged this many epochs."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_bytes().count(b"\n") > rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"{log}: fewer than {rows} rows in time")


def test_one_process_writes_a_run_and_a_killed_one_leaves_no_lock(tmp_path):
    argv, save = mnist_run(tmp_path)
    first = subprocess_train([*argv, "--epochs", "500"])
    try:
        wait_for_rows(save / "log.csv", 2, first)
        os.kill(first.pid, signal.SIGSTOP)  # it holds the lock and writes nothing meanwhile
        before = snapshot(save)
        for extra in ([], ["--resume"]):
            second = subprocess_train([*argv, "--epochs", "500", *extra])
            _, err = second.communicate(timeout=300)
            holder = f"pid {first.pid} on {socket.gethostname()} since "
            assert second.returncode == 2 and err.startswith(
                f"error: --save {save}: in use by {holder}"
            )
            assert err.count("\n") == 1 and snapshot(save) == before
        evaluated = subprocess_train(
            ["--evaluate", str(save / "latest.pt"), *argv[2:4], "--device", "cpu"]
        )
        out, err = evaluated.communicate(timeout=300)
        assert evaluated.returncode == 0 and "test_err" in out, err  # reading a locked run
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)
    done = final_state(save)["epoch"]
    resumed = subprocess_train([*argv, "--resume", "--epochs", str(done + 1)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert list(pd.read_csv(save / "log.csv").epoch) == list(range(1, done + 2))
    assert json.loads((save / ".lock").read_text())["pid"] == resumed.pid


# ----------------------------------------------------------------------------- log.csv


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> tuple[list[str], Path]:
    """A finished two-epoch MNIST run: (argv, folder). Tests resume copies of it."""
    argv, save = mnist_run(tmp_path_factory.mktemp("two"))
    assert train.main([*argv, "--epochs", "2"]) == 0
    return argv, save


def copy_of(two_epochs: tuple[list[str], Path], tmp_path: Path) -> tuple[list[str], Path]:
    argv, save = two_epochs
    shutil.copytree(save, tmp_path / "run")
    return [*argv, "--save", str(tmp_path / "run")], tmp_path / "run"


def past_the_checkpoint(log: bytes) -> bytes:
    """The rows of epochs 3 and 4 after the checkpoint's 2: a kill between log and save."""
    last = log.splitlines(keepends=True)[-1]
    assert last.startswith(b"2,")
    return log + b"3" + last[1:] + b"4" + last[1:]


# damage done to log.csv (None: deleted), and what the warning must say (None: no warning)
LOG_FAULTS = {
    "intact": (lambda log: log, None),
    "cut last line": (lambda log: log[:-7], "dropped a cut last line; restored epochs 2 from"),
    "not UTF-8": (lambda log: log + b"\xff\xfe\x00 binary\n", "dropped a line that is not UTF-8"),
    "past the checkpoint": (past_the_checkpoint, "dropped the rows of epochs 3, 4 (past the checkpoint)"),
    "two writers": (lambda log: log + log.split(b"\n", 1)[1], "dropped a second row of epoch 1, a second row of epoch 2"),
    "empty": (lambda log: b"", "restored epochs 1, 2 from the checkpoint"),
    "missing": (lambda log: None, "restored epochs 1, 2 from the checkpoint"),
}  # fmt: skip


@pytest.mark.parametrize("fault", LOG_FAULTS)
def test_resume_repairs_the_log_to_the_checkpoint(two_epochs, tmp_path, capsys, fault):
    argv, save = copy_of(two_epochs, tmp_path)
    log = save / "log.csv"
    first = log.read_bytes()
    damage, said = LOG_FAULTS[fault]
    damaged = damage(first)
    if damaged is None:
        log.unlink()
    else:
        log.write_bytes(damaged)
    code, _, err = run([*argv, "--resume", "--epochs", 3], capsys)
    assert code == 0 and "Traceback" not in err, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    if said is None:
        assert warnings == []
    else:
        assert (
            len(warnings) == 1 and f"{log} repaired to the checkpoint's 2 epochs: " in warnings[0]
        )
        assert said in warnings[0], warnings[0]
    assert list(pd.read_csv(log).epoch) == [1, 2, 3]
    assert log.read_bytes().startswith(first)  # epochs 1 and 2 as they were first written


def test_an_older_checkpoint_keeps_the_rows_that_parse(two_epochs, tmp_path, capsys):
    """Checkpoints written before they kept the log's rows: the file's rows that parse."""
    argv, save = copy_of(two_epochs, tmp_path)
    ckpt = final_state(save)
    torch.save({k: v for k, v in ckpt.items() if k != "log"}, save / "latest.pt")
    header, row1, row2 = (save / "log.csv").read_bytes().splitlines(keepends=True)
    (save / "log.csv").write_bytes(header + row1 + row2[:-7] + b"\xff\n")
    code, _, err = run([*argv, "--resume", "--epochs", 3], capsys)
    assert code == 0 and err.count("\n") == 1, err
    assert "dropped a cut last line" not in err  # the cut line ends in bytes that are not UTF-8
    assert (
        "a line that is not UTF-8" in err
        and "epochs 2 have no row (the checkpoint keeps none)" in err
    )
    assert list(pd.read_csv(save / "log.csv").epoch) == [1, 3]
    assert (save / "log.csv").read_bytes().startswith(header + row1)
