"""The run's parts as its settings describe them, shared by train.py and the measuring code:
the network, the data, SGD and the lr schedule, and the model the loop calls (under DDP,
compiled where that is asked for and, where the CPU chose compiling, timed to be faster)."""

import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

import densenet
import diracnet
import sharedstats
from training import data, engine, recipes, runstate
from training.engine import Placement, on_rank0
from training.errors import UserError
from training.recipes import DIRAC_ARCHS


def build_model(a, info: data.DatasetInfo, device: torch.device) -> nn.Module:
    """The network the flags describe, on the device in the chosen memory layout (SyncBatchNorm
    under --sync-bn, shared statistics under --shared-stats); ValueErrors from the model
    become user errors."""
    try:
        if a.dataset == "imagenet" and a.arch in DIRAC_ARCHS:
            net = getattr(diracnet, a.arch)(num_classes=info.num_classes, version=a.dirac_version)
        elif a.dataset == "imagenet":
            net = getattr(densenet, a.arch)(
                num_classes=info.num_classes, drop_rate=a.drop_rate,
                memory_efficient=a.memory_efficient,
            )  # fmt: skip
        elif a.model == "diracnet":
            net = diracnet.diracnet_cifar(
                a.depth, a.width, info.num_classes, info.in_channels, version=a.dirac_version
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
    if a.shared_stats:
        net = sharedstats.convert_shared_stats(net)
    layout = torch.channels_last if a.channels_last else torch.preserve_format
    return net.to(device, memory_format=layout)


def build_data(a, place: Placement) -> tuple[data.DatasetInfo, data.BatchSource, dict]:
    """(info, training batches, {"val"?: ..., "test": ...}); small datasets live on the device."""
    rank, world, device = place.rank, place.world, place.device
    if a.dataset == "imagenet":
        info, train, val = data.imagenet(
            a.data_dir, a.batch_size, workers=a.workers, seed=a.seed, rank=rank,
            world_size=world, ten_crop=a.ten_crop, colour=a.colour_augment, device=device,
            channels_last=a.channels_last,
        )  # fmt: skip
        return info, train, {"test": val}
    info = data.DATASETS[a.dataset]
    # Under torchrun each node's first process downloads while the others wait, so no two
    # processes write the same files; every process passes exactly one barrier.
    first_on_node = os.environ.get("LOCAL_RANK", "0") == "0"
    if world > 1 and not first_on_node:
        dist.barrier()
    splits = data.load(a.dataset, a.data_dir, device, train_subset=a.train_subset,
                       val_split=a.val_split, seed=a.seed)  # fmt: skip
    if world > 1 and first_on_node:
        dist.barrier()
    mean, std = data.normalisation(info, splits["train"])
    common = {"mean": mean, "std": std, "rank": rank, "world_size": world,
              "channels_last": a.channels_last}  # fmt: skip
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
    return info, train, evals


def build_optimizer(a, model: nn.Module) -> torch.optim.SGD:
    """SGD as the recipe sets it; fused on CUDA (one kernel, and GradScaler then unscales and
    checks for infs on the device, without a host sync)."""
    if a.model == "diracnet":  # decay on conv and linear weights only (official recipe)
        params = diracnet.weight_decay_groups(model, a.weight_decay)
    else:
        params = [{"params": list(model.parameters()), "weight_decay": a.weight_decay}]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    try:  # SGD checks lr, momentum and weight decay itself
        return torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, nesterov=a.nesterov, **fused)
    except ValueError as e:
        raise UserError(f"{e} (--lr, --momentum, --weight-decay, --nesterov)") from None


def build_scheduler(a, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """The recipe's lr schedule: stepped once an epoch at the official code's drops
    (recipes.lr_drops), or under cosine once a training step (recipes.cosine)."""
    if a.schedule == "cosine":
        total = a.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(opt, partial(recipes.cosine, total=total))
    drops = recipes.lr_drops(a.schedule, a.milestones, a.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(opt, drops, gamma=a.gamma)


def model_and_optimizer(a, info: data.DatasetInfo, device: torch.device) -> tuple:
    """(net, optimizer): every model and optimizer flag checked."""
    net = build_model(a, info, device)
    return net, build_optimizer(a, net)


def wrap(a, place: Placement, state: runstate.RunState, train: data.BatchSource) -> nn.Module:
    """The model the loop calls: the net under DDP and torch.compile as asked; a compiler
    that fails is reported in one line and the run continues eagerly. Where the CPU chose
    compiling, compiled and eager steps are timed first and the faster one kept."""
    net = model = state.model
    if place.world > 1:
        ids = [place.device.index] if place.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    if not a.compile:
        return model
    t0 = time.perf_counter()
    compiled, failure = engine.compile_or_eager(model, net, a.compile_mode, train, a.amp, place.world)
    if failure:
        a.compile = False  # args.json says what runs
    if place.rank == 0 and failure:
        print(f"warning: torch.compile failed, training eagerly: {failure}", file=sys.stderr)
    elif place.rank == 0:
        print(f"compiled the model in {time.perf_counter() - t0:.0f} s", flush=True)
    if failure or not recipes.measures_compile(a, place.device.type):
        return compiled
    return faster(a, place, state, train, {"eager": model, "compiled": compiled})


def faster(a, place: Placement, state: runstate.RunState, train: data.BatchSource,
           models: dict[str, nn.Module]) -> nn.Module:  # fmt: skip
    """The faster of the eager and the compiled model on this machine, timed on the run's
    first batches without changing the run; args.json records the figures (a.compile_measured)."""
    times = engine.step_times(models, state.model, state.optimizer, state.scaler, train, a.amp,
                              recipes.COMPILE_TIMED_STEPS)  # fmt: skip
    choice = recipes.choose_compile(times["eager"], times["compiled"])
    if place.world > 1:  # every rank takes rank 0's choice
        choice = on_rank0(place, lambda: choice)
    a.compile, a.compile_measured = choice["compile"], choice
    if place.rank == 0:
        print(recipes.compile_line(choice), flush=True)
    if a.compile:
        return models["compiled"]
    torch.compiler.reset()  # free the compiled graphs
    return models["eager"]
