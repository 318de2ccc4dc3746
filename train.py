#!/usr/bin/env python3
"""Train DenseNet (or DiracNet) with the paper's recipe; stop at any moment and resume exactly.

./train.py                                   # DenseNet-BC-100-12 on CIFAR-10+, as in the paper
./train.py --dataset fashion-mnist --depth 40 --growth 12 --epochs 10
./train.py --resume                          # continue work/cifar10.densenet-bc-100-12
torchrun --nproc_per_node 4 train.py --dataset imagenet --data-dir /data/imagenet
"""

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import data
import densenet
import diracnet
import engine
import plot

IMAGENET_ARCHS = (
    "densenet121",
    "densenet169",
    "densenet201",
    "densenet161",
    "densenet264",
)
DIRAC_ARCHS = ("diracnet18", "diracnet34")
# Flags whose change makes a checkpoint a different experiment: refused on --resume.
IDENTITY = (
    "dataset",
    "model",
    "arch",
    "depth",
    "growth",
    "bottleneck",
    "compression",
    "width",
)


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


# ----------------------------------------------------------------------------- recipes


def recipe(a: argparse.Namespace) -> dict:
    """The published recipe for this dataset and model; explicit flags override it."""
    if a.dataset == "imagenet":  # paper Sec. 4.2 and the authors' fb.resnet.torch setup
        return {
            "arch": "densenet121", "batch_size": 256, "epochs": 90, "lr": 0.1, "momentum": 0.9,
            "nesterov": True, "weight_decay": 1e-4, "milestones": [1 / 3, 2 / 3], "gamma": 0.1,
            "augment": True, "drop_rate": 0.0, "workers": 8,
        }  # fmt: skip
    if a.model == "diracnet":  # official CIFAR recipe of szagoruyko/diracnets
        return {
            "depth": 34, "width": 1.0, "batch_size": 128, "epochs": 200, "lr": 0.1, "momentum": 0.9,
            "nesterov": False, "weight_decay": 5e-4, "milestones": [0.3, 0.6, 0.8], "gamma": 0.2,
            "augment": a.dataset != "svhn", "drop_rate": 0.0, "pad_mode": "reflect",
        }  # fmt: skip
    r = {
        "depth": 100, "growth": 12, "bottleneck": True, "batch_size": 64, "epochs": 300, "lr": 0.1,
        "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "milestones": [0.5, 0.75],
        "gamma": 0.1, "augment": True, "pad_mode": "constant",
    }  # fmt: skip
    if a.dataset == "svhn":  # paper Sec. 4.2: no augmentation, dropout 0.2, 40 epochs
        r.update(augment=False, epochs=40)
    if a.dataset in ("mnist", "fashion-mnist"):  # not in the paper: our short schedule
        r.update(epochs=40)
    augment = r["augment"] if a.augment is None else a.augment
    # the paper drops out only without augmentation
    r["drop_rate"] = 0.0 if augment else 0.2
    r["compression"] = (
        0.5 if (a.bottleneck if a.bottleneck is not None else True) else 1.0
    )
    return r


def run_name(a: argparse.Namespace) -> str:
    if a.dataset == "imagenet":
        return a.arch
    if a.model == "diracnet":
        return f"diracnet-{a.depth}-{a.width:g}"
    bc = "-bc" if a.bottleneck and a.compression < 1 else ""
    return f"densenet{bc}-{a.depth}-{a.growth}"


def logs_top5(a: argparse.Namespace, num_classes: int) -> bool:
    """Top-5 errors for 100+ classes, and always for ImageNet (the paper's metric)."""
    return num_classes >= 100 or a.dataset == "imagenet"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags left unset are None: the recipe, the device or a resumed run fills them."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_off, true = argparse.BooleanOptionalAction, "store_true"
    # fmt: off
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=("densenet", "diracnet"), help="(default densenet)")
    m.add_argument("--arch", choices=IMAGENET_ARCHS + DIRAC_ARCHS, help="ImageNet model (densenet121)")
    m.add_argument("--depth", type=int, help="network depth L (default 100; diracnet 34)")
    m.add_argument("--growth", type=int, help="growth rate k (default 12)")
    m.add_argument("--no-bottleneck", dest="bottleneck", action="store_false", default=None,
                   help="plain 3x3 layers (DenseNet rather than DenseNet-B)")
    m.add_argument("--compression", type=float, help="theta (default 0.5 with bottleneck, else 1)")
    m.add_argument("--width", type=float, help="DiracNet width multiplier (default 1)")
    m.add_argument("--drop-rate", type=float, help="dropout (default 0.2 without augmentation)")
    m.add_argument("--memory-efficient", action=true, default=None, help="linear-memory DenseNet")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=(*data.DATASETS, "imagenet"), help="(default cifar10)")
    d.add_argument("--data-dir", help="dataset folder (default data/)")
    d.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    d.add_argument("--train-subset", type=int, metavar="N", help="train on the first N images")
    d.add_argument("--workers", type=int, help="ImageNet DataLoader workers per process (8)")
    d.add_argument("--ten-crop", action=true, default=None, help="ImageNet 10-crop evaluation")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, help="GLOBAL batch, split over torchrun ranks (64)")
    o.add_argument("--epochs", type=int, help="(default 300; SVHN 40; diracnet 200)")
    o.add_argument("--lr", type=float, help="initial learning rate (0.1)")
    o.add_argument("--momentum", type=float, help="(0.9)")
    o.add_argument("--nesterov", action=on_off, default=None, help="(on; diracnet off)")
    o.add_argument("--weight-decay", type=float, help="(1e-4; diracnet 5e-4)")
    o.add_argument("--milestones", type=float, nargs="+", help="lr drops, fractions of the epochs")
    o.add_argument("--gamma", type=float, help="lr factor at each milestone (0.1; diracnet 0.2)")
    o.add_argument("--seed", type=int, help="(default 0)")
    f = p.add_argument_group("speed")
    f.add_argument("--amp", choices=("off", "bf16", "fp16"), help="autocast (default: README)")
    f.add_argument("--channels-last", action=on_off, default=None)
    f.add_argument("--compile", action=on_off, default=None, help="torch.compile (default on CUDA)")
    f.add_argument("--sync-bn", action=true, default=None, help="SyncBatchNorm over ranks (CUDA)")
    r = p.add_argument_group("run")
    r.add_argument("--save", help="run folder (default work/<dataset>.<model name>)")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    r.add_argument("--resume", action=true, help="continue from <save>/latest.pt")
    r.add_argument("--evaluate", metavar="CHECKPOINT", nargs="?", const="",
                   help="evaluate a checkpoint (or --pretrained weights), no training")
    r.add_argument("--pretrained", metavar="FILE", help="with --evaluate: torchvision weights")
    r.add_argument("--export", metavar="OUT", help="with --evaluate: write the folded DiracNet")
    r.add_argument("--tensorboard", action=true, default=None, help="also log to <save>/tb")
    r.add_argument("--no-plot", dest="plot", action="store_false", default=None, help="no figures")
    # fmt: on
    return p.parse_args(argv)


# Defaults that do not depend on the recipe; flags left at None are "not given".
DEFAULTS = {
    "model": "densenet", "dataset": "cifar10", "data_dir": "data", "seed": 0, "memory_efficient": False,
    "ten_crop": False, "sync_bn": False, "tensorboard": False, "plot": True,
}  # fmt: skip


def adopt(a: argparse.Namespace, old: dict, given: set[str]) -> None:
    """Continue a run as it was started: its settings, unless the user typed another."""
    for key, value in old.items():
        if key not in given and key not in ("resume", "device", "evaluate"):
            setattr(a, key, value)


def resolve(a: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill every flag left unset from the recipe and the device; check combinations."""
    if a.arch and a.dataset != "imagenet":
        raise UserError(
            "--arch is for --dataset imagenet; use --depth/--growth/--width otherwise"
        )
    if a.arch in DIRAC_ARCHS:
        a.model = "diracnet"
    for key, value in recipe(a).items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    cuda = device.type == "cuda"
    # Fast paths (README "Speed" has the measurements): on CUDA bf16 autocast, channels_last
    # and torch.compile; on CPU bf16 autocast and channels_last, no compile (slow to build).
    a.amp = a.amp or "bf16"
    a.channels_last = True if a.channels_last is None else a.channels_last
    a.compile = cuda if a.compile is None else a.compile
    a.save = a.save or str(Path("work") / f"{a.dataset}.{run_name(a)}")
    if a.sync_bn and not cuda:
        raise UserError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel)")
    if a.amp == "fp16" and not cuda:
        raise UserError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    for name in ("batch_size", "epochs", "depth", "growth", "train_subset"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if a.workers is not None and a.workers < 0:
        raise UserError("--workers must be 0 (load in the main process) or more")
    if not all(0 < m < 1 for m in a.milestones):
        raise UserError("--milestones are fractions of the epochs, each in (0, 1)")
    return a


# ----------------------------------------------------------------------------- setup


def setup_distributed(device_flag: str) -> tuple[int, int, torch.device]:
    """One process per GPU under torchrun (NCCL), or per CPU process (gloo)."""
    rank, world = (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
    )
    cuda = torch.cuda.is_available() and device_flag in ("auto", "cuda")
    if device_flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device_flag}: no CUDA device is available")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if cuda else "gloo", device_id=device if cuda else None
        )
    else:
        device = torch.device(
            "cuda" if cuda else device_flag if device_flag != "auto" else "cpu"
        )
    return rank, world, device


def build_model(
    a: argparse.Namespace, info: data.DatasetInfo, device: torch.device
) -> nn.Module:
    """The network the flags describe, on the device in the chosen memory layout (SyncBatchNorm
    under --sync-bn); ValueErrors from the model become user errors."""
    try:
        if a.dataset == "imagenet" and a.arch in DIRAC_ARCHS:
            net = getattr(diracnet, a.arch)(num_classes=info.num_classes)
        elif a.dataset == "imagenet":
            net = getattr(densenet, a.arch)(
                num_classes=info.num_classes, drop_rate=a.drop_rate,
                memory_efficient=a.memory_efficient,
            )  # fmt: skip
        elif a.model == "diracnet":
            net = diracnet.diracnet_cifar(
                a.depth, a.width, info.num_classes, info.in_channels
            )
        else:
            net = densenet.densenet_cifar(
                a.depth, a.growth, bottleneck=a.bottleneck, compression=a.compression,
                drop_rate=a.drop_rate, num_classes=info.num_classes,
                in_channels=info.in_channels, memory_efficient=a.memory_efficient,
            )  # fmt: skip
    except ValueError as e:
        raise UserError(str(e)) from None
    if a.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    layout = torch.channels_last if a.channels_last else torch.preserve_format
    return net.to(device, memory_format=layout)


def build_data(a: argparse.Namespace, rank: int, world: int, device: torch.device):
    """(info, train batches, {"val"?: ..., "test": ...}); small datasets live on the device."""
    if a.dataset == "imagenet":
        info, train, val = data.imagenet(
            a.data_dir, a.batch_size, workers=a.workers, seed=a.seed, rank=rank,
            world_size=world, ten_crop=a.ten_crop, device=device, channels_last=a.channels_last,
        )  # fmt: skip
        return info, train, {"test": val}
    info = data.DATASETS[a.dataset]
    # Under torchrun each node's first process downloads while the others wait, so no two
    # processes write the same files; every process passes exactly one barrier.
    first_on_node = os.environ.get("LOCAL_RANK", "0") == "0"
    if world > 1 and not first_on_node:
        dist.barrier()
    splits = data.load(a.dataset, a.data_dir, device, train_subset=a.train_subset)
    if world > 1 and first_on_node:
        dist.barrier()
    if a.dataset == "svhn":
        mean = std = None  # the paper divides SVHN pixels by 255 and nothing more
    else:
        mean, std = data.channel_stats(splits["train"].images)
    common = {
        "mean": mean,
        "std": std,
        "rank": rank,
        "world_size": world,
        "channels_last": a.channels_last,
    }
    try:
        train = data.Batches(
            splits["train"], a.batch_size, train=True, augment=a.augment, crop_pad=info.crop_pad,
            flip=info.flip, pad_mode=a.pad_mode, seed=a.seed, **common,
        )  # fmt: skip
        evals = {
            name: data.Batches(splits[name], a.batch_size, train=False, **common)
            for name in ("val", "test")
            if name in splits
        }
    except ValueError as e:
        raise UserError(str(e)) from None
    if len(train) == 0:
        raise UserError(
            f"--batch-size {a.batch_size} exceeds the {len(splits['train'].images)} training images"
        )
    return info, train, evals


def build_optimizer(a: argparse.Namespace, model: nn.Module):
    if a.model == "diracnet":  # decay on conv and linear weights only (official recipe)
        params = diracnet.weight_decay_groups(model, a.weight_decay)
    else:
        params = [{"params": list(model.parameters()), "weight_decay": a.weight_decay}]
    try:  # SGD checks lr, momentum and weight decay itself
        opt = torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, nesterov=a.nesterov)
    except ValueError as e:
        raise UserError(f"{e} (--lr, --momentum, --weight-decay, --nesterov)") from None
    milestones = sorted({round(f * a.epochs) for f in a.milestones})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=a.gamma)
    return opt, sched


# ----------------------------------------------------------------------------- main


def start_or_resume(a: argparse.Namespace, given: set[str], save: Path) -> dict | None:
    """The checkpoint to continue from, or None; refuses to touch an existing run otherwise."""
    latest = save / "latest.pt"
    if not a.resume:
        if latest.exists() or (save / "log.csv").exists():
            raise UserError(
                f"{save} already holds a run: pass --resume to continue it, or --save another folder"
            )
        return None
    ckpt = engine.load_checkpoint(latest)
    old = ckpt["args"]
    differ = [k for k in IDENTITY if k in given and getattr(a, k) != old.get(k)]
    if differ:
        what = ", ".join(
            f"--{k} {getattr(a, k)} (checkpoint: {old.get(k)})" for k in differ
        )
        raise UserError(f"--resume: {latest} is a different run: {what}")
    return ckpt


def run_evaluate(
    a: argparse.Namespace, given: set[str], rank: int, world: int, device
) -> int:
    """--evaluate: loss and error of a checkpoint (or torchvision weights) on the test set."""
    state = None
    if not a.evaluate and not a.pretrained:
        raise UserError("--evaluate needs a CHECKPOINT, or --pretrained FILE")
    if a.pretrained:
        if a.dataset != "imagenet":
            raise UserError(
                "--pretrained takes torchvision ImageNet weights: add --dataset imagenet"
            )
    else:
        ckpt = engine.load_checkpoint(a.evaluate)
        adopt(
            a,
            {k: v for k, v in ckpt["args"].items() if k in IDENTITY + ("arch",)},
            given,
        )
        state = ckpt["model"]
    a = resolve(a, device)
    info, _, evals = build_data(a, rank, world, device)
    net = build_model(a, info, device)
    try:
        if state is None:
            densenet.load_torchvision_checkpoint(net, a.pretrained)
        else:
            net.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise UserError(
            f"{a.pretrained or a.evaluate}: {str(e).splitlines()[0]}"
        ) from None
    top5 = logs_top5(a, info.num_classes)
    for name, batches in evals.items():
        row = engine.summarise(
            engine.evaluate(net, batches, a.amp, top5, world), name, top5
        )
        if rank == 0:
            print(" ".join(f"{k} {v:.4f}" for k, v in row.items()))
    if a.export and rank == 0:
        if a.model != "diracnet":
            raise UserError(
                "--export folds a DiracNet; this checkpoint holds a DenseNet"
            )
        folded = diracnet.fold(net.float().cpu().eval())
        builder = (
            a.arch
            if a.dataset == "imagenet"
            else f"diracnet_cifar({a.depth}, {a.width:g}, {info.num_classes}, {info.in_channels})"
        )
        rebuild = f"net = diracnet.fold(diracnet.{builder}); net.load_state_dict(torch.load(path)['state_dict'])"
        engine.atomic_save(
            {"state_dict": folded.state_dict(), "rebuild": rebuild}, Path(a.export)
        )
        print(f"wrote the folded network to {a.export}; rebuild with: {rebuild}")
    return 0


def run(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    given = {k for k, v in vars(a).items() if v is not None} - {"resume", "device"}
    for key, value in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    rank, world, device = setup_distributed(a.device)
    if device.type == "cpu":
        engine.keep_freed_memory()
    a.tty = sys.stderr.isatty() and rank == 0
    if a.evaluate is not None:
        return run_evaluate(a, given, rank, world, device)
    save = Path(a.save or resolve(argparse.Namespace(**vars(a)), device).save)
    if world == 1:
        ckpt = start_or_resume(a, given, save)
    else:  # rank 0 decides and tells the others, errors included, so no rank hangs
        box = [None]
        if rank == 0:
            try:
                box = [start_or_resume(a, given, save)]
            except UserError as e:
                box = [str(e)]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise UserError(box[0])
        ckpt = box[0]
    if ckpt is not None:
        adopt(a, ckpt["args"], given)
    a = resolve(a, device)
    a.save = str(save)
    torch.manual_seed(a.seed + rank)  # dropout differs per rank; data draws are shared
    random.seed(a.seed)
    np.random.seed(a.seed)
    info, train, evals = build_data(a, rank, world, device)
    net = build_model(a, info, device)
    opt, sched = build_optimizer(a, net)
    scaler = torch.amp.GradScaler(device.type, enabled=a.amp == "fp16")
    epoch, step, best, seconds = 0, 0, math.inf, 0.0
    sums = torch.zeros(4, device=device)
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        epoch, step, best, seconds = (
            ckpt["epoch"],
            ckpt["step"],
            ckpt["best"],
            ckpt["seconds"],
        )
        # Each rank's random streams and partial-epoch metric sums; with another world
        # size, rank 0 takes the totals and the first rank's streams.
        ranks = ckpt["ranks"]
        mine = ranks[rank] if len(ranks) == world else ranks[0]
        engine.set_rng_state(mine["rng"])
        sums = mine["sums"].to(device)
        if len(ranks) != world:
            sums = sum(r["sums"] for r in ranks).to(device) * (rank == 0)
        train.generator.set_state(ckpt["data_rng"])
    model = net
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    if a.compile:
        model = torch.compile(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log = save / "log.csv"
    # what args.json and checkpoints hold
    args = {k: v for k, v in vars(a).items() if k != "tty"}
    writer = None
    if rank == 0:
        save.mkdir(parents=True, exist_ok=True)
        engine.trim_log(log, epoch)
        meta = {"torch": torch.__version__, "device": str(device), "world_size": world}
        (save / "args.json").write_text(json.dumps({**args, **meta}, indent=2) + "\n")
        if a.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "--tensorboard needs tensorboard: pip install tensorboard"
                ) from None
            writer = SummaryWriter(save / "tb")
        params = sum(p.numel() for p in net.parameters())
        print(f"{save}: {run_name(a)} on {a.dataset}, {params:,} parameters, {device} x{world}, "
              f"amp {a.amp}, epoch {epoch + 1} of {a.epochs}", flush=True)  # fmt: skip
    figures = plot.Background(save, enabled=a.plot and rank == 0)
    # Stop votes travel over gloo on the CPU, whatever backend the gradients use.
    group = dist.new_group(backend="gloo") if world > 1 else None
    stop = engine.Stop()
    top5 = logs_top5(a, info.num_classes)

    def checkpoint(paths: list[Path]) -> None:
        ranks = [{"rng": engine.rng_state(), "sums": sums.cpu()}] * world
        if world > 1:
            dist.all_gather_object(ranks, ranks[0])
        if rank == 0:
            state = {
                "model": net.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "step": step, "best": best, "seconds": seconds, "ranks": ranks,
                "data_rng": data_rng, "args": args,
            }  # fmt: skip
            for path in paths:
                engine.atomic_save(state, path)

    # Each epoch's draws come from data_rng: a mid-epoch resume redraws them and skips ahead.
    data_rng = train.generator.get_state()
    while epoch < a.epochs:
        lr = opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        sums, step, signum = engine.train_epoch(
            model, opt, scaler, train, sums, amp=a.amp, top5=top5, start=step, stop=stop,
            group=group, progress=a.tty,
        )  # fmt: skip
        seconds += time.perf_counter() - t0
        if not torch.isfinite(sums[0]):
            kept = save / "latest.pt"
            kept = (
                f"{kept} holds the last good state"
                if kept.exists()
                else "nothing was saved"
            )
            raise UserError(
                f"the training loss became non-finite in epoch {epoch + 1}; {kept} (try a lower --lr)"
            )
        if signum:
            checkpoint([save / "latest.pt"])
            if rank == 0:
                print(f"stopped by signal {signum} in epoch {epoch + 1} after step {step}; "
                      f"saved {save}/latest.pt. Resume with the same command and --resume", flush=True)  # fmt: skip
            return 128 + signum
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            **engine.summarise(engine.reduce(sums, world), "train", top5),
        }
        for name, batches in evals.items():
            row.update(
                engine.summarise(
                    engine.evaluate(model, batches, a.amp, top5, world), name, top5
                )
            )
        row["seconds"] = seconds
        sched.step()
        epoch, step, seconds = epoch + 1, 0, 0.0
        sums = torch.zeros(4, device=device)
        data_rng = train.generator.get_state()
        # SVHN picks its epoch on validation error; the others on test error.
        score = row.get("val_err", row["test_err"])
        improved, best = score < best, min(best, score)
        if rank == 0:
            engine.append_row(log, row)
            print(" ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
            if writer:
                for k, v in row.items():
                    writer.add_scalar(k, v, epoch)
                writer.flush()
        checkpoint([save / "latest.pt"] + ([save / "best.pt"] if improved else []))
        figures.refresh()
    figures.finish()
    if rank == 0:
        print(
            f"done: best {'val' if 'val' in evals else 'test'} error {best:.2f}% ({save}/best.pt)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # Denormal floats (tiny weights and gradients late in training, common with bf16) send
    # CPU kernels down a path ~50x slower; flushing them to zero costs no accuracy.
    torch.set_flush_denormal(True)
    try:
        code = run(argv)
    except (UserError, data.DataError, engine.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1 if isinstance(e, data.DataError) else 2
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
