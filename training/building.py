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
from training.settings import Settings


def build_model(settings: Settings, info: data.DatasetInfo, device: torch.device) -> nn.Module:
    """The network the flags describe, on the device in the chosen memory layout (SyncBatchNorm
    under --sync-bn, shared statistics under --shared-stats); ValueErrors from the model
    become user errors."""
    try:
        if settings.dataset == "imagenet" and settings.arch in DIRAC_ARCHS:
            net = getattr(diracnet, settings.arch)(
                num_classes=info.num_classes, version=settings.dirac_version
            )
        elif settings.dataset == "imagenet":
            net = getattr(densenet, settings.arch)(
                num_classes=info.num_classes, drop_rate=settings.drop_rate,
                memory_efficient=settings.memory_efficient,
            )  # fmt: skip
        elif settings.model == "diracnet":
            net = diracnet.diracnet_cifar(
                settings.depth, settings.width, info.num_classes, info.in_channels,
                version=settings.dirac_version,
            )  # fmt: skip
        else:
            net = densenet.densenet_cifar(
                settings.depth, settings.growth, bottleneck=settings.bottleneck,
                compression=settings.compression, drop_rate=settings.drop_rate,
                num_classes=info.num_classes, in_channels=info.in_channels,
                memory_efficient=settings.memory_efficient,
            )  # fmt: skip
    except ValueError as e:
        raise UserError(str(e)) from None
    if settings.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if settings.shared_stats:
        net = sharedstats.convert_shared_stats(net)
    layout = torch.channels_last if settings.channels_last else torch.preserve_format
    return net.to(device, memory_format=layout)


def build_data(
    settings: Settings, place: Placement
) -> tuple[data.DatasetInfo, data.BatchSource, dict]:
    """(info, training batches, {"val"?: ..., "test": ...}); small datasets live on the device."""
    rank, world, device = place.rank, place.world, place.device
    if settings.dataset == "imagenet":
        info, train, val = data.imagenet(
            settings.data_dir, settings.batch_size, workers=settings.workers, seed=settings.seed,
            rank=rank, world_size=world, ten_crop=settings.ten_crop,
            colour=settings.colour_augment, device=device, channels_last=settings.channels_last,
        )  # fmt: skip
        return info, train, {"test": val}
    info = data.DATASETS[settings.dataset]
    # Under torchrun each node's first process downloads while the others wait, so no two
    # processes write the same files; every process passes exactly one barrier.
    first_on_node = os.environ.get("LOCAL_RANK", "0") == "0"
    if world > 1 and not first_on_node:
        dist.barrier()
    splits = data.load(settings.dataset, settings.data_dir, device,
                       train_subset=settings.train_subset, val_split=settings.val_split,
                       seed=settings.seed)  # fmt: skip
    if world > 1 and first_on_node:
        dist.barrier()
    mean, std = data.normalisation(info, splits["train"])
    common = {"mean": mean, "std": std, "rank": rank, "world_size": world,
              "channels_last": settings.channels_last}  # fmt: skip
    try:
        train = data.Batches(
            splits["train"], settings.batch_size, train=True, augment=settings.augment,
            crop_pad=info.crop_pad, flip=info.flip, pad_mode=settings.pad_mode, seed=settings.seed,
            **common,
        )  # fmt: skip
        evals = {
            name: data.Batches(splits[name], settings.batch_size, train=False, **common)
            for name in ("val", "test")
            if name in splits
        }
    except ValueError as e:
        raise UserError(str(e)) from None
    return info, train, evals


def build_optimizer(settings: Settings, model: nn.Module) -> torch.optim.SGD:
    """SGD as the recipe sets it; fused on CUDA (one kernel, and GradScaler then unscales and
    checks for infs on the device, without a host sync)."""
    if settings.model == "diracnet":  # decay on conv and linear weights only (official recipe)
        params = diracnet.weight_decay_groups(model, settings.weight_decay)
    else:
        params = [{"params": list(model.parameters()), "weight_decay": settings.weight_decay}]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    try:  # SGD checks lr, momentum and weight decay itself
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               nesterov=settings.nesterov, **fused)  # fmt: skip
    except ValueError as e:
        raise UserError(f"{e} (--lr, --momentum, --weight-decay, --nesterov)") from None


def build_scheduler(
    settings: Settings, opt: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's lr schedule: stepped once an epoch at the official code's drops
    (recipes.lr_drops), or under cosine once a training step (recipes.cosine)."""
    if settings.schedule == "cosine":
        total = settings.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(opt, partial(recipes.cosine, total=total))
    drops = recipes.lr_drops(settings.schedule, settings.milestones, settings.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(opt, drops, gamma=settings.gamma)


def model_and_optimizer(settings: Settings, info: data.DatasetInfo, device: torch.device) -> tuple:
    """(net, optimizer): every model and optimizer flag checked."""
    net = build_model(settings, info, device)
    return net, build_optimizer(settings, net)


def wrap(
    settings: Settings, place: Placement, state: runstate.RunState, train: data.BatchSource
) -> nn.Module:
    """The model the loop calls: the net under DDP and torch.compile as asked; a compiler
    that fails is reported in one line and the run continues eagerly. Where the CPU chose
    compiling, compiled and eager steps are timed first and the faster one kept."""
    net = model = state.model
    if place.world > 1:
        ids = [place.device.index] if place.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    if not settings.compile:
        return model
    t0 = time.perf_counter()
    compiled, failure = engine.compile_or_eager(
        model, net, settings.compile_mode, train, settings.amp, place.world
    )
    if failure:
        settings.compile = False  # args.json says what runs
    if place.rank == 0 and failure:
        print(f"warning: torch.compile failed, training eagerly: {failure}", file=sys.stderr)
    elif place.rank == 0:
        print(f"compiled the model in {time.perf_counter() - t0:.0f} s", flush=True)
    if failure or not recipes.measures_compile(settings, place.device.type):
        return compiled
    return faster(settings, place, state, train, {"eager": model, "compiled": compiled})


def faster(settings: Settings, place: Placement, state: runstate.RunState,
           train: data.BatchSource, models: dict[str, nn.Module]) -> nn.Module:  # fmt: skip
    """The faster of the eager and the compiled model on this machine, timed on the run's
    first batches without changing the run; args.json records the figures
    (settings.compile_measured)."""
    t0 = time.perf_counter()
    times = engine.step_times(models, state.model, state.optimizer, state.scaler, train,
                              settings.amp, recipes.COMPILE_TIMED_STEPS)  # fmt: skip
    choice = recipes.choose_compile(times["eager"], times["compiled"])
    choice["timing_s"] = time.perf_counter() - t0  # what timing added to the start
    if place.world > 1:  # every rank takes rank 0's choice
        choice = on_rank0(place, lambda: choice)
    settings.compile, settings.compile_measured = choice["compile"], choice
    if place.rank == 0:
        print(recipes.compile_line(choice), flush=True)
    if settings.compile:
        return models["compiled"]
    torch.compiler.reset()  # free the compiled graphs
    return models["eager"]
