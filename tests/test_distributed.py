"""torchrun + DistributedDataParallel on CPU (gloo), ImageNet folders, and torch.hub."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from test_train import wait_for_line, wait_for_rows

import densenet
import synthetic
import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--depth", "10", "--growth", "4", "--no-plot", "--amp", "off"]


def cifar(tmp_path: Path, **kwargs) -> tuple[Path, Path]:
    """Synthetic CIFAR-10 files and the JSON of their MD5s for tests/train_with_md5.py."""
    syn = synthetic.make_cifar(tmp_path / "data", **kwargs)
    md5 = tmp_path / "md5.json"
    md5.write_text(json.dumps({"CIFAR10": syn.md5}))
    return tmp_path / "data", md5


def launch(md5: Path, argv: list, nproc: int = 2) -> subprocess.Popen:
    """train.py under torchrun (one gloo process per rank), or plainly when nproc is 0."""
    runner = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]
    cmd = [
        *(runner if nproc else [sys.executable]),
        str(ROOT / "tests" / "train_with_md5.py"),
        str(md5),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
    }
    return subprocess.Popen([*cmd, *map(str, argv)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def finish(proc: subprocess.Popen, code: int = 0) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, out + err
    return out


def test_ddp_run_logs_once_checkpoints_unwrapped_and_resumes(tmp_path):
    data, md5 = cifar(tmp_path, n_train=128, n_test=40)
    save = tmp_path / "run"
    # --memory-efficient: non-reentrant checkpointing under DDP
    argv = ["--dataset", "cifar10", "--data-dir", data, "--save", save, "--batch-size", 32,
            "--memory-efficient", *TINY]  # fmt: skip
    out = finish(launch(md5, [*argv, "--epochs", 2]))
    assert "cpu x2" in out and out.count("epoch 1 lr") == 1  # rank 0 alone prints
    assert [p.name for p in tmp_path.rglob("log.csv")] == ["log.csv"]
    assert list(pd.read_csv(save / "log.csv").epoch) == [1, 2]
    ckpt = torch.load(save / "latest.pt", weights_only=True)
    densenet.densenet_cifar(10, 4).load_state_dict(ckpt["model"])  # no "module." prefix
    finish(launch(md5, [*argv, "--epochs", 3, "--resume"]))  # distributed resume
    # and in one process
    finish(launch(md5, [*argv, "--epochs", 4, "--resume"], nproc=0))
    assert list(pd.read_csv(save / "log.csv").epoch) == [1, 2, 3, 4]


def test_batch_size_must_split_over_ranks(tmp_path):
    data, md5 = cifar(tmp_path, n_train=64, n_test=20)
    proc = launch(
        md5, ["--data-dir", data, "--save", tmp_path / "r", "--batch-size", 33, *TINY]
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "does not split over 2 ranks" in err


def test_ddp_log_equals_one_process_log(tmp_path):
    # One image repeated with random labels: every batch, global or per rank, has the same
    # BatchNorm statistics, so two ranks of 16 must train exactly like one process of 32.
    data, md5 = cifar(tmp_path, n_train=128, n_test=40, same_image=True)
    # --val-split: the held-out images are the same for any world size
    argv = ["--dataset", "cifar10", "--data-dir", data, "--batch-size", 32, "--epochs", 2, "--no-augment",
            "--drop-rate", 0, "--val-split", 32, *TINY]  # fmt: skip
    finish(launch(md5, [*argv, "--save", tmp_path / "ddp"]))
    finish(launch(md5, [*argv, "--save", tmp_path / "one"], nproc=0))
    ddp, one = (
        pd.read_csv(tmp_path / d / "log.csv").drop(columns="seconds")
        for d in ("ddp", "one")
    )
    # The same arithmetic in another order (gradients summed over ranks by all-reduce):
    # weights differ by fp32 rounding amplified by training (up to 3*10^4 times 2^-24,
    # test_bench sees), but the logged losses are batch means, insensitive to that to
    # first order (their fp32 error stays near 2^-24 there): 1e-4 on any host
    pd.testing.assert_frame_equal(ddp, one, rtol=1e-4)
    assert "val_err" in ddp.columns and (tmp_path / "ddp" / "best.pt").exists()
    assert ddp.train_loss.iloc[0] != ddp.train_loss.iloc[1]  # it did learn something


def worker_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def test_sigterm_on_one_rank_stops_all_at_the_same_step(tmp_path):
    data, md5 = cifar(tmp_path, n_train=1600, n_test=40)  # 50 global steps per epoch
    save = tmp_path / "run"
    # with a validation split, which a resume must hold out again
    argv = ["--dataset", "cifar10", "--data-dir", data, "--save", save, "--batch-size", 32,
            "--epochs", 2, "--drop-rate", 0.1, "--val-split", 96, *TINY]  # fmt: skip
    ref = launch(md5, [*argv, "--save", tmp_path / "ref"])
    finish(ref)
    proc = launch(md5, argv)
    # Rank 0 prints epoch 1's row before epoch 2 starts: the signal lands in epoch 2, and
    # before its step 25, the ranks' first vote on a stop, however fast the host
    wait_for_line(proc, "epoch 1 lr")
    os.kill(worker_pids(proc.pid)[-1], signal.SIGTERM)  # one rank only
    out, err = proc.communicate(timeout=300)
    assert out.count("stopped by signal 15") == 1, out + err  # saved once, by rank 0
    stopped = torch.load(save / "latest.pt", weights_only=True)
    assert (
        stopped["epoch"] == 1
        and 0 < stopped["step"] < 50
        and len(stopped["ranks"]) == 2
    )
    finish(launch(md5, [*argv, "--resume"]))
    a, b = (
        torch.load(d / "latest.pt", weights_only=True) for d in (tmp_path / "ref", save)
    )
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    logs = (
        pd.read_csv(d / "log.csv").drop(columns="seconds")
        for d in (tmp_path / "ref", save)
    )
    pd.testing.assert_frame_equal(*logs, check_exact=True)  # the same bits, the same digits


def test_rank_0_holds_the_run_folder(tmp_path):
    """A second job on a folder a torchrun job writes is refused, naming the job's rank 0."""
    data, md5 = cifar(tmp_path, n_train=128, n_test=40)
    save = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--data-dir", data, "--save", save, "--batch-size", 32,
            "--epochs", 1000, "--no-compile", *TINY]  # fmt: skip
    job = launch(md5, argv)
    try:
        wait_for_rows(save / "log.csv", 1, job)  # rank 0 locks the folder, then logs
        second = launch(md5, [*argv, "--resume"], nproc=0)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2 and f"error: --save {save}: in use by pid " in err, err
        holder = int(err.split("in use by pid ")[1].split()[0])
        assert holder in worker_pids(job.pid)
        assert b"RANK=0" in Path(f"/proc/{holder}/environ").read_bytes().split(b"\0")
    finally:
        job.send_signal(signal.SIGTERM)  # torchrun passes it on: both ranks save and stop
        job.communicate(timeout=300)


def test_imagenet_folder_one_epoch_with_top5(tmp_path, capsys):
    synthetic.make_imagenet_folder(
        tmp_path / "imagenet", classes=6, per_class=2, size=64
    )
    save = tmp_path / "run"
    argv = ["--dataset", "imagenet", "--data-dir", tmp_path / "imagenet", "--arch", "densenet121",
            "--batch-size", 4, "--epochs", 1, "--workers", 1, "--save", save, "--no-plot"]  # fmt: skip
    assert train.main(list(map(str, argv))) == 0
    log = pd.read_csv(save / "log.csv")
    assert {"train_top5", "test_top5"} <= set(log.columns) and len(log) == 1
    args = json.loads((save / "args.json").read_text())
    assert (args["lr"], args["weight_decay"], args["nesterov"]) == (0.1, 1e-4, True)
    assert args["schedule"] == "every30" and args["lr_drops"] == []  # 1 epoch: no drop
    ten = ["--evaluate", save / "latest.pt", "--data-dir", tmp_path / "imagenet", "--ten-crop",
           "--workers", 0, "--batch-size", 4]  # fmt: skip
    assert train.main(list(map(str, ten))) == 0
    assert "test_top5" in capsys.readouterr().out


def test_evaluate_torchvision_weights(tmp_path, capsys):
    synthetic.make_imagenet_folder(
        tmp_path / "imagenet", classes=6, per_class=1, size=64
    )
    # A classifier that ignores the image: logits = its bias, 5 4 3 2 1 0, exact in bf16
    net = torchvision.models.densenet121(num_classes=6)
    bias = torch.arange(5.0, -1.0, -1.0)
    with torch.no_grad():
        net.classifier.weight.zero_(), net.classifier.bias.copy_(bias)
    weights = tmp_path / "densenet121.pth"
    torch.save(net.state_dict(), weights)
    argv = ["--dataset", "imagenet", "--arch", "densenet121", "--data-dir", tmp_path / "imagenet",
            "--evaluate", "--pretrained", weights, "--workers", 0, "--batch-size", 2]  # fmt: skip
    assert train.main(list(map(str, argv))) == 0
    printed = capsys.readouterr().out.split()
    row = dict(zip(printed[::2], map(float, printed[1::2]), strict=True))
    # One image per class, every one predicted class 0, class 5 outside the top 5; each
    # image's loss is logsumexp(bias) - bias[label]. Printed to 4 decimals.
    expected_loss = (torch.logsumexp(bias.double(), 0) - bias.double().mean()).item()
    assert row == pytest.approx(
        {"test_loss": expected_loss, "test_err": 500 / 6, "test_top5": 100 / 6}, abs=1e-4
    )


def test_hub_entry_points():
    counts = {"densenet_40_12": 1_019_722, "densenet_bc_100_12": 769_162, "densenet_bc_250_24": 15_324_406,
              "densenet_bc_190_40": 25_624_430, "densenet121": 7_978_856, "densenet169": 14_149_480,
              "densenet201": 20_013_928, "densenet161": 28_681_000, "densenet264": 33_337_704}  # fmt: skip
    for name, params in counts.items():
        model = torch.hub.load(str(ROOT), name, source="local")
        assert sum(p.numel() for p in model.parameters()) == params, name
    m = torch.hub.load(str(ROOT), "densenet121", source="local", num_classes=10)
    assert m.classifier.out_features == 10
