#!/usr/bin/env python3
"""Checks that the fast CPU defaults (bf16 autocast + channels_last) keep the accuracy of the
naive fp32 NCHW path: same seeds, real Fashion-MNIST, a small DenseNet-BC.

Run: python attic/fast_vs_naive.py [--epochs 4 --train-subset 10000 --seeds 0 1]
Writes results/accuracy-fashion-mnist.json and prints a markdown table.
"""

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
MODES = {"fast (bf16 + channels_last)": ["--amp", "bf16", "--channels-last"],
         "naive (fp32, NCHW)": ["--amp", "off", "--no-channels-last"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--depth", type=int, default=40)
    p.add_argument("--growth", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--out", default=str(ROOT / "results" / "accuracy-fashion-mnist.json")
    )
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        for mode, flags in MODES.items():
            save = (
                ROOT
                / "work"
                / f"accuracy.{'fast' if 'bf16' in flags else 'naive'}.seed{seed}"
            )
            cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "fashion-mnist",
                   "--depth", str(args.depth), "--growth", str(args.growth), "--epochs", str(args.epochs),
                   "--train-subset", str(args.train_subset), "--seed", str(seed), "--save", str(save),
                   "--no-plot", *flags]  # fmt: skip
            if (save / "latest.pt").exists():
                cmd.append("--resume")
            subprocess.run(cmd, check=True, cwd=ROOT)
            log = pd.read_csv(save / "log.csv")
            last = log.iloc[-1]
            rows.append({"mode": mode, "seed": seed, "test_err": float(last.test_err),
                         "test_loss": float(last.test_loss), "train_loss": float(last.train_loss),
                         "seconds_per_epoch": float(log.seconds.median())})  # fmt: skip
    table = pd.DataFrame(rows)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
               "command": " ".join(["python", "attic/fast_vs_naive.py", *sys.argv[1:]])}  # fmt: skip
    Path(args.out).write_text(
        json.dumps({"machine": machine, "runs": rows}, indent=2) + "\n"
    )
    print(f"`{machine['command']}` (DenseNet-BC-{args.depth}-{args.growth}, {args.epochs} epochs, "
          f"{args.train_subset} training images)\n")  # fmt: skip
    print("| mode | seed | test error % | test loss | s/epoch |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['seed']} | {r['test_err']:.2f} | {r['test_loss']:.4f} | "
              f"{r['seconds_per_epoch']:.1f} |")  # fmt: skip
    print(
        table.groupby("mode")[["test_err", "seconds_per_epoch"]]
        .mean()
        .round(2)
        .to_string()
    )


if __name__ == "__main__":
    main()
