#!/usr/bin/env python3
"""DenseNet-BC-100-12 training speed on the CPU: what ./train.py does by default, beside the
public CIFAR DenseNets of bamos/densenet.pytorch, andreasveit/densenet-pytorch and
gpleiss/efficient_densenet_pytorch in their eager modes. results/peers-cpu.md holds its
output of 2026-12-04 (2 threads, AVX-512 BF16, torch 2.14.1+cu130) under its command.

Their files are not part of this repository: fetch them and pass the folder that holds
bamos_densenet.py (densenet.py there), veit_densenet.py (densenet.py) and
gpleiss_densenet.py (models/densenet.py). Every model trains batch 64 of 32x32 RGB images
(forward, cross-entropy, backward, SGD with Nesterov momentum) in one process under
train.py's process settings (engine.process_settings), in interleaved rounds; the figure
is the median step. Ours also runs in the same eager modes, and with shared statistics.

Run: python attic/peers_cpu.py --peers DIR [--rounds 3 --steps 5 --out FILE.md]
"""

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import densenet
import sharedstats
from training import engine, recipes

# (name, file, constructor): DenseNet-BC-100-12 for 10 classes in each file's own terms
PEERS = (
    ("bamos", "bamos_densenet.py", lambda m: m.DenseNet(12, 100, 0.5, 10, True)),
    ("veit", "veit_densenet.py", lambda m: m.DenseNet3(100, 10, 12, 0.5, True, 0.0)),
    ("gpleiss", "gpleiss_densenet.py", lambda m: m.DenseNet(12, (16, 16, 16), 0.5, 24, 4, 0)),
)
EAGER = {"fp32 NCHW": (False, "off"), "fp32 channels_last": (True, "off"),
         "bf16 channels_last": (True, "bf16")}  # fmt: skip


def load(folder: Path, file: str):
    spec = importlib.util.spec_from_file_location(file[:-3], folder / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case(net: torch.nn.Module, channels_last: bool, amp: str, compiled: bool = False):
    """A step function for one row: the model on a fixed batch, as train.py steps it."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model = torch.compile(net) if compiled else net
    return lambda: engine.train_step(model, opt, scaler, x, y, amp)


def rows(peers: Path) -> dict:
    """Every row's step function: the peers and ours in the eager modes, ours by default."""
    out = {}
    for name, file, build in PEERS:
        module = load(peers, file)
        for mode, (cl, amp) in EAGER.items():
            out[f"{name}, {mode}"] = case(build(module), cl, amp)
    ours = lambda: densenet.densenet_cifar(100, 12)  # noqa: E731
    for mode, (cl, amp) in EAGER.items():
        out[f"ours, {mode}"] = case(ours(), cl, amp)
        out[f"ours + shared stats, {mode}"] = case(
            sharedstats.convert_shared_stats(ours()), cl, amp
        )
    d = recipes.device_defaults(recipes.probe(torch.device("cpu")))
    label = f"{d['amp']}, channels_last {d['channels_last']}, compile {d['compile']}"
    out[f"ours, train.py default ({label})"] = case(
        ours(), d["channels_last"], d["amp"], d["compile"]
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--peers", type=Path, required=True, help="folder with the three peer files")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps a row a round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps a row a round")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args()
    with engine.process_settings(torch.device("cpu")):
        steps = rows(args.peers)
        t0 = time.perf_counter()
        for fn in steps.values():  # first steps: compiling, allocator warm-up
            fn()
        print(
            f"first steps (compiling included): {time.perf_counter() - t0:.0f} s", file=sys.stderr
        )
        times = {name: [] for name in steps}
        for r in range(args.rounds):
            for name, fn in steps.items():
                for i in range(args.warmup + args.steps):
                    t = time.perf_counter()
                    fn()
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - t)
            print(f"round {r + 1} done", file=sys.stderr)
    speed = {name: 64 / statistics.median(t) for name, t in times.items()}
    best_peer = max((v, k) for k, v in speed.items() if not k.startswith("ours"))
    flags = sorted(
        set(Path("/proc/cpuinfo").read_text().split())
        & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    )
    lines = [f"`python attic/peers_cpu.py --rounds {args.rounds} --steps {args.steps}`, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, CPU flags {' '.join(flags)}, {time.strftime('%Y-%m-%d')}",
             "", "| model, mode | img/s | / fastest peer |", "|---|---:|---:|"]  # fmt: skip
    for name, v in speed.items():
        lines.append(f"| {name} | {v:.1f} | {v / best_peer[0]:.2f} |")
    lines.append(f"\nFastest peer row: {best_peer[1]} ({best_peer[0]:.1f} img/s).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
