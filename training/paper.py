"""The paper's results as data, and which runs of train.py they belong to.

Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks", CVPR 2017,
arXiv 1608.06993v5: Table 2 (error rates on CIFAR and SVHN) and Table 3 (ImageNet validation
errors, single-crop / 10-crop), and the training settings of Sec. 4.1-4.2. The CIFAR columns
of Table 2 are also in the authors' README (liuzhuang13/DenseNet, "Results on CIFAR").
Standard library only, so plot.py imports it cheaply; `python -m training.paper` prints README's
tables.
"""

from __future__ import annotations

from dataclasses import dataclass

# Table 2's error columns; "+" is standard augmentation (mirroring and shifting).
COLUMNS = ("C10", "C10+", "C100", "C100+", "SVHN")


@dataclass(frozen=True)
class CifarModel:
    """A row of Table 2: a CIFAR/SVHN DenseNet, its size and its test errors (%)."""

    depth: int
    growth: int
    bc: bool  # DenseNet-BC: bottleneck layers and compression 0.5
    params_m: float  # parameters in millions, as Table 2 prints them
    params: int  # this code's exact count at 10 classes (the paper rounds it to params_m)
    errors: dict[str, float | None]  # COLUMNS -> error; None where the paper has none

    @property
    def name(self) -> str:
        return f"DenseNet{'-BC' if self.bc else ''} (L={self.depth}, k={self.growth})"

    @property
    def compression(self) -> float:
        return 0.5 if self.bc else 1.0


def _errors(*values: float | None) -> dict[str, float | None]:
    return dict(zip(COLUMNS, values, strict=True))


TABLE2 = (
    CifarModel(40, 12, False, 1.0, 1_019_722, _errors(7.00, 5.24, 27.55, 24.42, 1.79)),
    CifarModel(100, 12, False, 7.0, 6_979_642, _errors(5.77, 4.10, 23.79, 20.20, 1.67)),
    CifarModel(100, 24, False, 27.2, 27_249_082, _errors(5.83, 3.74, 23.42, 19.25, 1.59)),
    CifarModel(100, 12, True, 0.8, 769_162, _errors(5.92, 4.51, 24.15, 22.27, 1.76)),
    CifarModel(250, 24, True, 15.3, 15_324_406, _errors(5.19, 3.62, 19.64, 17.60, 1.74)),
    CifarModel(190, 40, True, 25.6, 25_624_430, _errors(None, 3.46, None, 17.18, None)),
)


@dataclass(frozen=True)
class ImagenetModel:
    """A row of Table 3: top-1 and top-5 validation errors (%) as (single-crop, 10-crop)."""

    arch: str
    params: int  # exact count at 1000 classes (torchvision's published figures; 264: ours)
    top1: tuple[float, float] | None  # None: not in Table 3
    top5: tuple[float, float] | None


TABLE3 = (
    ImagenetModel("densenet121", 7_978_856, (25.02, 23.61), (7.71, 6.66)),
    ImagenetModel("densenet169", 14_149_480, (23.80, 22.08), (6.85, 5.92)),
    ImagenetModel("densenet201", 20_013_928, (22.58, 21.46), (6.34, 5.54)),
    ImagenetModel("densenet264", 33_337_704, (22.15, 20.80), (6.12, 5.29)),
    # k=48, in the authors' README and torchvision but not in the paper's tables
    ImagenetModel("densenet161", 28_681_000, None, None),
)

# Sec. 4.1-4.2 in train.py's settings: SGD with Nesterov momentum 0.9 without dampening,
# weight decay 1e-4, lr 0.1; CIFAR batch 64 for 300 epochs, SVHN 40, the lr divided by 10
# at 50 % and 75 % of them (train.lua's rule); ImageNet batch 256 for 90 epochs, the lr
# divided by 10 at epochs 30 and 60, fb.resnet.torch's augmentation; dropout 0.2 exactly on
# the datasets without augmentation (C10, C100, SVHN); the final CIFAR runs train on all
# 50,000 images, SVHN on train + extra less its 6,000 validation images.
_SGD = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "gamma": 0.1,
        "restart_momentum": False}  # fmt: skip
_CIFAR = {"epochs": 300, "batch_size": 64, **_SGD, "schedule": "lua", "milestones": [0.5, 0.75]}
RECIPE = {
    "cifar+": {**_CIFAR, "drop_rate": 0.0, "train_subset": None, "val_split": 0},
    "cifar": {**_CIFAR, "drop_rate": 0.2, "train_subset": None, "val_split": 0},
    "svhn": {**_CIFAR, "epochs": 40, "drop_rate": 0.2, "train_subset": None},
    "imagenet": {"epochs": 90, "batch_size": 256, **_SGD, "schedule": "every30", "milestones": [],
                 "drop_rate": 0.0, "train_subset": None, "colour_augment": True},
}  # fmt: skip

# How each setting of the paper is said where a run differs from it: "paper 4.51% at ...".
_SAY = {
    "epochs": "{} epochs".format,
    "batch_size": "batch {}".format,
    "lr": "lr {:g}".format,
    "momentum": "momentum {:g}".format,
    "nesterov": lambda on: "Nesterov momentum" if on else "momentum without Nesterov",
    "weight_decay": "weight decay {:g}".format,
    "gamma": lambda g: f"lr x{g:g} at each drop",
    "restart_momentum": lambda on: (
        "momentum restarted at lr drops" if on else "momentum kept at lr drops"
    ),
    "drop_rate": lambda p: f"dropout {p:g}" if p else "no dropout",
    "train_subset": lambda _: "the whole training set",
    "val_split": lambda _: "the whole training set",
    "colour_augment": lambda on: "colour augmentation" if on else "no colour augmentation",
}
_SCHEDULE = {
    "lua": "lr drops at 50 % and 75 % of the epochs",
    "every30": "lr drops at epochs 30 and 60",
}


@dataclass(frozen=True)
class Result:
    """The paper's figure for a run: its source, the test error (%), and whether the paper
    reports it after the last epoch ("final") or at the lowest validation error ("best_val",
    SVHN). differs names the paper's settings where the run has others."""

    source: str
    test_err: float
    test_top5: float | None
    reported: str
    differs: tuple[str, ...]

    def text(self) -> str:
        """E.g. "paper 4.51%", or "paper 4.51% at 300 epochs" for a run of other settings."""
        where = f" at {', '.join(self.differs)}" if self.differs else ""
        return f"paper {self.test_err:.2f}%{where}"


def column(settings: dict) -> str | None:
    """Table 2's column of a run (C10+ is cifar10 with augmentation, C10 without); None
    for datasets not in Table 2."""
    name = {"cifar10": "C10", "cifar100": "C100", "svhn": "SVHN"}.get(settings.get("dataset"))
    if name == "SVHN":
        return None if settings.get("augment") else name
    return name and name + "+" * bool(settings.get("augment"))


def differences(settings: dict, recipe: dict) -> tuple[str, ...]:
    """The paper's settings, in words, where the run's differ (settings it does not record
    are not compared)."""
    said = []
    for key, value in recipe.items():
        if key not in settings or settings[key] == value:
            continue
        phrase = (
            _SCHEDULE[recipe["schedule"]] if key in ("schedule", "milestones") else _SAY[key](value)
        )
        if phrase not in said:
            said.append(phrase)
    return tuple(said)


def lookup(settings: dict) -> Result | None:
    """The paper's figure for a run with these settings (train.py's, as args.json holds
    them), or None when the model, dataset and augmentation match no entry of Table 2 or 3."""
    if settings.get("model", "densenet") != "densenet":
        return None
    if settings.get("dataset") == "imagenet":
        row = next((m for m in TABLE3 if m.arch == settings.get("arch") and m.top1), None)
        if row is None:
            return None
        crop = int(bool(settings.get("ten_crop")))
        source = f"Table 3, {row.arch}, {('single-crop', '10-crop')[crop]}"
        return Result(source, row.top1[crop], row.top5[crop], "final",
                      differences(settings, RECIPE["imagenet"]))  # fmt: skip
    col = column(settings)
    identity = tuple(settings.get(k) for k in ("depth", "growth", "bottleneck", "compression"))
    row = next((m for m in TABLE2 if (m.depth, m.growth, m.bc, m.compression) == identity), None)
    if col is None or row is None or row.errors[col] is None:
        return None
    recipe = RECIPE["svhn" if col == "SVHN" else "cifar+" if "+" in col else "cifar"]
    reported = "best_val" if col == "SVHN" else "final"  # Sec. 4.1
    return Result(f"Table 2, {row.name}, {col}", row.errors[col], None, reported,
                  differences(settings, recipe))  # fmt: skip


def record(settings: dict) -> dict:
    """What args.json records of the paper's figure: paper_test_err (null for a run that is
    no paper configuration), its source, which epoch it is read at, the differences."""
    found = lookup(settings)
    if found is None:
        return {"paper_test_err": None}
    fields = {"paper_test_err": found.test_err, "paper_reported": found.reported,
              "paper_source": found.source, "paper_differs": list(found.differs)}  # fmt: skip
    if found.test_top5 is not None:
        fields["paper_test_top5"] = found.test_top5
    return fields


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown() -> str:
    """README's two tables: Table 2 with this code's parameter counts, and Table 3."""
    lines = ["| model | depth L | k | params | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(COLUMNS)]  # fmt: skip
    for m in TABLE2:
        errors = " | ".join(_cell(m.errors[c]) for c in COLUMNS)
        name = "DenseNet-BC" if m.bc else "DenseNet"
        lines.append(f"| {name} | {m.depth} | {m.growth} | {m.params:,} | {errors} |")
    lines += ["", "| model | params | top-1 | top-5 |", "|---|---|---|---|"]
    for m in TABLE3:
        errors = [f"{e[0]:.2f} ({e[1]:.2f})" if e else "–" for e in (m.top1, m.top5)]
        name = f"DenseNet-{m.arch[8:]}" + (" (k=48)" if m.arch == "densenet161" else "")
        lines.append(f"| {name} | {m.params:,} | {errors[0]} | {errors[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
