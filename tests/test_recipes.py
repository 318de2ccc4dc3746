"""training/recipes.py and training/settings.py: the flags and their defaults, the fast paths
per device, the official schedules."""

import math
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from training import building, recipes
from training.errors import UserError
from training.settings import Settings, parser, resolve


def test_every_flag_says_what_it_does_and_its_default():
    for action in parser()._actions:
        if action.dest != "help":
            assert action.help and "(default: " in action.help, action.option_strings


def test_help_defaults_come_from_the_recipes():
    helps = {action.dest: action.help for action in parser()._actions}
    assert "(default: 300; svhn, mnist, fashion-mnist: 40; imagenet" in helps["epochs"]
    assert "diracnet: 200; diracnet imagenet: 100)" in helps["epochs"]
    assert "(default: 64; imagenet, diracnet imagenet: 256; diracnet: 128)" in helps["batch_size"]


CAPABILITY_CASES = [
    (recipes.Capabilities("cuda", True, True), {"amp": "bf16", "channels_last": True, "compile": True}),
    (recipes.Capabilities("cuda", False, True), {"amp": "fp16", "channels_last": True, "compile": True}),
    (recipes.Capabilities("cuda", False, False), {"amp": "fp16", "channels_last": True, "compile": False}),
    (recipes.Capabilities("cpu", True, True), {"amp": "bf16", "channels_last": True, "compile": True}),
    (recipes.Capabilities("cpu", False, True), {"amp": "off", "channels_last": True, "compile": True}),
    (recipes.Capabilities("mps", False, False), {"amp": "off", "channels_last": False, "compile": False}),
]


@pytest.mark.parametrize(("caps", "expected"), CAPABILITY_CASES)
def test_fast_path_defaults_follow_the_device(caps, expected):
    assert recipes.device_defaults(caps) == expected
    settings, _ = resolve({"dataset": "mnist"}, caps)
    assert {k: getattr(settings, k) for k in expected} == expected


@pytest.mark.parametrize("native_bf16", [True, False])
def test_a_cpu_times_compiling_by_default_where_it_could_pay(native_bf16):
    """Every CPU is a candidate for compiling by default, timed against eager; a run too short
    to pay back the compile time stays eager; --compile or --no-compile typed, or the choice
    a resumed run recorded, is kept without timing."""
    caps = recipes.Capabilities("cpu", native_bf16, True)
    settings, _ = resolve({}, caps)
    assert "compile" in settings.device_chose and settings.compile_measured is None
    long, short = recipes.CPU_COMPILE_MIN_STEPS, recipes.CPU_COMPILE_MIN_STEPS - 1
    assert recipes.compile_pays(settings, "cpu", long) and recipes.measures_compile(settings, "cpu")
    assert recipes.compile_pays(settings, "cpu", short) is False
    for flag in (True, False):
        typed, _ = resolve({"compile": flag}, caps)
        assert typed.compile is flag and not recipes.measures_compile(typed, "cpu")
        assert recipes.compile_pays(typed, "cpu", 1) is flag
    choice = recipes.choose_compile([1.0] * 5, [2.0] * 5)
    resumed, _ = resolve({}, caps, old={"compile": False, "compile_measured": choice})
    assert resumed.compile is False and resumed.compile_measured == choice
    assert not recipes.measures_compile(resumed, "cpu")
    cuda, _ = resolve({}, recipes.Capabilities("cuda", True, True))
    assert recipes.compile_pays(cuda, "cuda", 1) and not recipes.measures_compile(cuda, "cuda")


# Step times in seconds, as a host might measure them: (eager, compiled, compiles?)
TIMINGS = [
    ([0.80, 0.82, 0.79, 0.81, 0.90], [0.60, 0.61, 0.95, 0.62, 0.60], True),  # 1.32x; one slow step
    ([0.60, 0.62, 0.61, 0.63, 0.60], [0.76, 0.77, 0.75, 0.78, 0.76], False),  # 0.80x (Zen 4)
    ([1.00, 1.00, 1.00, 1.00, 1.00], [0.96, 0.96, 0.96, 0.96, 0.96], False),  # 1.04x: in the noise
    ([1.05, 1.05, 1.05, 1.05, 1.05], [1.00, 1.00, 1.00, 1.00, 1.00], True),  # 1.05x: the margin
]


@pytest.mark.parametrize(("eager", "compiled", "compiles"), TIMINGS)
def test_the_cpu_compiles_where_the_median_step_is_faster_by_the_margin(eager, compiled, compiles):
    choice = recipes.choose_compile(eager, compiled)
    speedup = sorted(eager)[2] / sorted(compiled)[2]
    assert choice["compile"] is compiles and choice["speedup"] == pytest.approx(speedup)
    assert choice["steps"] == 5 and choice["margin"] == recipes.COMPILE_MARGIN
    line = recipes.compile_line(choice)
    assert line == (f"compile: {speedup:.2f}x eager here (5 steps each), "
                    f"{'compiling' if compiles else 'training eagerly'}")  # fmt: skip


def test_this_cpu_is_probed_from_its_flags():
    """Native bf16 exactly when /proc/cpuinfo lists AVX512-BF16 or AMX-BF16."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    caps = recipes.probe(torch.device("cpu"))
    assert caps.native_bf16 == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_sync_bn_turns_compile_off_with_a_note():
    caps = recipes.Capabilities("cuda", True, True)
    settings, notes = resolve({"sync_bn": True}, caps)
    assert settings.compile is False and len(notes) == 1 and "SyncBatchNorm" in notes[0]


def lr_drops(given: dict) -> tuple[list[int], Settings]:
    """The 0-indexed epochs that start at a lower lr under the resolved recipe."""
    settings, _ = resolve(given, recipes.Capabilities("cpu", False, True))
    net = torch.nn.Linear(2, 2)
    opt = building.build_optimizer(settings, net)
    sched = building.build_scheduler(settings, opt, 1)
    drops, lr = [], opt.param_groups[0]["lr"]
    for epoch in range(settings.epochs):
        if opt.param_groups[0]["lr"] != lr:
            drops.append(epoch)
            lr = opt.param_groups[0]["lr"]
        opt.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        sched.step()
    return drops, settings


# The official code's schedules at their default lengths, counted from 0.
OFFICIAL = [
    ({"dataset": "cifar10"}, [149, 224], {"batch_size": 64, "nesterov": True, "weight_decay": 1e-4, "gamma": 0.1}),
    ({"dataset": "imagenet"}, [30, 60], {"batch_size": 256, "nesterov": True, "colour_augment": True}),
    ({"model": "diracnet"}, [59, 119, 159], {"batch_size": 128, "nesterov": False, "weight_decay": 5e-4,
                                             "gamma": 0.2, "pad_mode": "reflect", "restart_momentum": True}),
    ({"model": "diracnet", "dirac_version": 1}, [59, 119, 159], {"pad_mode": "symmetric", "gamma": 0.2}),
    ({"dataset": "imagenet", "arch": "diracnet18"}, [29, 59, 89],
     {"epochs": 100, "batch_size": 256, "nesterov": False, "weight_decay": 1e-4, "gamma": 0.1,
      "colour_augment": False, "restart_momentum": True}),
    ({"dataset": "svhn"}, [19, 29], {"epochs": 40, "augment": False, "drop_rate": 0.2}),
    ({"dataset": "fashion-mnist"}, [19, 29], {"epochs": 40, "schedule": "lua"}),
]  # fmt: skip


@pytest.mark.parametrize(("given", "drops", "expected"), OFFICIAL)
def test_recipes_follow_the_official_code(given, drops, expected):
    found, settings = lr_drops(given)
    assert found == drops
    assert {k: getattr(settings, k) for k in expected} == expected


# The official rules, transcribed from the code that runs them, for every length N.
def lua_lr(epoch: int, n: int) -> float:
    """liuzhuang13/DenseNet train.lua, Trainer:learningRate (CIFAR), epoch from 1."""
    decay = 2 if epoch >= 0.75 * n else 1 if epoch >= 0.5 * n else 0
    return 0.1 * 0.1**decay


def lua_imagenet_lr(epoch: int, n: int) -> float:
    """The same function's ImageNet branch: floor((epoch - 1) / 30) drops."""
    return 0.1 * 0.1 ** ((epoch - 1) // 30)


def diracnet_lrs(n: int, fractions: list[float]) -> list[float]:
    """szagoruyko/diracnets train.py: on_start_epoch makes a new optimizer with lr * 0.2
    when epoch (from 1) is in epoch_step; the steps are f * N rounded half up."""
    epoch_step = [int(Decimal(repr(f)) * n + Decimal("0.5")) for f in fractions]
    lr, lrs = 0.1, []
    for epoch in range(1, n + 1):
        if epoch in epoch_step:
            lr *= 0.2
        lrs.append(lr)
    return lrs


def trained_lrs(given: dict) -> list[float]:
    """The lr of every epoch as train.py's optimizer and scheduler set it."""
    settings, _ = resolve(given, recipes.Capabilities("cpu", False, True))
    opt = building.build_optimizer(settings, torch.nn.Linear(2, 2))
    sched = building.build_scheduler(settings, opt, 1)
    lrs = []
    for _ in range(settings.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedules_follow_the_official_rules_for_any_length():
    for n in range(1, 401):
        epochs = range(1, n + 1)
        assert trained_lrs({"epochs": n}) == pytest.approx([lua_lr(e, n) for e in epochs]), n
        imagenet = trained_lrs({"epochs": n, "dataset": "imagenet"})
        assert imagenet == pytest.approx([lua_imagenet_lr(e, n) for e in epochs]), n
        dirac = trained_lrs({"epochs": n, "model": "diracnet"})
        assert dirac == pytest.approx(diracnet_lrs(n, [0.3, 0.6, 0.8])), n


def test_cosine_anneals_every_step_from_lr_to_zero_for_any_length():
    """lr at step t of T = lr0 (1 + cos(pi t / T)) / 2, T = epochs x steps an epoch, written
    out here from the formula, for many lengths and batch counts."""
    cpu = recipes.Capabilities("cpu", False, True)
    for epochs, per_epoch in [(1, 1), (1, 7), (3, 5), (40, 3), (100, 2), (7, 13)]:
        settings, _ = resolve({"schedule": "cosine", "epochs": epochs, "lr": 0.1}, cpu)
        opt = building.build_optimizer(settings, torch.nn.Linear(2, 2))
        sched = building.build_scheduler(settings, opt, per_epoch)
        total, lrs = epochs * per_epoch, []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        expected = [0.1 * (1 + math.cos(math.pi * t / total)) / 2 for t in range(total)]
        assert lrs == pytest.approx(expected, rel=1e-15, abs=0), (epochs, per_epoch)
        assert lrs[0] == 0.1 and opt.param_groups[0]["lr"] < 1e-17  # 0 after the last step
        assert settings.milestones == [] and settings.gamma is None  # args.json records no drops


def test_cosine_refuses_drops_in_one_line():
    cpu = recipes.Capabilities("cpu", False, True)
    for given, flag in [({"milestones": [0.5]}, "--milestones"), ({"gamma": 0.2}, "--gamma"),
                        ({"restart_momentum": True}, "--restart-momentum")]:  # fmt: skip
        with pytest.raises(UserError, match=f"^{flag}: --schedule cosine .* no drops$"):
            resolve({"schedule": "cosine", **given}, cpu)
    # a DiracNet's momentum restart is a rule of its drops: off under cosine
    settings, _ = resolve({"schedule": "cosine", "model": "diracnet"}, cpu)
    assert settings.restart_momentum is False
    settings, _ = resolve({"schedule": "cosine", "restart_momentum": False}, cpu)
    assert settings.restart_momentum is False


def test_every30_takes_no_fractions():
    with pytest.raises(UserError, match="every30"):
        resolve({"dataset": "imagenet", "milestones": [0.5]}, recipes.Capabilities("cpu", False, True))


def test_shared_stats_run_eagerly_for_a_cpu_densenet_only():
    cpu, cuda = recipes.Capabilities("cpu", True, True), recipes.Capabilities("cuda", True, True)
    settings, notes = resolve({"shared_stats": True}, cpu)
    assert settings.shared_stats and not settings.compile and "compile is off" in notes[0]
    for given, caps, match in [
        ({"shared_stats": True, "compile": True}, cpu, "cannot be combined with --compile"),
        ({"shared_stats": True}, cuda, "DenseNet on the CPU"),
        ({"shared_stats": True, "model": "diracnet"}, cpu, "DenseNet on the CPU"),
    ]:
        with pytest.raises(UserError, match=match):
            resolve(given, caps)
    # a resumed CPU run that had them, continued on a GPU: off, with a note
    settings, notes = resolve({}, cuda, old={"shared_stats": True})
    assert not settings.shared_stats and any("--shared-stats is off" in n for n in notes)
