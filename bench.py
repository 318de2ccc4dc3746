#!/usr/bin/env python3
"""Training throughput and memory of DenseNet: naive fp32 against each fast path.

    python bench.py                        # DenseNet-BC-100-12 on CPU; four models on CUDA
    python bench.py --quick --models tiny  # a small DenseNet-BC in seconds (tests run this)

Each mode (row) runs in a fresh process, so no row inherits another's caches, compiled
code or memory high-water mark. img/s is the batch over the median step after warm-up.
"""

import argparse
import datetime
import json
import multiprocessing as mp
import os
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import densenet
import engine

# name: (factory, image size, default batch); "tiny" (DenseNet-BC-22-8) is for the tests
MODELS = {
    "densenet-bc-100-12": (partial(densenet.densenet_cifar, 100, 12), 32, 64),
    "densenet-bc-250-24": (partial(densenet.densenet_cifar, 250, 24), 32, 64),
    "densenet-bc-190-40": (partial(densenet.densenet_cifar, 190, 40), 32, 64),
    "densenet121": (densenet.densenet121, 224, 64),
    "tiny": (partial(densenet.densenet_cifar, 22, 8), 32, 16),
}
CPU_MODELS = ["densenet-bc-100-12"]
CUDA_MODELS = [name for name in MODELS if name != "tiny"]

# Dense peak FLOP/s from NVIDIA's datasheets: (part of the device name, bf16/fp16, TF32).
# fp32 rows use TF32: cuDNN runs fp32 convolutions on TF32 tensor cores by default.
GPU_PEAKS = [
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12),
    ("H200", 989e12, 495e12),
    ("A100", 312e12, 156e12),
]
PEAK_NOTE = {
    "cpu": "estimate, not measured: threads x 2 FMA units x fp32 SIMD lanes (16 with "
    "AVX-512, else 8) x 2 flops x clock (cpu MHz in /proc/cpuinfo), doubled for bf16 "
    "with AVX512-BF16; CPUs that run 512-bit ops as two halves (AMD Zen 4) reach half",
    "cuda": "NVIDIA datasheet, dense: TF32 for fp32 rows, bf16/fp16 for amp rows",
}
MEMORY_MEASURE = {
    "cpu": "peak RSS (ru_maxrss) of a fresh process during training minus its peak RSS "
    "before the first full-batch step",
    "cuda": "torch.cuda.max_memory_allocated during training minus memory_allocated "
    "before the first full-batch step",
}
MEMORY_NOTE = (
    "'before' is after building model, optimizer and batch and one eager training step "
    "on a single image (loads kernels, starts threads, creates the SGD momentum buffers), "
    "so the figure is what the batch's training adds; on CPU, compiled rows also count "
    "the compiler's own memory"
)


@dataclass(frozen=True)
class Mode:
    """One row's settings; the fast paths are cumulative, as train.py combines them."""

    name: str
    channels_last: bool = False
    amp: str = "off"
    compile: str | None = None  # torch.compile mode, or None for eager
    memory_efficient: bool = False

    @property
    def settings(self) -> str:
        parts = [
            "channels_last" if self.channels_last else "NCHW",
            "fp32" if self.amp == "off" else self.amp,
            f"compile({self.compile})" if self.compile else "eager",
        ]
        return ", ".join(parts + ["memory_efficient"] * self.memory_efficient)


class Row(NamedTuple):
    """One measured mode: img/s at the median step, interquartile range of step times
    over their median, and training memory in bytes (MEMORY_MEASURE)."""

    mode: Mode
    img_per_s: float
    spread: float
    mem: int


def modes(device_type: str, cpu_compile: bool = False) -> list[Mode]:
    """The speed modes for this device; memory_efficient is measured after them."""
    cuda = device_type == "cuda"
    out = [
        Mode("naive"),
        Mode("+channels_last", channels_last=True),
        Mode("+amp", channels_last=True, amp="bf16"),
    ]
    if cuda:
        out.append(Mode("+amp-fp16", channels_last=True, amp="fp16"))
    if cuda or cpu_compile:
        out.append(Mode("+compile", True, "bf16", compile="default"))
    if cuda:  # CUDA graphs: DenseNet at batch 64 is many small, launch-bound kernels
        out.append(Mode("+compile-cudagraphs", True, "bf16", "reduce-overhead"))
    return out


def efficient_mode(rows: list[Row]) -> Mode:
    """memory_efficient=True with the settings of the fastest measured row."""
    fastest = max(rows, key=lambda r: r.img_per_s).mode
    return replace(fastest, name="memory_efficient", memory_efficient=True)


# ------------------------------------------------------------------- FLOPs and peaks


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls and convolutions that fn runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of a training step's forward and backward (SGD itself has no matmuls)."""
    return count_flops(lambda: F.cross_entropy(model(x), y).backward())


def flops_per_img(name: str, batch: int) -> float:
    """Training-step FLOPs per image, counted on the meta device (nothing computed).
    memory_efficient's recomputation is not counted: these are the useful FLOPs."""
    factory, size, _ = MODELS[name]
    with torch.device("meta"):
        model = factory()
        x = torch.randn(batch, 3, size, size)
        y = torch.zeros(batch, dtype=torch.long)
    return step_flops(model, x, y) / batch


def cpu_info() -> dict:
    """Model name, flags and clock (MHz) from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text()
    pattern = r"^(model name|flags|cpu MHz)\s*:\s*(.*)$"
    field = dict(re.findall(pattern, text, re.MULTILINE))
    return {
        "name": field.get("model name", "unknown"),
        "flags": field.get("flags", "").split(),
        "mhz": float(field.get("cpu MHz", 0)),
    }


def peak_flops(device_name: str, amp: str, threads: int) -> float | None:
    """Peak FLOP/s for this precision on "cpu" (PEAK_NOTE) or a CUDA device; None if
    the GPU is not in GPU_PEAKS."""
    if device_name == "cpu":
        info = cpu_info()
        lanes = 16 if "avx512f" in info["flags"] else 8
        bf16 = 2 if amp == "bf16" and "avx512_bf16" in info["flags"] else 1
        return threads * 2 * lanes * 2 * info["mhz"] * 1e6 * bf16
    for part, half, tf32 in GPU_PEAKS:
        if part in device_name:
            return half if amp != "off" else tf32
    return None


def device_kind(device_name: str) -> str:
    """For file names: "cpu", or e.g. "NVIDIA H100 80GB HBM3" -> "h100"."""
    found = re.search(r"\b[A-Z]\d{2,3}\b", device_name)
    kind = found.group() if found else re.sub(r"\W+", "-", device_name).strip("-")
    return kind.lower()


# ----------------------------------------------------------------------- measurement


def prepare(name: str, batch: int, mode: Mode, device: torch.device):
    """(eager model, optimizer, scaler, x, y) as train.py builds them, seeded: every
    mode starts from the same weights and batch."""
    torch.manual_seed(0)
    factory, size, _ = MODELS[name]
    model = factory(memory_efficient=mode.memory_efficient).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, model.classifier.out_features, (batch,), device=device)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    scaler = torch.amp.GradScaler(device.type, enabled=mode.amp == "fp16")
    return model, opt, scaler, x, y


def memory_mark(device: torch.device) -> int:
    """This process's memory high-water mark (CUDA: since the last reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, batch: int, mode: Mode, device: str, warmup: int, steps: int,
            threads: int) -> tuple[list[float], int]:  # fmt: skip
    """Seconds of each timed step (after the warm-up ones) and training memory."""
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True  # as train.py sets it on CUDA
    device = torch.device(device)
    if device.type == "cpu":
        engine.keep_freed_memory()  # as train.py does, for every mode alike
    model, opt, scaler, x, y = prepare(name, batch, mode, device)
    engine.train_step(model, opt, scaler, x[:1], y[:1], mode.amp)  # see MEMORY_NOTE
    net = torch.compile(model, mode=mode.compile) if mode.compile else model
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = memory_mark(device)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        engine.train_step(net, opt, scaler, x, y, mode.amp)
        sync(device)
        times.append(time.perf_counter() - start)
    return times[warmup:], memory_mark(device) - before


def measure_fresh(*args) -> tuple[list[float], int]:
    """measure() in a newly spawned Python process."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def bench_model(name: str, batch: int, a: argparse.Namespace, device_name: str) -> list:
    """Each speed mode of one model, then memory_efficient with the fastest one's settings
    and with naive's, in a.rounds interleaved rounds: background load hits every mode alike."""
    order = modes(torch.device(a.device).type, a.cpu_compile)
    times, mems = {}, {}
    for i in range(a.rounds):
        queue = list(order)
        while queue:
            mode = queue.pop(0)
            args = (name, batch, mode, a.device, a.warmup, a.steps, a.threads)
            # A failing mode (a compile error, say) is skipped without losing the others.
            try:
                step_times, mem = measure_fresh(*args)
            except Exception as e:
                if mode == order[0]:
                    raise
                print(f"{name} {mode.name} failed, skipped: {e!r}", file=sys.stderr)
                order.remove(mode)
            else:
                times.setdefault(mode, []).extend(step_times)
                mems[mode] = max(mem, mems.get(mode, 0))
                print(f"{name} {mode.name} (round {i + 1}): {batch / statistics.median(step_times):.1f}"
                      f" img/s, {mem / 2**20:.0f} MiB", file=sys.stderr)  # fmt: skip
            if not queue and not any(m.memory_efficient for m in order):
                # The first round's speed modes are done: add memory_efficient with the
                # fastest one's settings, and with naive's (the cost at equal precision).
                speed = [summarise(m, batch, times[m], mems[m]) for m in order]
                fastest = efficient_mode(speed[1:] or speed)
                naive = replace(
                    order[0], name="memory_efficient-naive", memory_efficient=True
                )
                order += [fastest, naive]
                queue += [fastest, naive]
    rows = [summarise(mode, batch, times[mode], mems[mode]) for mode in order]
    flops = flops_per_img(name, batch)
    peaks = [peak_flops(device_name, r.mode.amp, a.threads) for r in rows]
    return [record(name, batch, r, rows[0], flops, pk) for r, pk in zip(rows, peaks)]


def summarise(mode: Mode, batch: int, times: list[float], mem: int) -> Row:
    """A Row from the timed steps of every round and the peak memory."""
    low, median, high = statistics.quantiles(times, n=4)
    return Row(mode, batch / median, (high - low) / median, mem)


def record(
    name: str, batch: int, row: Row, naive: Row, flops: float, peak: float | None
) -> dict:
    """One result: the issue's keys, plus settings, fraction of peak and spread."""
    return {
        "model": name,
        "batch": batch,
        "mode": row.mode.name,
        "settings": row.mode.settings,
        "img_per_s": row.img_per_s,
        "peak_mem_bytes": row.mem,
        "speedup_vs_naive": row.img_per_s / naive.img_per_s,
        "mem_vs_naive": row.mem / naive.mem,
        "flops_per_img": flops,
        "frac_of_peak": row.img_per_s * flops / peak if peak else None,
        "step_time_spread": row.spread,
    }


# ---------------------------------------------------------------------------- report


def markdown(machine: dict, records: list[dict]) -> str:
    """The table, with the command and the machine on the line above it."""
    m = machine
    title = (
        f"`{m['command']}` on {m['device']} ({m['cpu']}, {m['threads']} threads), "
        f"torch {m['torch']}, {m['date']}"
    )
    head = ("model", "batch", "mode", "settings", "img/s", "speedup", "train mem (MiB)",
            "mem vs naive", "GFLOP/img", "% of peak")  # fmt: skip
    lines = [title, "", f"| {' | '.join(head)} |", "|---|---:|---|---|" + "---:|" * 6]
    for r in records:
        frac = "–" if r["frac_of_peak"] is None else f"{100 * r['frac_of_peak']:.1f}"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['settings']} "
            f"| {r['img_per_s']:.1f} | {r['speedup_vs_naive']:.2f} "
            f"| {r['peak_mem_bytes'] / 2**20:.0f} | {r['mem_vs_naive']:.2f} "
            f"| {r['flops_per_img'] / 1e9:.3f} | {frac} |"
        )
    for eff in (r for r in records if r["mode"] == "memory_efficient"):
        same = eff["settings"].removesuffix(", memory_efficient")
        base = next(
            r for r in records if r["model"] == eff["model"] and r["settings"] == same
        )
        lines.append(
            f"\n{eff['model']}: memory_efficient against {base['mode']} (same settings):"
            f" memory {eff['peak_mem_bytes'] / base['peak_mem_bytes']:.0%},"
            f" step time {base['img_per_s'] / eff['img_per_s'] - 1:+.0%}."
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # fmt: off
    p.add_argument("--models", nargs="+", choices=list(MODELS), metavar="NAME",
                   help=f"of {', '.join(MODELS)} (default: the first on CPU, all but tiny on CUDA)")
    p.add_argument("--batch", type=int, help="batch size (default 64; tiny 16)")
    p.add_argument("--rounds", type=int,
                   help="interleaved rounds of all modes (CPU 3; CUDA and --quick 1)")
    p.add_argument("--warmup", type=int, help="untimed steps a round (CPU 3, CUDA 15, --quick 3)")
    p.add_argument("--steps", type=int, help="timed steps a round (CPU 8, CUDA 50, --quick 10)")
    p.add_argument("--quick", action="store_true", help="one short round: a rough, fast run")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads (default: all cores; 1 on a machine others are using)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="also torch.compile on CPU (slow to compile on few cores)")
    p.add_argument("--out", type=Path, help="JSON file (default results/bench-<device>.json)")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table here")
    # fmt: on
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(a.device).type == "cuda"
    a.models = a.models or (CUDA_MODELS if cuda else CPU_MODELS)
    defaults = (1, 3, 10) if a.quick else (1, 15, 50) if cuda else (3, 3, 8)
    for key, value in zip(("rounds", "warmup", "steps"), defaults):
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.steps < 2:
        p.error("--steps must be at least 2 (the median and quartiles need them)")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    device = torch.device(a.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    machine = {
        "device": device_name,
        "cpu": cpu_info()["name"],
        "cores": os.cpu_count(),
        "threads": a.threads,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "load_average_at_start": os.getloadavg()[0],  # other work on the machine
        "command": shlex.join(["python", "bench.py", *(argv or sys.argv[1:])]),
        "peak_flops": {
            amp: peak_flops(device_name, amp, a.threads) for amp in ("off", "bf16")
        },
        "peak_flops_note": PEAK_NOTE[device.type],
        "memory_measure": MEMORY_MEASURE[device.type],
        "memory_note": MEMORY_NOTE,
        "rounds": a.rounds,
        "warmup": a.warmup,
        "steps": a.steps,
    }
    records = []
    for name in a.models:
        records += bench_model(name, a.batch or MODELS[name][2], a, device_name)
    kind = device_kind(device_name)
    out = a.out or Path(__file__).resolve().parent / "results" / f"bench-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "records": records}
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(machine, records)
    print(table)
    if a.markdown:
        a.markdown.write_text(table)


if __name__ == "__main__":
    main()
