#!/usr/bin/env python3
"""Where a CPU training step of DenseNet-BC-100-12 (batch 64) goes: the figures behind
README's CPU notes and engine.keep_freed_memory.

Run: python attic/cpu_step_profile.py [--rounds 3 --steps 5]

Times, in fresh processes and interleaved rounds: the plain and the memory_efficient step
with bf16 autocast + channels_last (train.py's CPU default), and the fp32 NCHW
memory_efficient step with and without keep_freed_memory. Then profiles one step of each
bf16 path and groups the operators' self time.
"""

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.profiler import profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bench
import engine

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
CASES = {
    "bf16 plain": (bench.Mode("plain", True, "bf16"), True),
    "bf16 memory_efficient": (
        bench.Mode("me", True, "bf16", memory_efficient=True),
        True,
    ),
    "fp32 memory_efficient": (bench.Mode("me32", memory_efficient=True), True),
    "fp32 memory_efficient, freed memory unmapped": (
        bench.Mode("me32", memory_efficient=True),
        False,
    ),
}


def steps(case: str, n: int, profiled: bool) -> tuple[list[float], dict]:
    """Step times (after 3 warm-up steps) and, if profiled, self time by GROUPS of one more."""
    mode, keep = CASES[case]
    torch.set_flush_denormal(True)  # as train.py
    if keep:
        engine.keep_freed_memory()
    cpu = torch.device("cpu")
    model, opt, scaler, x, y = bench.prepare("densenet-bc-100-12", 64, mode, cpu)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    times = {case: [] for case in CASES}
    for _ in range(a.rounds):
        for case in CASES:
            times[case] += fresh(case, a.steps, False)[0]
    median = {case: statistics.median(t) for case, t in times.items()}
    for case, m in median.items():
        print(f"{case}: median step {m:.3f} s")
    bf16 = median["bf16 memory_efficient"] / median["bf16 plain"] - 1
    print(f"bf16: memory_efficient over plain {bf16:+.0%}")
    fp32, unmapped = median["fp32 memory_efficient"], list(median.values())[-1]
    print(f"fp32 memory_efficient: keep_freed_memory saves {1 - fp32 / unmapped:.0%}\n")
    for case in ("bf16 plain", "bf16 memory_efficient"):
        _, groups = fresh(case, 1, True)
        total = sum(groups.values())
        print(f"{case} step, operator self time:")
        for name, sec in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {name:29s} {sec:6.3f} s  {sec / total:4.0%}")


if __name__ == "__main__":
    main()
