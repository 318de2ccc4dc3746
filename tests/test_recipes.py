"""recipes.py: the flags and their defaults, the fast paths per device, the official
schedules."""

import argparse
from pathlib import Path

import pytest
import torch

import recipes
import train


def test_every_flag_says_what_it_does_and_its_default():
    for action in recipes.parser()._actions:
        if action.dest != "help":
            assert action.help and "(default: " in action.help, action.option_strings


def test_help_defaults_come_from_the_recipes():
    helps = {a.dest: a.help for a in recipes.parser()._actions}
    assert "(default: 300; svhn, mnist, fashion-mnist: 40; imagenet" in helps["epochs"]
    assert "diracnet: 200; diracnet imagenet: 100)" in helps["epochs"]
    assert "(default: 64; imagenet, diracnet imagenet: 256; diracnet: 128)" in helps["batch_size"]


CAPABILITY_CASES = [
    (recipes.Capabilities("cuda", True, True), {"amp": "bf16", "channels_last": True, "compile": True}),
    (recipes.Capabilities("cuda", False, True), {"amp": "fp16", "channels_last": True, "compile": True}),
    (recipes.Capabilities("cuda", False, False), {"amp": "fp16", "channels_last": True, "compile": False}),
    (recipes.Capabilities("cpu", True, True), {"amp": "bf16", "channels_last": True, "compile": False}),
    (recipes.Capabilities("cpu", False, True), {"amp": "off", "channels_last": True, "compile": False}),
    (recipes.Capabilities("mps", False, False), {"amp": "off", "channels_last": False, "compile": False}),
]


@pytest.mark.parametrize(("caps", "expected"), CAPABILITY_CASES)
def test_fast_path_defaults_follow_the_device(caps, expected):
    assert recipes.device_defaults(caps) == expected
    a, _ = recipes.resolve({"dataset": "mnist"}, caps)
    assert {k: getattr(a, k) for k in expected} == expected


def test_this_cpu_is_probed_from_its_flags():
    """Native bf16 exactly when /proc/cpuinfo lists AVX512-BF16 or AMX-BF16."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    caps = recipes.probe(torch.device("cpu"))
    assert caps.native_bf16 == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_sync_bn_turns_compile_off_with_a_note():
    caps = recipes.Capabilities("cuda", True, True)
    a, notes = recipes.resolve({"sync_bn": True}, caps)
    assert a.compile is False and len(notes) == 1 and "SyncBatchNorm" in notes[0]


def lr_drops(given: dict) -> tuple[list[int], "argparse.Namespace"]:
    """The 0-indexed epochs that start at a lower lr under the resolved recipe."""
    a, _ = recipes.resolve(given, recipes.Capabilities("cpu", False, True))
    net = torch.nn.Linear(2, 2)
    opt, sched = train.build_optimizer(a, net)
    drops, lr = [], opt.param_groups[0]["lr"]
    for epoch in range(a.epochs):
        if opt.param_groups[0]["lr"] != lr:
            drops.append(epoch)
            lr = opt.param_groups[0]["lr"]
        opt.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        sched.step()
    return drops, a


# The official code's schedules, counted from 0 (see recipes.py for the lines that decide):
# liuzhuang13/DenseNet `epoch >= 0.5 * nEpochs` with epochs counted from 1; its ImageNet
# floor((epoch - 1) / 30); szagoruyko/diracnets `epoch + 1 in epoch_step`.
OFFICIAL = [
    ({"dataset": "cifar10"}, [149, 224], {"batch_size": 64, "nesterov": True, "weight_decay": 1e-4, "gamma": 0.1}),
    ({"dataset": "imagenet"}, [30, 60], {"batch_size": 256, "nesterov": True, "colour_augment": True}),
    ({"model": "diracnet"}, [59, 119, 159], {"batch_size": 128, "nesterov": False, "weight_decay": 5e-4,
                                             "gamma": 0.2, "pad_mode": "reflect", "restart_momentum": True}),
    ({"model": "diracnet", "dirac_version": 1}, [59, 119, 159], {"pad_mode": "symmetric", "gamma": 0.2}),
    ({"dataset": "imagenet", "arch": "diracnet18"}, [29, 59, 89],
     {"epochs": 100, "batch_size": 256, "nesterov": False, "weight_decay": 1e-4, "gamma": 0.1,
      "colour_augment": False, "restart_momentum": True}),
    ({"dataset": "svhn"}, [20, 30], {"epochs": 40, "augment": False, "drop_rate": 0.2}),
]  # fmt: skip


@pytest.mark.parametrize(("given", "drops", "settings"), OFFICIAL)
def test_recipes_follow_the_official_code(given, drops, settings):
    found, a = lr_drops(given)
    assert found == drops
    assert {k: getattr(a, k) for k in settings} == settings
