"""train.py end to end on tiny synthetic datasets in torchvision's real on-disk formats."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torchvision import datasets

import densenet
import diracnet
import synthetic
import train
from training import recipes, runstate
from training.settings import resolve

ROOT = Path(__file__).resolve().parent.parent
# --device cpu: "auto" on a machine with a CUDA build of torch and no GPU adds a warning line
TINY = ["--depth", "10", "--growth", "4", "--batch-size", "32", "--device", "cpu", "--no-plot"]
BASE_COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "train_err",
    "test_loss",
    "test_err",
    "seconds",
]


def make_dataset(name: str, root: Path, register_md5) -> None:
    """Tiny synthetic files of `name` in root; synthetic files cannot carry the official
    MD5s, so the test registers theirs with torchvision (product code is unchanged)."""
    if name in ("cifar10", "cifar100"):
        classes = 10 if name == "cifar10" else 100
        syn = synthetic.make_cifar(root, n_train=200, n_test=50, num_classes=classes)
        register_md5(datasets.CIFAR10 if classes == 10 else datasets.CIFAR100, syn.md5)
    elif name == "svhn":
        # enough per class for the paper's 6,000-image validation split
        syn = synthetic.make_svhn(root, per_class={"train": 410, "extra": 210, "test": 5})
        register_md5(datasets.SVHN, syn.md5)
    else:
        synthetic.make_mnist(root, name, n_train=200, n_test=50)


def run(argv: list[str], capsys=None) -> tuple[int, str, str]:
    code = train.main([str(a) for a in argv])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "fashion-mnist"])
def test_each_dataset_trains_and_logs(tmp_path, register_md5, capsys, name):
    make_dataset(name, tmp_path / "data", register_md5)
    save = tmp_path / "run"
    extra = ["--train-subset", "64", "--batch-size", "16"] if name == "svhn" else []
    code, out, _ = run(
        [
            "--dataset",
            name,
            "--data-dir",
            tmp_path / "data",
            "--save",
            save,
            "--epochs",
            2,
            *TINY,
            *extra,
        ],
        capsys,
    )
    assert code == 0, out
    log = pd.read_csv(save / "log.csv")
    columns = list(BASE_COLUMNS)
    if name == "svhn":
        columns[-1:-1] = ["val_loss", "val_err"]
    assert set(columns) <= set(log.columns) and len(log) == 2
    assert list(log.epoch) == [1, 2]
    assert ("train_top5" in log.columns) == (name == "cifar100")
    assert log[["train_err", "test_err"]].stack().between(0, 100).all()
    args = json.loads((save / "args.json").read_text())
    assert (
        args["dataset"] == name and args["torch"] == torch.__version__ and args["device"] == "cpu"
    )
    # the paper's recipe per dataset: SVHN no augmentation + dropout 0.2, MNIST no flip
    assert args["augment"] == (name != "svhn") and args["drop_rate"] == (
        0.2 if name == "svhn" else 0.0
    )
    files = {p.name for p in save.iterdir()}
    # best.pt is chosen on validation error only: SVHN has a validation set, the others not
    assert "latest.pt" in files and ("best.pt" in files) == (name == "svhn")
    last = log.iloc[-1]
    assert f"final test error {last.test_err:.2f}% (epoch 2)" in out


def test_default_save_folder_and_paper_recipe(tmp_path, monkeypatch, capsys):
    synthetic.make_mnist(tmp_path / "data", "mnist", n_train=64, n_test=32)
    monkeypatch.chdir(tmp_path)
    code, _, _ = run(
        [
            "--dataset",
            "mnist",
            "--depth",
            10,
            "--growth",
            4,
            "--epochs",
            1,
            "--no-plot",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0
    args = json.loads((tmp_path / "work/mnist.densenet-bc-10-4/args.json").read_text())
    recipe = {
        k: args[k] for k in ("batch_size", "lr", "momentum", "nesterov", "weight_decay", "gamma")
    }
    assert recipe == {
        "batch_size": 64,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-4,
        "gamma": 0.1,
    }
    assert args["milestones"] == [0.5, 0.75] and args["compression"] == 0.5
    assert args["schedule"] == "lua" and args["lr_drops"] == recipes.lr_drops(
        "lua", [0.5, 0.75], args["epochs"]
    )


def test_figures_and_tensorboard(tmp_path, capsys):
    synthetic.make_mnist(tmp_path / "data", "fashion-mnist", n_train=64, n_test=32)
    save = tmp_path / "run"
    argv = [
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        tmp_path / "data",
        "--save",
        save,
    ]
    code, _, _ = run([*argv, "--epochs", 2, "--tensorboard", *TINY[:-1]], capsys)
    assert code == 0
    for figure in ("loss.png", "error.png"):
        assert (save / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in (save / "tb").iterdir())


def mnist_run(tmp_path: Path, n_train: int = 64) -> tuple[list[str], Path]:
    synthetic.make_mnist(tmp_path / "data", "mnist", n_train=n_train, n_test=32)
    save = tmp_path / "run"
    return [
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path / "data"),
        "--save",
        str(save),
        *TINY,
    ], save


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[list[str], Path]:
    """A one-epoch MNIST run that the refusal tests must leave as it is."""
    argv, save = mnist_run(tmp_path_factory.mktemp("finished"))
    assert train.main([*argv, "--epochs", "1"]) == 0
    return argv, save


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# (extra flags, part of the message, exit code); {new} is a folder that must not appear,
# {file} a regular file.
REFUSALS = {
    "existing run": (["--epochs", 2], "already holds a run", 2),
    "other depth": (["--resume", "--depth", 16], "--depth 16 (checkpoint: 10)", 2),
    "other dataset": (
        ["--resume", "--dataset", "fashion-mnist"],
        "--dataset fashion-mnist (checkpoint: mnist)",
        2,
    ),
    "bad depth": (["--save", "{new}", "--depth", 11], "nearest valid depths: 10 and 16", 2),
    "sync-bn on CPU": (["--save", "{new}", "--sync-bn"], "--sync-bn needs CUDA", 2),
    "arch without imagenet": (
        ["--save", "{new}", "--arch", "densenet121"],
        "--arch is for --dataset imagenet",
        2,
    ),
    "resume nothing": (["--save", "{new}", "--resume"], "does not exist", 2),
    "negative lr": (["--save", "{new}", "--lr", -1], "Invalid learning rate", 2),
    "unknown device": (
        ["--save", "{new}", "--device", "foo"],
        "--device foo: expected auto, cpu, cuda",
        2,
    ),
    "cuda device not there": (["--save", "{new}", "--device", "cuda:7"], "--device cuda:7: ", 2),
    "fp16 on CPU": (["--save", "{new}", "--amp", "fp16"], "--amp fp16 needs a GPU", 2),
    "bad milestone": (["--save", "{new}", "--milestones", 1.5], "fractions of the epochs", 2),
    "bad flag value": (["--save", "{new}", "--compile-mode", "fast"], "invalid choice: 'fast'", 2),
    "unknown flag": (["--save", "{new}", "--grwoth", 12], "unrecognized arguments: --grwoth", 2),
    "negative val-split": (["--save", "{new}", "--val-split", -3], "--val-split must be 0", 2),
    "save inside a file": (["--save", "{file}/run"], "is a file, not a folder", 2),
    "save unwritable": (["--save", "/proc/densenet-run"], "cannot write there", 2),
    "data-dir is a file": (
        ["--save", "{new}", "--data-dir", "{file}"],
        "is a file, not a folder",
        1,
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusal_is_one_line_and_touches_nothing(finished_run, tmp_path, capsys, case):
    argv, save = finished_run
    extra, message, expected = REFUSALS[case]
    (tmp_path / "a-file").write_text("not a folder")
    subs = {"{new}": str(tmp_path / "new"), "{file}": str(tmp_path / "a-file")}
    extra = [str(x) for x in extra]
    extra = [next((x.replace(k, v) for k, v in subs.items() if k in x), x) for x in extra]
    before = snapshot(save)
    code, out, err = run([*argv, *extra], capsys)
    assert code == expected and message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert snapshot(save) == before and not (tmp_path / "new").exists()
    assert not Path("/proc/densenet-run").exists()


def test_model_flags_are_checked_before_the_data(tmp_path, capsys):
    """A bad depth is reported, offline, without reading or creating the data folder."""
    code, _, err = run(["--data-dir", tmp_path / "data", "--save", tmp_path / "r", "--depth", 41,
                        "--device", "cpu"], capsys)  # fmt: skip
    assert code == 2 and "depth 41 does not fit DenseNet-BC" in err and err.count("\n") == 1
    assert not (tmp_path / "data").exists() and not (tmp_path / "r").exists()


def test_corrupt_and_foreign_checkpoints(tmp_path, capsys):
    argv, save = mnist_run(tmp_path)
    assert run([*argv, "--epochs", 1], capsys)[0] == 0
    good = (save / "latest.pt").read_bytes()
    for content, message in [
        (good[: len(good) // 2], "truncated or corrupt"),
        (b"\x00" * 100, "truncated or corrupt"),
    ]:
        (save / "latest.pt").write_bytes(content)
        code, _, err = run([*argv, "--resume", "--epochs", 2], capsys)
        assert code == 2 and message in err and "Traceback" not in err
    torch.save(densenet.densenet_cifar(10, 4).state_dict(), save / "latest.pt")
    code, _, err = run([*argv, "--resume", "--epochs", 2], capsys)
    assert code == 2 and "not a train.py checkpoint" in err
    code, _, err = run([*argv, "--evaluate", save / "missing.pt"], capsys)
    assert code == 2 and "does not exist" in err


def test_missing_data_is_one_line_error(tmp_path, closed_url, monkeypatch, capsys):
    monkeypatch.setattr(datasets.MNIST, "mirrors", [closed_url])
    code, _, err = run(
        ["--dataset", "mnist", "--data-dir", tmp_path / "nothing", "--save", tmp_path / "r",
         "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert code == 1 and err.count("\n") == 1
    assert "MNIST not found in" in err
    assert "http://yann.lecun.com/exdb/mnist/" in err
    assert not (tmp_path / "r").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    argv, save = mnist_run(tmp_path)
    assert run([*argv, "--epochs", 2, "--gamma", 1], capsys)[0] == 0
    # Blow up the weights of the saved state: the next epoch's loss is not finite.
    ckpt = torch.load(save / "latest.pt", weights_only=True)
    ckpt["model"]["classifier.weight"].fill_(float("inf"))
    ckpt["args"]["epochs"] = 3
    torch.save(ckpt, save / "latest.pt")
    before = (save / "latest.pt").read_bytes()
    code, _, err = run([*argv, "--resume", "--epochs", 3], capsys)
    assert code == 2 and "non-finite" in err and "latest.pt holds the last good state" in err
    assert (save / "latest.pt").read_bytes() == before
    assert len(pd.read_csv(save / "log.csv")) == 2
    code, _, err = run([*argv, "--save", tmp_path / "fresh", "--lr", 1e30], capsys)
    assert code == 2 and "non-finite in epoch 1; nothing was saved" in err
    assert not (tmp_path / "fresh" / "latest.pt").exists()


def final_state(save: Path) -> dict:
    return torch.load(save / "latest.pt", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sa["epoch"] == sb["epoch"] and sa["step"] == sb["step"] == 0
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k  # bit for bit
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], sb["optimizer"]["state"][k]["momentum_buffer"])
    la, lb = pd.read_csv(a / "log.csv"), pd.read_csv(b / "log.csv")
    pd.testing.assert_frame_equal(  # the same bits, so the same printed digits
        la.drop(columns="seconds"), lb.drop(columns="seconds"), check_exact=True
    )


def test_resume_after_a_clean_stop_is_bit_exact(tmp_path, capsys):
    argv, save = mnist_run(tmp_path, n_train=128)
    argv = [
        *argv,
        "--gamma",
        1,
        "--drop-rate",
        0.1,
    ]  # gamma 1: lr independent of --epochs
    ref = tmp_path / "ref"
    assert run([*argv, "--save", ref, "--epochs", 3], capsys)[0] == 0
    assert run([*argv, "--epochs", 1], capsys)[0] == 0
    assert run([*argv, "--epochs", 3, "--resume"], capsys)[0] == 0
    assert_same_run(ref, save)


def subprocess_train(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    # One thread each: bit-exact comparisons need the same thread count in every run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def wait_for_line(proc: subprocess.Popen, start: str) -> None:
    """Read proc's stdout up to a line starting with `start` (train.py flushes each line):
    a signal sent then lands at a known point of the run, however fast the host."""
    for line in proc.stdout:
        if line.startswith(start):
            return
    pytest.fail(f"the run ended without a line starting {start!r}: {proc.communicate()}")


def wait_for_rows(log: Path, rows: int, proc: subprocess.Popen) -> None:
    """Until the running train.py has logged this many epochs (a deadline only for a hang:
    on a slow host, beside the other test processes, two tiny epochs took over 2 minutes)."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_bytes().count(b"\n") > rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"{log}: fewer than {rows} rows in time")


def stop_mid_epoch_and_resume(tmp_path: Path, extra: list[str], signum: int) -> Path:
    """A 3-epoch MNIST run of 40 steps an epoch with the extra flags, uninterrupted into ref/;
    again, sent signum once epoch 1 is logged (it lands mid-epoch 2), then resumed: the two
    runs end bit for bit equal. Returns the resumed run's folder."""
    argv, save = mnist_run(tmp_path, n_train=1280)  # 40 steps per epoch
    argv = [*argv, "--epochs", "3", *extra]
    ref = subprocess_train([*argv, "--save", str(tmp_path / "ref")])
    assert ref.wait(timeout=300) == 0
    proc = subprocess_train(argv)
    wait_for_line(proc, "epoch 1 lr")  # printed once epoch 1 is logged, before epoch 2
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    assert "Resume with the same command and --resume" in out
    stopped = final_state(save)
    assert stopped["epoch"] == 1 and 0 < stopped["step"] < 40  # mid-epoch
    resumed = subprocess_train([*argv, "--resume"])
    assert resumed.wait(timeout=300) == 0
    assert_same_run(tmp_path / "ref", save)
    return save


def test_resume_after_sigterm_mid_epoch_is_bit_exact(tmp_path):
    stop_mid_epoch_and_resume(tmp_path, ["--drop-rate", "0.1"], signal.SIGTERM)


def test_cosine_resumes_after_ctrl_c_mid_epoch_on_the_same_lr_sequence(tmp_path):
    """--schedule cosine changes the lr every step: stopped mid-epoch by Ctrl-C (SIGINT) and
    resumed, the run ends bit for bit as an uninterrupted one, and log.csv's lr is each
    epoch's first step's."""
    save = stop_mid_epoch_and_resume(tmp_path, ["--schedule", "cosine", "--lr", "0.05"], signal.SIGINT)
    first_steps = [0.05 * (1 + math.cos(math.pi * e * 40 / 120)) / 2 for e in range(3)]
    assert list(pd.read_csv(save / "log.csv").lr) == pytest.approx(first_steps, rel=1e-5)
    args = json.loads((save / "args.json").read_text())
    assert args["schedule"] == "cosine" and args["milestones"] == [] and args["lr_drops"] == []


def test_evaluate_prints_loss_and_error(tmp_path, capsys):
    argv, save = mnist_run(tmp_path)
    assert run([*argv, "--epochs", 1], capsys)[0] == 0
    code, out, _ = run(
        ["--evaluate", save / "latest.pt", "--data-dir", tmp_path / "data", "--device", "cpu"],
        capsys,
    )
    assert code == 0
    logged = pd.read_csv(save / "log.csv").iloc[-1]
    printed = dict(zip(out.split()[::2], map(float, out.split()[1::2]), strict=True))
    # The same evaluation of the same weights: only the printing differs (4 decimals on
    # the console, 6 significant digits in the log), under 1e-4 together
    assert printed["test_err"] == pytest.approx(logged.test_err, abs=1e-4)
    assert printed["test_loss"] == pytest.approx(logged.test_loss, abs=1e-4)


def test_diracnet_trains_resumes_and_exports(tmp_path, capsys, monkeypatch):
    synthetic.make_mnist(tmp_path / "data", "fashion-mnist", n_train=128, n_test=32)
    monkeypatch.chdir(tmp_path)
    argv = [
        "--model",
        "diracnet",
        "--dataset",
        "fashion-mnist",
        "--depth",
        10,
        "--width",
        0.25,
        "--no-plot",
        "--device",
        "cpu",
    ]
    assert run([*argv, "--epochs", 1], capsys)[0] == 0
    save = tmp_path / "work/fashion-mnist.diracnet-10-0.25"
    args = json.loads((save / "args.json").read_text())
    recipe = {
        k: args[k]
        for k in (
            "batch_size",
            "epochs",
            "momentum",
            "nesterov",
            "weight_decay",
            "gamma",
            "pad_mode",
        )
    }
    assert recipe == {"batch_size": 128, "epochs": 1, "momentum": 0.9, "nesterov": False,
                      "weight_decay": 5e-4, "gamma": 0.2, "pad_mode": "reflect"}  # fmt: skip
    assert run([*argv, "--epochs", 2, "--resume"], capsys)[0] == 0
    assert len(pd.read_csv(save / "log.csv")) == 2
    code, out, _ = run(
        ["--evaluate", save / "latest.pt", "--export", tmp_path / "folded.pt", "--device", "cpu"],
        capsys,
    )
    assert code == 0 and "rebuild with" in out
    build = lambda: diracnet.diracnet_cifar(10, 0.25, 10, 1)
    net = assert_export_computes_the_checkpoint(save / "latest.pt", tmp_path / "folded.pt", build)
    assert not any("." in name for name, _ in net.named_children())


def assert_export_computes_the_checkpoint(ckpt: Path, export: Path, build) -> nn.Module:
    """The folded network in `export` is the checkpoint's model folded: each tensor equals
    a float64 fold of the checkpoint to fp32 rounding, and so do its outputs; returns it."""
    model = build().double().eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    exact = diracnet.fold(model)
    folded = diracnet.fold(build()).double()
    folded.load_state_dict(torch.load(export, weights_only=True)["state_dict"])
    # The export folds in fp32: a handful of roundings (2^-24 each) per weight and bias,
    # far below 2^-16 of a tensor; folding another model's weights is off by O(1).
    pairs = zip(folded.state_dict().items(), exact.state_dict().values(), strict=True)
    for (name, got), want in pairs:
        assert (got - want).norm() <= 2**-16 * want.norm(), name
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert (got - want).abs().max() <= 2**-16 * want.abs().max()
    return folded


def test_other_checkpoint_formats(tmp_path, capsys):
    argv, save = mnist_run(tmp_path)
    assert run([*argv, "--epochs", 1], capsys)[0] == 0
    ckpt = torch.load(save / "latest.pt", weights_only=True)
    assert ckpt["format"] == runstate.FORMAT
    torch.save({**ckpt, "format": 99}, save / "latest.pt")
    code, _, err = run([*argv, "--resume", "--epochs", 2], capsys)
    assert code == 2 and "checkpoint format 99; this train.py reads formats 1, 2" in err
    assert err.count("\n") == 1
    # format 1, written before checkpoints carried a version, still resumes
    legacy = {k: v for k, v in ckpt.items() if k != "format"}
    legacy["ranks"] = [
        {**r, "rng": {k: v for k, v in r["rng"].items() if k != "mps"}} for r in ckpt["ranks"]
    ]
    torch.save(legacy, save / "latest.pt")
    assert run([*argv, "--resume", "--epochs", 2], capsys)[0] == 0
    assert list(pd.read_csv(save / "log.csv").epoch) == [1, 2]


# ----------------------------------------------------------------------------- reporting


def test_val_split_chooses_best_pt_and_the_test_error_is_reported(tmp_path, capsys):
    argv, save = mnist_run(tmp_path, n_train=128)
    code, out, _ = run([*argv, "--epochs", 3, "--val-split", 32, "--lr", 0.5], capsys)
    assert code == 0
    log = pd.read_csv(save / "log.csv")
    assert {"val_loss", "val_err"} <= set(log.columns)
    best = log.loc[log.val_err.idxmin()]
    assert torch.load(save / "best.pt", weights_only=True)["epoch"] == int(best.epoch)
    last = log.iloc[-1]
    closing = out.strip().splitlines()[-1]
    assert closing.startswith(f"final test error {last.test_err:.2f}% (epoch 3)")
    assert (
        f"best.pt: epoch {int(best.epoch)}, lowest validation error {best.val_err:.2f}%" in closing
    )
    assert f"its test error {best.test_err:.2f}%" in closing


def test_diracnet_restarts_momentum_at_each_lr_drop(tmp_path, capsys):
    """One step an epoch; the lr drops at the start of epoch 2 (step round(0.9 * 2) = 2).
    SGD's buffer after step t is b_t = 0.9 b_(t-1) + d_t, and both runs take the same
    step 1 (so the same d_2): without a restart b_2 = 0.9 b_1 + d_2, with one b_2 = d_2,
    so their difference is 0.9 b_1, b_1 read from a one-epoch run."""
    synthetic.make_mnist(tmp_path / "data", "mnist", n_train=32, n_test=32)
    argv = ["--model", "diracnet", "--dataset", "mnist", "--data-dir", tmp_path / "data",
            "--depth", 10, "--width", 0.25, "--batch-size", 32, "--milestones", 0.9,
            "--no-plot", "--device", "cpu"]  # fmt: skip
    buffers = {}
    for flag, epochs in [
        ("--restart-momentum", 2),
        ("--no-restart-momentum", 2),
        ("--restart-momentum", 1),
    ]:
        save = tmp_path / f"{flag}{epochs}"
        assert run([*argv, flag, "--epochs", epochs, "--save", save], capsys)[0] == 0
        ckpt = torch.load(save / "latest.pt", weights_only=True)
        # dropped: 0.1 * 0.2 in float64 is 0.02 but for its last bit
        assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.02)
        buffers[flag, epochs] = [s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values()]
    restarted, kept = buffers["--restart-momentum", 2], buffers["--no-restart-momentum", 2]
    for b2, k2, b1 in zip(restarted, kept, buffers["--restart-momentum", 1], strict=True):
        # one fp32 add apart: within a few ulps of the largest term
        scale = float(k2.abs().max() + b2.abs().max())
        torch.testing.assert_close(k2 - b2, 0.9 * b1, rtol=0, atol=1e-6 * scale)
        assert not torch.equal(k2, b2)
    args = json.loads((tmp_path / "--restart-momentum2" / "args.json").read_text())
    settings, _ = resolve({"model": "diracnet"}, recipes.probe(torch.device("cpu")))
    assert args["restart_momentum"] and settings.restart_momentum  # the official trainer's default


# ----------------------------------------------------------------------------- robustness


def test_diracnet_v1_trains_with_its_recipe_and_exports(tmp_path, capsys):
    synthetic.make_mnist(tmp_path / "data", "fashion-mnist", n_train=64, n_test=32)
    save = tmp_path / "v1"
    argv = ["--model", "diracnet", "--dirac-version", 1, "--dataset", "fashion-mnist",
            "--data-dir", tmp_path / "data", "--depth", 10, "--width", 0.25, "--batch-size", 32,
            "--epochs", 1, "--save", save, "--no-plot", "--device", "cpu"]  # fmt: skip
    assert run(argv, capsys)[0] == 0
    args = json.loads((save / "args.json").read_text())
    assert (args["dirac_version"], args["pad_mode"]) == (1, "symmetric")
    code, out, _ = run(["--evaluate", save / "latest.pt", "--data-dir", tmp_path / "data",
                        "--export", tmp_path / "folded.pt", "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0 and "diracnet_cifar(10, 0.25, 10, 1, version=1)" in out
    build = lambda: diracnet.diracnet_cifar(10, 0.25, 10, 1, version=1)
    net = assert_export_computes_the_checkpoint(save / "latest.pt", tmp_path / "folded.pt", build)
    assert any(isinstance(m, diracnet.NCReLU) for m in net.modules())
