#!/usr/bin/env python3
"""Where a CPU training step of DenseNet-BC-100-12 (batch 64) goes: the figures behind
README's CPU notes and engine.keep_freed_memory.

Run: python attic/cpu_step_profile.py [--study shared-stats] [--rounds 3 --steps 5]

Times, in fresh processes and interleaved rounds, the cases of one study, then profiles
one step of its profiled cases and groups the operators' self time:
  --study bf16 (default): the plain and the memory_efficient step with bf16 autocast +
    channels_last, and the fp32 NCHW memory_efficient step with and without
    keep_freed_memory (the figures behind README's CPU notes).
  --study shared-stats: shared batch statistics against plain per-layer BN, fp32 in NCHW
    and channels_last, and bf16 + channels_last (the fastest CPU mode); memory_efficient;
    and a bound: the plain model with every dense layer's norm1 and its ReLU removed (not
    a DenseNet, the speed no implementation of them can beat); its output of 2026-12-02
    (AMD EPYC, 2 cores, AVX-512 BF16, torch 2.14.1+cu130) is
    results/cpu-shared-stats-profile.md.
"""

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.profiler import profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import measuring
from training import engine

GROUPS = {  # operator name fragment -> group, first match wins
    "convolution": "convolutions",
    "batch_norm": "batch norm",
    "threshold": "ReLU",
    "relu": "ReLU",
    "clamp": "ReLU",
    "cat": "concatenation, copies, casts",
    "copy": "concatenation, copies, casts",
    "add": "gradient sums",
}
# name: (bench mode, keep_freed_memory as train.py does)
BF16 = {
    "bf16 plain": (measuring.Mode("plain", True, "bf16"), True),
    "bf16 memory_efficient": (
        measuring.Mode("me", True, "bf16", memory_efficient=True),
        True,
    ),
    "fp32 memory_efficient": (measuring.Mode("me32", memory_efficient=True), True),
    "fp32 memory_efficient, freed memory unmapped": (
        measuring.Mode("me32", memory_efficient=True),
        False,
    ),
}
VARIANTS = ("plain BN", "shared", "no norm1", "memory_efficient")  # of the shared-stats study
SHARED_STATS = {
    f"{amp} {layout} {bn}": (
        measuring.Mode(f"{amp} {layout} {bn}", layout == "channels_last", "off" if amp == "fp32" else amp,
                   memory_efficient=bn == "memory_efficient",
                   shared_stats=bn in ("shared", "memory_efficient")),
        True,
    )
    for amp, layout in (("fp32", "NCHW"), ("fp32", "channels_last"), ("bf16", "channels_last"))
    for bn in VARIANTS
    if bn != "memory_efficient" or amp == "bf16"
}  # fmt: skip
CASES = {**BF16, **SHARED_STATS}


def steps(case: str, n: int, profiled: bool) -> tuple[list[float], dict]:
    """Step times (after 3 warm-up steps) and, if profiled, self time by GROUPS of one more."""
    mode, keep = CASES[case]
    torch.set_flush_denormal(True)  # as train.py
    if keep:
        engine.keep_freed_memory()
    cpu = torch.device("cpu")
    model, opt, scaler, x, y = measuring.prepare("densenet-bc-100-12", 64, mode, cpu)
    if case.endswith("no norm1"):  # the bound: the plain path with norm1 and ReLU gone
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1].startswith("denselayer"):
                m.norm1, m.relu1 = nn.Identity(), nn.Identity()
    times = []
    for _ in range(3 + n):
        start = time.perf_counter()
        engine.train_step(model, opt, scaler, x, y, mode.amp)
        times.append(time.perf_counter() - start)
    groups = {}
    if profiled:
        with profile() as prof:
            engine.train_step(model, opt, scaler, x, y, mode.amp)
        for event in prof.key_averages():
            if event.key.startswith("aten::"):
                name = next((g for k, g in GROUPS.items() if k in event.key), "other")
                groups[name] = groups.get(name, 0) + event.self_cpu_time_total / 1e6
    return times[3:], groups


def fresh(*args) -> tuple[list[float], dict]:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(steps, *args).result()


def bf16_ratios(median: dict[str, float]) -> None:
    """memory_efficient's cost in bf16, and what keep_freed_memory saves in fp32."""
    bf16 = median["bf16 memory_efficient"] / median["bf16 plain"] - 1
    print(f"bf16: memory_efficient over plain {bf16:+.0%}")
    fp32 = median["fp32 memory_efficient"]
    unmapped = median["fp32 memory_efficient, freed memory unmapped"]
    print(f"fp32 memory_efficient: keep_freed_memory saves {1 - fp32 / unmapped:.0%}")


def shared_stats_ratios(median: dict[str, float]) -> None:
    """Each variant's speed against the plain per-layer BN step in the same settings."""
    for case, m in median.items():
        variant = next(v for v in VARIANTS if case.endswith(v))
        plain = median[case.removesuffix(variant) + "plain BN"]
        if variant != "plain BN":
            print(f"{case}: {plain / m:.2f}x the plain BN step")
    best_plain = min(m for case, m in median.items() if case.endswith("plain BN"))
    best_shared = min(m for case, m in median.items() if case.endswith("shared"))
    print(f"best shared mode {best_plain / best_shared:.2f}x the best plain mode")


# study: (its cases, the ratios it prints, the cases it profiles)
STUDIES = {
    "bf16": (BF16, bf16_ratios, ("bf16 plain", "bf16 memory_efficient")),
    "shared-stats": (
        SHARED_STATS,
        shared_stats_ratios,
        ("bf16 channels_last plain BN", "bf16 channels_last shared"),
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--study", choices=STUDIES, default="bf16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    cases, ratios, profiled = STUDIES[args.study]
    times = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            times[case] += fresh(case, args.steps, False)[0]
    median = {case: statistics.median(t) for case, t in times.items()}
    for case, m in median.items():
        print(f"{case}: median step {m:.3f} s")
    ratios(median)
    print()
    for case in profiled:
        _, groups = fresh(case, 1, True)
        total = sum(groups.values())
        print(f"{case} step, operator self time:")
        for name, sec in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {name:29s} {sec:6.3f} s  {sec / total:4.0%}")


if __name__ == "__main__":
    main()
