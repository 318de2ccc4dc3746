"""--resume: one writer per run folder (two real train.py processes), log.csv repaired to
the checkpoint, and every flag given with --resume either taking effect or refused."""

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_train import (
    assert_same_run,
    final_state,
    mnist_run,
    run,
    snapshot,
    subprocess_train,
    wait_for_line,
    wait_for_rows,
)

import train
from training import recipes

RECIPE = recipes.recipe("densenet", "mnist")


def test_one_process_writes_a_run_and_a_killed_one_leaves_no_lock(tmp_path):
    argv, save = mnist_run(tmp_path)
    argv = [*argv, "--no-compile"]  # 1,000 steps: not timed against compiling
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


# ----------------------------------------------------------------------------- flags


def test_a_new_lr_runs_as_a_schedule_drop_to_it_would(tmp_path, capsys):
    """lr 0.1 in epoch 1, then 0.1 * gamma: once from the schedule (a drop at half of 3
    epochs), once by resuming a 1-epoch run (gamma 1: no drop) with --lr 0.1 * gamma. The
    same lr from the same step: the same weights, bit for bit."""
    argv, save = mnist_run(tmp_path, n_train=128)
    argv = [*argv, "--drop-rate", 0.1, "--milestones", 0.5]
    assert recipes.lr_drops(RECIPE["schedule"], [0.5], 3) == [1]  # before epoch 2
    assert run([*argv, "--save", tmp_path / "ref", "--epochs", 3], capsys)[0] == 0
    assert run([*argv, "--epochs", 1, "--gamma", 1], capsys)[0] == 0
    lr = RECIPE["lr"] * RECIPE["gamma"]
    code, out, _ = run([*argv, "--resume", "--epochs", 3, "--lr", repr(lr)], capsys)
    assert code == 0
    assert f"--lr {RECIPE['lr']} -> {lr} from epoch 2" in out
    assert f"lr {RECIPE['lr']:g} -> {lr:g} from epoch 2" in out
    assert_same_run(tmp_path / "ref", save)
    args = json.loads((save / "args.json").read_text())
    assert args["lr"] == lr and args["lr_drops"] == [1]
    changes = {c["flag"]: (c["epoch"], c["step"], c["from"], c["to"]) for c in args["changes"]}
    assert changes == {"epochs": (2, 0, 1, 3), "lr": (2, 0, RECIPE["lr"], lr)}


def test_the_lr_given_with_resume_is_the_lr_that_runs(two_epochs, tmp_path, capsys):
    """--resume --lr 1e12 trains at 1e12 from the checkpoint's epoch on, as args.json says
    (not on at the checkpoint's lr while args.json says 1e12)."""
    argv, save = copy_of(two_epochs, tmp_path)
    code, out, _ = run([*argv, "--resume", "--epochs", 3, "--lr", 1e12], capsys)
    assert code == 0 and f"--lr {RECIPE['lr']} -> 1000000000000.0 from epoch 3" in out
    drops = recipes.lr_drops(RECIPE["schedule"], RECIPE["milestones"], 3)
    running = 1e12 * RECIPE["gamma"] ** sum(d <= 2 for d in drops)  # epoch 3 is index 2
    assert pd.read_csv(save / "log.csv").lr.iloc[-1] == pytest.approx(running, rel=1e-5)
    assert final_state(save)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(running)
    assert json.loads((save / "args.json").read_text())["lr"] == 1e12


def test_flags_given_with_resume_take_effect_and_are_recorded(two_epochs, tmp_path, capsys):
    argv, save = copy_of(two_epochs, tmp_path)
    momentum = RECIPE["momentum"] / 2
    flags = ["--momentum", momentum, "--no-nesterov"]
    code, out, _ = run([*argv, "--resume", "--epochs", 3, *flags], capsys)
    assert code == 0 and f"--momentum {RECIPE['momentum']} -> {momentum} from epoch 3" in out
    decay = RECIPE["weight_decay"] * 10
    assert run([*argv, "--resume", "--epochs", 5, "--weight-decay", decay], capsys)[0] == 0
    group = final_state(save)["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (momentum, False, decay)
    args = json.loads((save / "args.json").read_text())
    assert (args["momentum"], args["nesterov"], args["weight_decay"]) == (momentum, False, decay)
    assert args["lr_drops"] == recipes.lr_drops(args["schedule"], args["milestones"], 5)
    assert sorted((c["epoch"], c["flag"], c["to"]) for c in args["changes"]) == [
        (3, "epochs", 3), (3, "momentum", momentum), (3, "nesterov", False),
        (4, "epochs", 5), (4, "weight_decay", decay),
    ]  # fmt: skip
    assert list(pd.read_csv(save / "log.csv").epoch) == [1, 2, 3, 4, 5]


RESUME_REFUSALS = {
    "seed": (["--seed", 1], "--seed 1 (checkpoint: 0) cannot change: it chose the held-out"),
    "val-split": (["--val-split", 32], "--val-split 32 (checkpoint: 0) cannot change"),
    "train-subset": (["--train-subset", 32], "--train-subset 32 (checkpoint: None) cannot change"),
    "fewer epochs": (
        ["--epochs", 1],
        "--epochs 1: the checkpoint has done 2 epochs; give at least 2",
    ),
}


@pytest.mark.parametrize("case", RESUME_REFUSALS)
def test_flags_a_resumed_run_cannot_honour_are_refused(two_epochs, capsys, case):
    argv, save = two_epochs
    extra, message = RESUME_REFUSALS[case]
    before = snapshot(save)
    code, _, err = run([*argv, "--resume", *extra], capsys)
    assert code == 2 and err.startswith("error: --resume: ") and message in err, err
    assert err.count("\n") == 1 and snapshot(save) == before


def test_batch_size_changes_at_an_epochs_start_not_mid_epoch(tmp_path, capsys):
    argv, save = mnist_run(tmp_path, n_train=3200)  # 100 steps per epoch
    proc = subprocess_train([*argv, "--epochs", "2"])
    wait_for_line(proc, "epoch 1 lr")  # printed once epoch 1 is logged, before epoch 2
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    stopped = final_state(save)
    assert stopped["epoch"] == 1 and 0 < stopped["step"] < 100  # mid-epoch
    before = snapshot(save)
    code, _, err = run([*argv, "--resume", "--batch-size", 64], capsys)
    assert code == 2 and f"the checkpoint is {stopped['step']} batches into epoch 2" in err
    assert err.count("\n") == 1 and snapshot(save) == before
    assert run([*argv, "--resume"], capsys)[0] == 0  # the rest of epoch 2
    code, out, _ = run([*argv, "--resume", "--epochs", 3, "--batch-size", 64], capsys)
    assert code == 0 and "--batch-size 32 -> 64 from epoch 3" in out
    assert json.loads((save / "args.json").read_text())["batch_size"] == 64
    assert list(pd.read_csv(save / "log.csv").epoch) == [1, 2, 3]
