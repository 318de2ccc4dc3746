"""The published recipes as data: the settings no recipe changes (COMMON), each model's and
dataset's recipe, the official lr schedule rules (and cosine), the device's capabilities and
the fast paths they choose by default, and the rule that decides compiling on the CPU.
training/settings.py merges these with a resumed run's settings and the user's flags.
"""

import argparse
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

IMAGENET_ARCHS = ("densenet121", "densenet169", "densenet201", "densenet161", "densenet264")
DIRAC_ARCHS = ("diracnet18", "diracnet34")

# Settings no recipe changes.
COMMON = {
    "model": "densenet", "dataset": "cifar10", "dirac_version": 2, "data_dir": "data",
    "seed": 0, "memory_efficient": False, "ten_crop": False, "sync_bn": False,
    "tensorboard": False, "plot": True, "val_split": 0, "deterministic": False,
    "compile_mode": "default", "workers": 8, "shared_stats": False,
}  # fmt: skip

# The lr schedule is a rule of the official code, applied to any number of epochs N
# (lr_drops below); "milestones" are its fractions of N.
# The paper's CIFAR recipe (Sec. 4.2), also used for SVHN and (Fashion-)MNIST.
DENSENET_SMALL = {
    "depth": 100, "growth": 12, "bottleneck": True, "batch_size": 64, "epochs": 300,
    "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "schedule": "lua",
    "milestones": [0.5, 0.75], "gamma": 0.1, "augment": True, "pad_mode": "constant",
}  # fmt: skip
# The Lua code has no SVHN (nor MNIST); the paper's text gives the same 50 % and 75 %,
# which we count as the Lua code counts them for CIFAR.
PAPER_SHORT = {"epochs": 40}
# szagoruyko/diracnets' official CIFAR recipe, v2 release: weight decay on conv and linear
# weights only (diracnet.weight_decay_groups decides per version), reflect padding.
DIRACNET_SMALL = {
    "depth": 34, "width": 1.0, "batch_size": 128, "epochs": 200, "lr": 0.1, "momentum": 0.9,
    "nesterov": False, "weight_decay": 5e-4, "schedule": "diracnet", "milestones": [0.3, 0.6, 0.8],
    "gamma": 0.2, "augment": True, "pad_mode": "reflect", "drop_rate": 0.0,
}  # fmt: skip
# Paper Sec. 4.2 with the authors' fb.resnet.torch setup: colour jitter and PCA lighting.
DENSENET_IMAGENET = {
    "arch": "densenet121", "batch_size": 256, "epochs": 90, "lr": 0.1, "momentum": 0.9,
    "nesterov": True, "weight_decay": 1e-4, "schedule": "every30", "milestones": [], "gamma": 0.1,
    "augment": True, "drop_rate": 0.0, "colour_augment": True,
}  # fmt: skip
# szagoruyko/diracnets' README command: --batchSize 256 --epoch_step [30,60,90] --epochs 100
# --weightDecay 0.0001 --lr_decay_ratio 0.1; random-sized crop and flip only, no Nesterov.
DIRACNET_IMAGENET = {
    "arch": "diracnet18", "batch_size": 256, "epochs": 100, "lr": 0.1, "momentum": 0.9,
    "nesterov": False, "weight_decay": 1e-4, "schedule": "diracnet", "milestones": [0.3, 0.6, 0.9],
    "gamma": 0.1, "augment": True, "drop_rate": 0.0, "colour_augment": False,
}  # fmt: skip

# RECIPES[model][dataset]; "*" is every dataset the model has no entry for.
RECIPES: dict[str, dict[str, dict]] = {
    "densenet": {
        "*": DENSENET_SMALL,
        "svhn": {**DENSENET_SMALL, **PAPER_SHORT, "augment": False},  # paper Sec. 4.2
        "mnist": {**DENSENET_SMALL, **PAPER_SHORT},  # not in the paper: our short schedule
        "fashion-mnist": {**DENSENET_SMALL, **PAPER_SHORT},
        "imagenet": DENSENET_IMAGENET,
    },
    "diracnet": {
        "*": DIRACNET_SMALL,
        "svhn": {**DIRACNET_SMALL, "augment": False},
        "imagenet": DIRACNET_IMAGENET,
    },
    # The first release (v1 branch): the same schedule; cv2.BORDER_REFLECT padding, which
    # repeats the edge pixel (torchvision's "symmetric").
    "diracnet-v1": {
        "*": {**DIRACNET_SMALL, "pad_mode": "symmetric"},
        "svhn": {**DIRACNET_SMALL, "augment": False},
        "imagenet": DIRACNET_IMAGENET,
    },
}


def recipe(model: str, dataset: str, dirac_version: int = 2) -> dict:
    """The published recipe for this model (and DiracNet release) and dataset."""
    table = RECIPES["diracnet-v1" if model == "diracnet" and dirac_version == 1 else model]
    return dict(table.get(dataset, table["*"]))


SCHEDULES = ("lua", "diracnet", "every30", "cosine")
# Schedules whose lr changes every training step (the others change it between epochs).
PER_STEP = ("cosine",)


def cosine(step: int, total: int) -> float:
    """The lr factor at training step `step` (from 0) of `total`: half a cosine from 1 to 0,
    lr = lr0 (1 + cos(pi t / T)) / 2, as ajbrock/FreezeOut's trainer anneals per iteration."""
    return (1 + math.cos(math.pi * step / total)) / 2


def lr_drops(schedule: str, fractions: Sequence[float], epochs: int) -> list[int]:
    """The official code's lr schedule for N = epochs, as MultiStepLR milestones: for each
    drop, the 0-based index of the first epoch at the lower lr (0 is the first epoch; an
    index repeats where two drops come at once). Epochs e count from 1, as there:

    - lua: liuzhuang13/DenseNet train.lua, one drop for each fraction f with
      `epoch >= f * nEpochs`: from e = ceil(f * N) on (a float comparison, as in Lua);
    - diracnet: szagoruyko/diracnets train.py makes a new optimizer with the lr times gamma
      when `epoch` is in epoch_step; epoch_step is f * N rounded half up (60, 120, 160 of
      200), and a step listed twice drops once;
    - every30: train.lua's ImageNet rule floor((epoch - 1) / 30), whatever N (fractions
      unused).
    """
    if schedule == "lua":
        return sorted(max(1, math.ceil(f * epochs)) - 1 for f in fractions)
    if schedule == "diracnet":
        steps = {math.floor(Fraction(repr(f)) * epochs + Fraction(1, 2)) for f in fractions}
        return sorted(step - 1 for step in steps if 1 <= step <= epochs)
    if schedule == "every30":
        return list(range(30, epochs, 30))
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


# ------------------------------------------------------------------ device capabilities


@dataclass(frozen=True)
class Capabilities:
    """What decides the fast paths on a device."""

    device_type: str  # "cuda", "mps" or "cpu"
    native_bf16: bool  # bf16 arithmetic in hardware, not emulated
    compiles: bool  # torch.compile's default backend generates code for this device


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on x86; without them oneDNN emulates bf16, several times slower
    than fp32 (DenseNet-BC-100-12 trained at 3.0 img/s against 18.5 on an AVX2 host)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def probe(device: torch.device) -> Capabilities:
    """The capabilities of a device this process can use."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        try:  # is_bf16_supported() alone is True on pre-Ampere GPUs, which emulate bf16
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4
            native = major >= 8
        return Capabilities("cuda", native, compiles=major >= 7)  # Triton needs sm70+
    if device.type == "cpu":
        return Capabilities("cpu", cpu_has_native_bf16(), compiles=True)
    return Capabilities(device.type, False, compiles=False)


def device_defaults(caps: Capabilities) -> dict:
    """The fast paths a device gets by default: a pure function of its capabilities.

    CUDA: bf16 where native, else fp16 with a GradScaler; channels_last; compiled where
    Triton runs. CPU: bf16 only where native (else fp32); channels_last; compiling is a
    candidate that the run's own first steps decide (measures_compile, choose_compile),
    since the faster mode differs between CPUs with the same flags. MPS: fp32, NCHW, eager.
    """
    if caps.device_type == "cuda":
        amp = "bf16" if caps.native_bf16 else "fp16"
        return {"amp": amp, "channels_last": True, "compile": caps.compiles}
    if caps.device_type == "cpu":
        amp = "bf16" if caps.native_bf16 else "off"
        return {"amp": amp, "channels_last": True, "compile": caps.compiles}
    return {"amp": "off", "channels_last": False, "compile": False}


# Compiling DenseNet-BC-100-12 took 83-93 s on 2 cores and saved 0.11-0.15 s a step
# (batch 64, 28x28 and 32x32, AMD EPYC AVX-512 BF16, 2026-12-04): it pays back after about
# 600-850 steps. A CPU run with fewer training steps left than this is not compiled by
# default (given --compile, it is).
CPU_COMPILE_MIN_STEPS = 1000
# Where the CPU compiles by default, the run times this many training steps of each mode
# (after one untimed step each) and keeps compiling only if the median compiled step is at
# least COMPILE_MARGIN times as fast as the eager one: a smaller gain does not pay for what
# a compiled run costs again at every --resume, a new compile (173 s for DenseNet-BC-100-12
# on 2 cores of an AMD EPYC Zen 4, 2026-12-07), nor for a few noisy steps misjudging it.
COMPILE_TIMED_STEPS = 5
COMPILE_MARGIN = 1.05


def compile_pays(settings: argparse.Namespace, device_type: str, steps_left: int) -> bool:
    """Whether the run compiles: as resolved, except that a CPU run whose device chose
    compiling (the flag not given) and that has fewer than CPU_COMPILE_MIN_STEPS training
    steps left stays eager."""
    short = device_type == "cpu" and steps_left < CPU_COMPILE_MIN_STEPS
    return settings.compile and not ("compile" in settings.device_chose and short)


def measures_compile(settings: argparse.Namespace, device_type: str) -> bool:
    """Whether the run times compiled against eager steps before choosing: on the CPU, where
    compiling was the device's choice (not typed, not a resumed run's recorded choice)."""
    return device_type == "cpu" and settings.compile and "compile" in settings.device_chose


def choose_compile(eager: Sequence[float], compiled: Sequence[float]) -> dict:
    """The choice from step times in seconds: the medians, compiled's speed-up over eager,
    and whether to compile (a speed-up of at least COMPILE_MARGIN)."""
    e, c = statistics.median(eager), statistics.median(compiled)
    return {"eager_step_s": e, "compiled_step_s": c, "speedup": e / c, "steps": len(eager),
            "margin": COMPILE_MARGIN, "compile": e / c >= COMPILE_MARGIN}  # fmt: skip


def compile_line(choice: dict) -> str:
    """The console's line for a measured choice, e.g. "compile: 0.81x eager here (5 steps
    each), training eagerly"."""
    then = "compiling" if choice["compile"] else "training eagerly"
    return f"compile: {choice['speedup']:.2f}x eager here ({choice['steps']} steps each), {then}"

