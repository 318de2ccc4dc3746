"""train.py's settings from one source: the published recipes as data, the device's
capabilities, a resumed run's settings and the user's flags, merged once by resolve().

Precedence, lowest first: COMMON, the recipe of the model and dataset, the device's fast
paths, the rules that derive one setting from another, the checkpoint's settings on
--resume, and last the flags the user typed.
"""

import argparse
import math
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from training import data


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


IMAGENET_ARCHS = ("densenet121", "densenet169", "densenet201", "densenet161", "densenet264")
DIRAC_ARCHS = ("diracnet18", "diracnet34")
# Flags whose change makes a checkpoint a different experiment: refused on --resume.
IDENTITY = (
    "dataset", "model", "dirac_version", "arch", "depth", "growth", "bottleneck",
    "compression", "width",
)  # fmt: skip
# Flags a resumed run cannot change, and why: they chose the images it trains on (and the
# normalisation computed from them) and the held-out ones. Any other flag given with --resume
# takes effect from the checkpoint's step on (train.resumed_changes).
FIXED_ON_RESUME = {
    "seed": "it chose the held-out images and the first random draws; a resumed run continues "
            "the checkpoint's random streams",
    "val_split": "the held-out images would change, and with them the training images and "
                 "their normalisation",
    "train_subset": "the training images would change, and with them their normalisation",
}  # fmt: skip
# Flags that describe this invocation, not the run: never taken from a checkpoint.
INVOCATION = ("resume", "device", "evaluate", "pretrained", "export", "save")

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


def compile_pays(a: argparse.Namespace, device_type: str, steps_left: int) -> bool:
    """Whether the run compiles: as resolved, except that a CPU run whose device chose
    compiling (the flag not given) and that has fewer than CPU_COMPILE_MIN_STEPS training
    steps left stays eager."""
    short = device_type == "cpu" and steps_left < CPU_COMPILE_MIN_STEPS
    return a.compile and not ("compile" in a.device_chose and short)


def measures_compile(a: argparse.Namespace, device_type: str) -> bool:
    """Whether the run times compiled against eager steps before choosing: on the CPU, where
    compiling was the device's choice (not typed, not a resumed run's recorded choice)."""
    return device_type == "cpu" and a.compile and "compile" in a.device_chose


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


# Representative devices, for --help.
EXAMPLE_DEVICES = {
    "CUDA sm80+": Capabilities("cuda", True, True),
    "older CUDA": Capabilities("cuda", False, True),
    "CPU with AVX512-BF16/AMX": Capabilities("cpu", True, True),
    "other CPUs": Capabilities("cpu", False, True),
    "MPS": Capabilities("mps", False, False),
}


# ----------------------------------------------------------------------------- help


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return "[" + ", ".join(map(_text, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe(values: dict[str, object], name_first: bool = False) -> str:
    """"A; p, q: B" from {place: value}: the first place's value, then the exceptions."""
    groups: dict[str, list[str]] = {}
    for place, value in values.items():
        groups.setdefault(_text(value), []).append(place)
    (first, places), *rest = groups.items()
    first = f"{first} ({', '.join(places)})" if name_first and rest else first
    return "; ".join([first, *(f"{', '.join(p)}: {v}" for v, p in rest)])


def recipe_default(key: str) -> str:
    """A flag's default across the recipes, e.g. "300; svhn, mnist: 40; diracnet: 200"."""
    values = {}
    for model, table in RECIPES.items():
        if key in table["*"]:
            values[model] = table["*"][key]
        for dataset, r in table.items():
            if dataset != "*" and key in r and r[key] != table["*"].get(key):
                values[dataset if model == "densenet" else f"{model} {dataset}"] = r[key]
        if model == "diracnet-v1":  # name the first release only where it differs
            v2 = RECIPES["diracnet"]
            for dataset, r in table.items():
                if r.get(key) == v2.get(dataset, v2["*"]).get(key):
                    values.pop(model if dataset == "*" else f"{model} {dataset}", None)
    return _describe(values) if values else _text(COMMON.get(key))


def device_default(key: str) -> str:
    """A device-dependent flag's default on each kind of device."""
    values = {name: device_defaults(c)[key] for name, c in EXAMPLE_DEVICES.items()}
    return _describe(values, name_first=True)


# ----------------------------------------------------------------------------- flags


class _Parser(argparse.ArgumentParser):
    """A bad flag is a UserError: one line, not argparse's usage block."""

    def error(self, message: str):
        raise UserError(f"{message} (train.py --help lists the flags)")


def parser(description: str = "") -> argparse.ArgumentParser:
    """train.py's flags; every default shown comes from the tables above."""
    p = _Parser(
        prog="train.py", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip

    def add(group, flag, *, key=None, device=False, **kw):
        key = key or flag[2:].replace("-", "_")
        default = device_default(key) if device else recipe_default(key)
        kw["help"] = f"{kw.pop('help')} (default: {kw.pop('shown', default)})"
        group.add_argument(flag, dest=key, default=None, **kw)

    _model_and_data_flags(p, add)
    _training_and_run_flags(p, add)
    return p


def _model_and_data_flags(p: argparse.ArgumentParser, add) -> None:
    """The model and data groups of flags."""
    true = "store_true"
    on_off = argparse.BooleanOptionalAction
    m = p.add_argument_group("model")
    add(m, "--model", choices=tuple(RECIPES), help="network family")
    add(m, "--dirac-version", type=int, choices=(1, 2), help="DiracNet release (1: NCReLU)")
    add(m, "--arch", choices=IMAGENET_ARCHS + DIRAC_ARCHS, help="ImageNet network")
    add(m, "--depth", type=int, help="network depth L")
    add(m, "--growth", type=int, help="growth rate k")
    add(m, "--bottleneck", action=on_off, help="1x1 bottleneck before each 3x3 conv (DenseNet-B)")
    add(m, "--compression", type=float, help="theta of the transitions", shown="0.5 with bottleneck, else 1")
    add(m, "--width", type=float, help="DiracNet width multiplier")
    add(m, "--drop-rate", type=float, help="dropout after each conv",
        shown="0.2 without augmentation, else 0 (paper Sec. 4.2)")
    add(m, "--memory-efficient", action=true, help="recompute in backward: memory linear in depth")
    add(m, "--shared-stats", action=on_off,
        help="DenseNet on the CPU, eager: each feature map's batch statistics once per block "
             "(sharedstats.py; off: per-layer BN, as the paper)")
    d = p.add_argument_group("data")
    add(d, "--dataset", choices=(*data.DATASETS, "imagenet"), help="dataset")
    add(d, "--data-dir", help="dataset folder")
    add(d, "--augment", action=on_off, help="random crop (+ flip where allowed)")
    add(d, "--val-split", type=int, metavar="N",
        help="hold out N training images to choose best.pt (SVHN has its own 6,000)")
    add(d, "--train-subset", type=int, metavar="N", help="train on the first N images", shown="all")
    add(d, "--workers", type=int, help="ImageNet DataLoader workers per process")
    add(d, "--ten-crop", action=true, help="ImageNet 10-crop evaluation")


def _training_and_run_flags(p: argparse.ArgumentParser, add) -> None:
    """The optimisation, speed and run groups of flags."""
    true = "store_true"
    on_off = argparse.BooleanOptionalAction
    o = p.add_argument_group("optimisation")
    add(o, "--batch-size", type=int, help="GLOBAL batch, split over torchrun ranks")
    add(o, "--epochs", type=int, help="training epochs")
    add(o, "--lr", type=float, help="initial learning rate")
    add(o, "--momentum", type=float, help="SGD momentum")
    add(o, "--nesterov", action=on_off, help="Nesterov momentum")
    add(o, "--weight-decay", type=float, help="L2 weight decay")
    add(o, "--schedule", choices=SCHEDULES,
        help="lr schedule rule: lua (DenseNet's code), diracnet (its code), every30 (ImageNet), "
             "cosine (half a cosine from --lr to 0, every step; log.csv's lr: each epoch's first step's)")
    add(o, "--milestones", type=float, nargs="*", help="lr drops, as fractions of the epochs")
    add(o, "--gamma", type=float, help="lr factor at each drop")
    add(o, "--restart-momentum", action=on_off,
        help="clear SGD momentum at each lr drop", shown="on for diracnet (its official trainer), else off")
    add(o, "--seed", type=int, help="random seed")
    f = p.add_argument_group("speed (defaults depend on the device)")
    add(f, "--amp", choices=("off", "bf16", "fp16"), device=True, help="autocast dtype")
    add(f, "--channels-last", action=on_off, device=True, help="NHWC memory layout")
    add(f, "--compile", action=on_off, device=True, help="torch.compile the model",
        shown="CUDA sm70+: on; CPU: the faster of compiled and eager, timed on the run's first "
              f"steps (eager under {CPU_COMPILE_MIN_STEPS} steps); MPS: off")
    add(f, "--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
        help="torch.compile mode (reduce-overhead: CUDA graphs)")
    add(f, "--sync-bn", action=true, help="SyncBatchNorm over ranks (CUDA; turns off --compile)")
    add(f, "--deterministic", action=true, help="deterministic kernels, no cuDNN autotuning")
    r = p.add_argument_group("run")
    add(r, "--save", help="run folder", shown="work/<dataset>.<model name>")
    add(r, "--device", help="auto, cpu, cuda, cuda:N or mps", shown="auto: cuda, then mps, then cpu")
    add(r, "--resume", action=true, help="continue from <save>/latest.pt", shown="off")
    add(r, "--evaluate", metavar="CHECKPOINT", nargs="?", const="",
        help="evaluate a checkpoint (or --pretrained weights), no training", shown="off")
    add(r, "--pretrained", metavar="FILE", help="with --evaluate: torchvision weights", shown="none")
    add(r, "--export", metavar="OUT", help="with --evaluate: write the folded DiracNet", shown="none")
    add(r, "--tensorboard", action=true, help="also log to <save>/tb")
    add(r, "--plot", action=on_off, help="redraw the figures after each epoch")


def parse_args(argv: list[str] | None = None, description: str = "") -> dict:
    """The flags the user typed, as {key: value}; the ones left out are absent."""
    flags = vars(parser(description).parse_args(argv))
    return {k: v for k, v in flags.items() if v is not None}


# ----------------------------------------------------------------------------- resolve


def _layered(typed: dict, device: dict | None = None) -> dict:
    """COMMON, the recipe the typed settings choose, the device's fast paths, then the
    typed settings; the compression rule fills in what none of them set."""
    typed = dict(typed)
    if typed.get("arch") in DIRAC_ARCHS:
        typed.setdefault("model", "diracnet")
    base = {**COMMON, **typed}
    r = recipe(base["model"], base["dataset"], base["dirac_version"])
    s = {**COMMON, **r, **(device or {}), **typed}
    s.setdefault("compression", 0.5 if s.get("bottleneck") else 1.0)
    return s


def identity(given: dict) -> dict:
    """The identity flags (IDENTITY) of a run: given, else the recipe's."""
    s = _layered(given)
    return {k: s.get(k) for k in IDENTITY}


def run_name(s: dict) -> str:
    """The model's name in the paper's terms, e.g. densenet-bc-100-12, diracnet-34-2."""
    if s["dataset"] == "imagenet":
        return s["arch"]
    if s["model"] == "diracnet":
        version = "" if s["dirac_version"] == 2 else "-v1"
        return f"diracnet{version}-{s['depth']}-{s['width']:g}"
    bc = "-bc" if s["bottleneck"] and s["compression"] < 1 else ""
    return f"densenet{bc}-{s['depth']}-{s['growth']}"


def run_folder(given: dict) -> Path:
    """--save, else work/<dataset>.<model name>."""
    if "save" in given:
        return Path(given["save"])
    s = identity(given)
    return Path("work") / f"{s['dataset']}.{run_name(s)}"


def resolve(
    given: dict, caps: Capabilities, old: dict | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """Every setting of the run, and notes on choices made for the user (one line each)."""
    old = {k: v for k, v in (old or {}).items() if k not in INVOCATION}
    fast = device_defaults(caps)
    s = _layered({**old, **given}, fast)
    s["device_chose"] = sorted(k for k in fast if k not in given and k not in old)
    notes = []
    # Rules: one setting derived from another, unless given or resumed.
    s.setdefault("drop_rate", 0.0 if s["augment"] else 0.2)  # paper: dropout only without
    s.setdefault("restart_momentum", s["model"] == "diracnet" and s["schedule"] not in PER_STEP)
    s.setdefault("compile_measured", None)  # the timed choice (train.faster), kept on --resume
    _schedule_rules(s, given)
    if s["sync_bn"] and s["compile"]:
        notes.append("--sync-bn: compile is off (SyncBatchNorm syncs with the host and breaks graphs)")
        s["compile"] = False
    _shared_stats_rules(s, caps, given, notes)
    s["save"] = str(run_folder(given))
    _check(s, caps)
    unset = {action.dest: None for action in parser()._actions if action.dest != "help"}
    return argparse.Namespace(**{**unset, **s}), notes


def _schedule_rules(s: dict, given: dict) -> None:
    """Cosine has no drops: --milestones, --gamma and --restart-momentum are refused with it,
    and the settings record none."""
    if s["schedule"] not in PER_STEP:
        return
    clash = [k for k in ("milestones", "gamma") if k in given]
    clash += ["restart-momentum"] * bool(given.get("restart_momentum"))  # --no-... agrees
    if clash:
        raise UserError(f"--{clash[0]}: --schedule {s['schedule']} changes the lr every step and has no drops")
    s["milestones"], s["gamma"], s["restart_momentum"] = [], None, False


def _shared_stats_rules(s: dict, caps: Capabilities, given: dict, notes: list[str]) -> None:
    """--shared-stats: an eager speed path of the CPU DenseNet. Where it cannot run it is
    refused when typed, and turned off with a note when a resumed run carried it."""
    if not s["shared_stats"]:
        return
    if caps.device_type != "cpu" or s["model"] != "densenet":
        if "shared_stats" in given:
            raise UserError("--shared-stats is for DenseNet on the CPU (measured and tested there only)")
        notes.append("--shared-stats is off: it runs for DenseNet on the CPU only")
        s["shared_stats"] = False
    elif s["compile"]:
        if "compile" in given:
            raise UserError("--shared-stats trains eagerly: it cannot be combined with --compile")
        notes.append("--shared-stats: compile is off (shared statistics train eagerly)")
        s["compile"] = False


def _check(s: dict, caps: Capabilities) -> None:
    """Refuse combinations that cannot run, before any data or model is touched."""
    if s.get("arch") and s["dataset"] != "imagenet":
        raise UserError("--arch is for --dataset imagenet; use --depth/--growth/--width otherwise")
    if s["sync_bn"] and caps.device_type != "cuda":
        raise UserError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel)")
    if s["amp"] == "fp16" and caps.device_type == "cpu":
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 (or off) on the CPU")
    for name in ("batch_size", "epochs", "depth", "growth", "train_subset"):
        if s.get(name) is not None and s[name] <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if s["workers"] < 0:
        raise UserError("--workers must be 0 (load in the main process) or more")
    if s["val_split"] < 0:
        raise UserError("--val-split must be 0 (none) or more images")
    if s["val_split"] and s["dataset"] in ("svhn", "imagenet"):
        raise UserError(f"--val-split: {s['dataset']} has its own validation split")
    if not all(0 < m < 1 for m in s["milestones"]):
        raise UserError("--milestones are fractions of the epochs, each in (0, 1)")
    if s["schedule"] == "every30" and s["milestones"]:
        raise UserError("--milestones: the every30 schedule drops every 30 epochs; "
                        "add --schedule lua or diracnet to drop at fractions of the epochs")


def host() -> str:
    """This machine in a few words, for the start line and args.json."""
    return f"{platform.system()} {platform.machine()}"
