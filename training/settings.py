"""train.py's settings from one source: its flags and their --help text, and resolve(),
which merges the published recipe (training/recipes.py), the device's fast paths, a resumed
run's settings and the user's flags once.

Precedence, lowest first: COMMON, the recipe of the model and dataset, the device's fast
paths, the rules that derive one setting from another, the checkpoint's settings on
--resume, and last the flags the user typed.
"""

import argparse
import platform
from pathlib import Path

from training import data
from training.errors import UserError
from training.recipes import (
    COMMON,
    CPU_COMPILE_MIN_STEPS,
    DIRAC_ARCHS,
    IMAGENET_ARCHS,
    PER_STEP,
    RECIPES,
    SCHEDULES,
    Capabilities,
    device_defaults,
    recipe,
)

# Every setting of a run, as resolve() returns it and args.json records it.
Settings = argparse.Namespace
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
) -> tuple[Settings, list[str]]:
    """Every setting of the run, and notes on choices made for the user (one line each)."""
    old = {k: v for k, v in (old or {}).items() if k not in INVOCATION}
    fast = device_defaults(caps)
    s = _layered({**old, **given}, fast)
    s["device_chose"] = sorted(k for k in fast if k not in given and k not in old)
    notes = []
    # Rules: one setting derived from another, unless given or resumed.
    s.setdefault("drop_rate", 0.0 if s["augment"] else 0.2)  # paper: dropout only without
    s.setdefault("restart_momentum", s["model"] == "diracnet" and s["schedule"] not in PER_STEP)
    s.setdefault("compile_measured", None)  # the timed choice (building.faster), kept on --resume
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
