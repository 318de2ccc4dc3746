#!/usr/bin/env python3
"""Checks that memory_efficient=True stores activations linear in depth (plain: quadratic):
bytes autograd keeps for backward, parameters excluded, for DenseNet-BC depths 40..250;
memory_efficient as densenet.py has it (checkpointed) and with sharedstats.py's converter
(the lean block, which recomputes no convolution).

Run: python attic/memory_vs_depth.py [--growth 12 --batch 16 --size 32]
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import densenet
import sharedstats
from reference import saved_activation_bytes  # the linear-memory tests' measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--growth", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    x = torch.randn(a.batch, 3, a.size, a.size)
    print("| depth | plain MiB | memory_efficient MiB | ratio | + shared statistics MiB | ratio |")
    print("|---|---|---|---|---|---|")
    for depth in (40, 70, 100, 160, 250):
        plain, checkpointed, lean = (
            saved_activation_bytes(build(densenet.densenet_cifar(depth, a.growth, memory_efficient=me)), x) / 2**20
            for me, build in ((False, lambda m: m), (True, lambda m: m), (True, sharedstats.convert_shared_stats))
        )  # fmt: skip
        print(f"| {depth} | {plain:.0f} | {checkpointed:.0f} | {checkpointed / plain:.2f} "
              f"| {lean:.0f} | {lean / plain:.2f} |")

if __name__ == "__main__":
    main()
