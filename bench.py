#!/usr/bin/env python3
"""Training throughput and memory of DenseNet: naive fp32 against each fast path, and the
DenseNets users already have (torchvision's, timm's) beside ours in the same modes.

    python bench.py                        # DenseNet-BC-100-12 on CPU; four models on CUDA
    python bench.py --models densenet121   # with torchvision's (and timm's) densenet121
    python bench.py --quick --models tiny  # a small DenseNet-BC in seconds (tests run this)
    python bench.py --gpu-check            # the GPU check (gpucheck.py): one short command

Each mode (row) runs in a fresh process, so no row inherits another's caches, compiled
code or memory high-water mark. img/s is the batch over the median step after warm-up.
"""

import argparse
import datetime
import importlib.util
import inspect
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
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
import files
import train

try:
    import resource
except ImportError:  # Windows has no resource module: CPU memory is then not measured
    resource = None

ROOT = Path(__file__).resolve().parent


def torchvision_densenet121(**kwargs) -> nn.Module:
    """torchvision's densenet121 (imported here: only the peer rows need torchvision)."""
    from torchvision.models import densenet121

    return densenet121(**kwargs)


def timm_densenet121(**kwargs) -> nn.Module:
    """timm's densenet121, where timm (an optional extra) is installed."""
    from timm import create_model

    return create_model("densenet121", **kwargs)


# name: (factory, image size, default batch); "tiny" (DenseNet-BC-22-8) is for the tests
MODELS = {
    "densenet-bc-100-12": (partial(densenet.densenet_cifar, 100, 12), 32, 64),
    "densenet-bc-250-24": (partial(densenet.densenet_cifar, 250, 24), 32, 64),
    "densenet-bc-190-40": (partial(densenet.densenet_cifar, 190, 40), 32, 64),
    "densenet121": (densenet.densenet121, 224, 64),
    "tiny": (partial(densenet.densenet_cifar, 22, 8), 32, 16),
    "torchvision-densenet121": (torchvision_densenet121, 224, 64),
    "timm-densenet121": (timm_densenet121, 224, 64),
}
# Each peer and the model of ours it is measured beside, in the same modes.
PEER_OF = {"torchvision-densenet121": "densenet121", "timm-densenet121": "densenet121"}
OURS = [name for name in MODELS if name not in PEER_OF]
CPU_MODELS = ["densenet-bc-100-12"]
CUDA_MODELS = [name for name in OURS if name != "tiny"]
# DenseNet-BC's recipe (paper Sec. 4.2) for train.build_optimizer.
RECIPE = {"model": "densenet", "lr": 0.1, "momentum": 0.9, "nesterov": True,
          "weight_decay": 1e-4, "epochs": 300, "milestones": [0.5, 0.75], "gamma": 0.1}  # fmt: skip

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
NO_CPU_MEMORY = "CPU memory not measured: no resource module here and no psutil peak"
MEMORY_NOTE = (
    "'before' is after building model, optimizer and batch and one eager training step "
    "on a single image (loads kernels, starts threads, creates the SGD momentum buffers), "
    "so the figure is what the batch's training adds; on CPU, compiled rows also count "
    "the compiler's own memory"
)


class UsageError(Exception):
    """A bad command line the user can fix: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Mode:
    """One row's settings; the fast paths are cumulative, as train.py combines them.
    shared_stats None is the model's default; False is plain per-layer BatchNorm."""

    name: str
    channels_last: bool = False
    amp: str = "off"
    compile: str | None = None  # torch.compile mode, or None for eager
    memory_efficient: bool = False
    shared_stats: bool | None = None

    @property
    def settings(self) -> str:
        parts = [
            "channels_last" if self.channels_last else "NCHW",
            "fp32" if self.amp == "off" else self.amp,
            f"compile({self.compile})" if self.compile else "eager",
        ]
        parts += ["memory_efficient"] * self.memory_efficient
        return ", ".join(parts + ["plain BN"] * (self.shared_stats is False))


class Row(NamedTuple):
    """One measured mode: img/s at the median step, interquartile range of step times
    over their median, and training memory in bytes (MEMORY_MEASURE; None: unmeasured)."""

    mode: Mode
    img_per_s: float
    spread: float
    mem: int | None


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


def has_shared_stats() -> bool:
    """Whether densenet.DenseNet has the shared-statistics block (issue 16) to compare."""
    return "shared_stats" in inspect.signature(densenet.DenseNet).parameters


def model_modes(name: str, device_type: str, cpu_compile: bool = False) -> list[Mode]:
    """modes(), plus naive with plain per-layer BN for our models when densenet.py has both."""
    out = modes(device_type, cpu_compile)
    if name in OURS and has_shared_stats():
        out.insert(1, Mode("naive-plain-bn", shared_stats=False))
    return out


def efficient_mode(rows: list[Row]) -> Mode:
    """memory_efficient=True with the settings of the fastest measured row."""
    fastest = max(rows, key=lambda r: r.img_per_s).mode
    return replace(fastest, name="memory_efficient", memory_efficient=True)


def peers(name: str) -> list[str]:
    """The peers measured beside one of our models: timm's only where timm is installed."""
    found = [p for p, ours in PEER_OF.items() if ours == name]
    return [p for p in found if not p.startswith("timm") or importlib.util.find_spec("timm")]


# ------------------------------------------------------------------- FLOPs and peaks


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls and convolutions that fn runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of a training step's forward and backward (SGD itself has no matmuls)."""
    return count_flops(lambda: F.cross_entropy(model(x), y).backward())


def flops_per_img(name: str, batch: int, size: int | None = None) -> float:
    """Training-step FLOPs per image, counted on the meta device (nothing computed).
    memory_efficient's recomputation is not counted: these are the useful FLOPs."""
    factory, default_size, _ = MODELS[name]
    size = size or default_size
    with torch.device("meta"):
        model = factory()
        x = torch.randn(batch, 3, size, size)
        y = torch.zeros(batch, dtype=torch.long)
    return step_flops(model, x, y) / batch


def cpu_info() -> dict:
    """Model name, flags and clock (MHz) from /proc/cpuinfo (Linux; elsewhere what
    platform knows, no flags and no clock)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"name": platform.processor() or "unknown", "flags": [], "mhz": 0.0}
    pattern = r"^(model name|flags|cpu MHz)\s*:\s*(.*)$"
    field = dict(re.findall(pattern, text, re.MULTILINE))
    return {
        "name": field.get("model name", "unknown"),
        "flags": field.get("flags", "").split(),
        "mhz": float(field.get("cpu MHz", 0)),
    }


def peak_flops(device_name: str, amp: str, threads: int) -> float | None:
    """Peak FLOP/s for this precision on "cpu" (PEAK_NOTE) or a CUDA device; None if
    unknown (a GPU not in GPU_PEAKS, a CPU whose clock is not known)."""
    if device_name == "cpu":
        info = cpu_info()
        lanes = 16 if "avx512f" in info["flags"] else 8
        bf16 = 2 if amp == "bf16" and "avx512_bf16" in info["flags"] else 1
        return threads * 2 * lanes * 2 * info["mhz"] * 1e6 * bf16 or None
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


def prepare(name: str, batch: int, mode: Mode, device: torch.device, size: int | None = None):
    """(eager model, optimizer, scaler, x, y) as train.py builds them, seeded: every
    mode starts from the same weights and batch."""
    torch.manual_seed(0)
    factory, default_size, _ = MODELS[name]
    size = size or default_size
    kwargs = {"memory_efficient": mode.memory_efficient}
    if mode.shared_stats is not None:
        kwargs["shared_stats"] = mode.shared_stats
    model = factory(**kwargs).to(device)
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt, _ = train.build_optimizer(argparse.Namespace(**RECIPE, device=device), model)
    scaler = torch.amp.GradScaler(device.type, enabled=mode.amp == "fp16")
    return model, opt, scaler, x, y


def memory_mark(device: torch.device) -> int | None:
    """This process's memory high-water mark (CUDA: since the last reset); None where
    the platform offers none (no resource module and no psutil peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if resource is not None:  # ru_maxrss: KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    try:
        import psutil  # noqa: PLC0415 - optional, for Windows
    except ImportError:
        return None
    return getattr(psutil.Process().memory_info(), "peak_wset", None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, batch: int, mode: Mode, device: str, warmup: int, steps: int,
            threads: int, size: int | None = None) -> tuple[list[float], int | None, int | None]:  # fmt: skip
    """Seconds of each timed step (after the warm-up ones), training memory, and the
    process's memory high-water mark (memory_mark) at the end."""
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True  # as train.py sets it on CUDA
    device = torch.device(device)
    if device.type == "cpu":
        engine.keep_freed_memory()  # as train.py does, for every mode alike
    model, opt, scaler, x, y = prepare(name, batch, mode, device, size)
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
    after = memory_mark(device)
    return times[warmup:], None if before is None or after is None else after - before, after


def _child(conn, fn: Callable, args: tuple) -> None:
    try:
        conn.send((True, fn(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent as one line
        line = (str(e).strip().splitlines() or [""])[0][:300]
        conn.send((False, f"{type(e).__name__}: {line}"))


def call_fresh(fn: Callable, args: tuple, timeout: float | None = None):
    """fn(*args) in a newly spawned Python process, killed after timeout seconds.
    Raises RuntimeError with one line if it fails, dies or runs out of time."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args))  # not daemonic: compile forks
    proc.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise RuntimeError(f"stopped after {timeout:.0f} s, over its time")
        ok, value = receive.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the measuring process died (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
    if not ok:
        raise RuntimeError(value)
    return value


def summarise(mode: Mode, batch: int, times: list[float], mem: int | None) -> Row:
    """A Row from the timed steps of every round and the peak memory."""
    low, median, high = statistics.quantiles(times, n=4)
    return Row(mode, batch / median, (high - low) / median, mem)


def after_first_round(name: str, rows: list[Row]) -> list[Mode]:
    """Rows added once the first round's speed modes are measured: memory_efficient with
    the fastest one's settings and with naive's (the cost at equal precision), and the
    fastest one with plain per-layer BN where shared statistics are measured."""
    speed = [r for r in rows if r.mode.shared_stats is not False]
    fastest = max(speed[1:] or speed, key=lambda r: r.img_per_s).mode
    naive = replace(speed[0].mode, name="memory_efficient-naive", memory_efficient=True)
    out = [efficient_mode(speed[1:] or speed), naive]
    if any(r.mode.shared_stats is False for r in rows):
        out.append(replace(fastest, name=f"{fastest.name}-plain-bn", shared_stats=False))
    return out


def measure_into(m: str, mode: Mode, i: int, a: argparse.Namespace, batch: int,
                 plan: dict, times: dict, mems: dict) -> None:  # fmt: skip
    """Measure one row in a fresh process and keep its step times and peak memory. A
    failing row (a compile error, say) is dropped; a peer whose naive row fails is dropped
    whole; our own naive row failing stops the bench."""
    args = (m, batch, mode, a.device, a.warmup, a.steps, a.threads, a.size)
    try:
        step_times, mem, _ = call_fresh(measure, args)
    except RuntimeError as e:
        if mode != plan[m][0]:
            print(f"{m} {mode.name} failed, skipped: {e}", file=sys.stderr)
            plan[m].remove(mode)
            return
        if m not in PEER_OF:
            raise
        print(f"{m} failed, skipped: {e}", file=sys.stderr)
        del plan[m]
        return
    times.setdefault((m, mode), []).extend(step_times)
    mems[m, mode] = None if mem is None else max(mem, mems.get((m, mode), 0))
    print(f"{m} {mode.name} (round {i + 1}): {batch / statistics.median(step_times):.1f}"
          f" img/s, {mib(mem)} MiB", file=sys.stderr)  # fmt: skip


def chosen(mode: Mode, a: argparse.Namespace) -> bool:
    """Whether --modes keeps this row (naive always: the speedups are against it)."""
    return a.modes is None or mode.name in a.modes or mode.name == "naive"


def bench_model(name: str, batch: int, a: argparse.Namespace, device_name: str) -> list:
    """Every mode of one model and of its peers (the same modes, interleaved), in a.rounds
    rounds: background load hits every row alike."""
    device_type = torch.device(a.device).type
    group = [name] + (peers(name) if a.peers else [])
    plan = {
        m: [x for x in model_modes(m, device_type, a.cpu_compile) if chosen(x, a)] for m in group
    }
    times, mems, extra = {}, {}, []

    def rows(m: str) -> list[Row]:
        return [summarise(mode, batch, times[m, mode], mems[m, mode]) for mode in plan[m]]

    for i in range(a.rounds):
        pending = list(plan[name])
        while pending:
            for mode, m in [(mode, m) for mode in pending for m in list(plan)]:
                if mode in plan.get(m, ()):
                    measure_into(m, mode, i, a, batch, plan, times, mems)
            pending = []
            if not extra:  # the first round's speed modes are done
                extra = pending = [x for x in after_first_round(name, rows(name)) if chosen(x, a)]
                for m in plan:
                    plan[m] += [e for e in extra if m == name or e.shared_stats is None]
    records = []
    for m in plan:
        measured, flops = rows(m), flops_per_img(m, batch, a.size)
        for r in measured:
            peak = peak_flops(device_name, r.mode.amp, a.threads)
            records.append(record(m, batch, r, measured[0], flops, peak))
    return records


def record(name: str, batch: int, row: Row, naive: Row, flops: float, peak: float | None) -> dict:
    """One result: the issue's keys, plus settings, fraction of peak and spread."""
    return {
        "model": name, "batch": batch, "mode": row.mode.name, "settings": row.mode.settings,
        "img_per_s": row.img_per_s, "peak_mem_bytes": row.mem,
        "speedup_vs_naive": row.img_per_s / naive.img_per_s,
        "mem_vs_naive": ratio(row.mem, naive.mem), "flops_per_img": flops,
        "frac_of_peak": row.img_per_s * flops / peak if peak else None,
        "step_time_spread": row.spread,
    }  # fmt: skip


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def peer_ratios(records: list[dict]) -> list[dict]:
    """Each peer row beside ours in the same settings: img/s and memory, ours over theirs."""
    ours = {(r["model"], r["settings"]): r for r in records if r["model"] not in PEER_OF}
    out = []
    for p in (r for r in records if r["model"] in PEER_OF):
        o = ours.get((PEER_OF[p["model"]], p["settings"]))
        if o is not None:
            out.append({
                "model": o["model"], "peer": p["model"], "mode": p["mode"],
                "settings": p["settings"], "img_per_s": o["img_per_s"],
                "peer_img_per_s": p["img_per_s"], "peak_mem_bytes": o["peak_mem_bytes"],
                "peer_peak_mem_bytes": p["peak_mem_bytes"],
                "speed_ratio": o["img_per_s"] / p["img_per_s"],
                "mem_ratio": ratio(o["peak_mem_bytes"], p["peak_mem_bytes"]),
            })  # fmt: skip
    return out


# ---------------------------------------------------------------------------- report


def mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f}"


def num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def peer_table(ratios: list[dict]) -> list[str]:
    """Markdown lines: each peer's img/s and memory, and ours over theirs."""
    if not ratios:
        return []
    head = "| ours | peer | mode | settings | img/s (ours) | img/s (peer) | speed ratio " \
           "| MiB (ours) | MiB (peer) | memory ratio |"  # fmt: skip
    lines = ["", head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in ratios:
        lines.append(
            f"| {r['model']} | {r['peer']} | {r['mode']} | {r['settings']} "
            f"| {r['img_per_s']:.1f} | {r['peer_img_per_s']:.1f} | {r['speed_ratio']:.2f} "
            f"| {mib(r['peak_mem_bytes'])} | {mib(r['peer_peak_mem_bytes'])} "
            f"| {num(r['mem_ratio'])} |"
        )
    return lines


def notes(records: list[dict]) -> list[str]:
    """memory_efficient and shared statistics, each against its base at the same settings."""
    by = {(r["model"], r["settings"]): r for r in records}
    lines = []
    for r in records:
        if r["mode"] == "memory_efficient":
            base = by[r["model"], r["settings"].removesuffix(", memory_efficient")]
            memory = num(ratio(r["peak_mem_bytes"], base["peak_mem_bytes"]), ".0%")
            lines.append(
                f"\n{r['model']}: memory_efficient against {base['mode']} (same settings): "
                f"memory {memory}, step time {base['img_per_s'] / r['img_per_s'] - 1:+.0%}."
            )
        elif r["settings"].endswith(", plain BN"):
            shared = by[r["model"], r["settings"].removesuffix(", plain BN")]
            lines.append(
                f"\n{r['model']}: shared BN statistics against plain per-layer BN "
                f"({shared['settings']}): {shared['img_per_s'] / r['img_per_s']:.2f}x img/s."
            )
    return lines


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
        frac = None if r["frac_of_peak"] is None else 100 * r["frac_of_peak"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['settings']} "
            f"| {r['img_per_s']:.1f} | {r['speedup_vs_naive']:.2f} "
            f"| {mib(r['peak_mem_bytes'])} | {num(r['mem_vs_naive'])} "
            f"| {r['flops_per_img'] / 1e9:.3f} | {num(frac, '.1f')} |"
        )
    lines += peer_table(peer_ratios(records)) + notes(records)
    if not has_shared_stats():
        lines.append("\nshared BN statistics: not measured (densenet.py has no shared_stats)")
    if m.get("memory_note_cpu"):
        lines.append(f"\n{m['memory_note_cpu']}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- command line


def machine_info(device: torch.device, threads: int, argv: list[str]) -> dict:
    """Where and how the figures were measured, for the results file."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    no_memory = NO_CPU_MEMORY if device.type == "cpu" and memory_mark(device) is None else None
    return {
        "device": name, "cpu": cpu_info()["name"], "cores": os.cpu_count(), "threads": threads,
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        # other work on the machine (Windows has no load average)
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "command": shlex.join(["python", "bench.py", *argv]),
        "peak_flops": {amp: peak_flops(name, amp, threads) for amp in ("off", "bf16")},
        "peak_flops_note": PEAK_NOTE[device.type],
        "memory_measure": no_memory or MEMORY_MEASURE[device.type],
        "memory_note": MEMORY_NOTE, "memory_note_cpu": no_memory,
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # fmt: off
    p.add_argument("--models", nargs="+", choices=OURS, metavar="NAME",
                   help=f"of {', '.join(OURS)} (default: the first on CPU, all but tiny on CUDA)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="measure torchvision's (and timm's) densenet121 beside ours (default on)")
    p.add_argument("--batch", type=int, help="batch size (default 64; tiny 16)")
    p.add_argument("--size", type=int, help="image size (default: the model's, 32 or 224)")
    p.add_argument("--rounds", type=int,
                   help="interleaved rounds of all modes (CPU 3; CUDA and --quick 1)")
    p.add_argument("--warmup", type=int, help="untimed steps a round (CPU 3, CUDA 15, --quick 3)")
    p.add_argument("--steps", type=int, help="timed steps a round (CPU 8, CUDA 50, --quick 10)")
    p.add_argument("--quick", action="store_true", help="one short round: a rough, fast run")
    p.add_argument("--modes", nargs="+", metavar="MODE",
                   help="only these rows, e.g. naive +amp memory_efficient (default all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads (default: all cores; 1 on a machine others are using)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="also torch.compile on CPU (slow to compile on few cores)")
    p.add_argument("--out", type=Path,
                   help="JSON file or folder (default results/bench-<device>.json)")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table here")
    p.add_argument("--gpu-check", action="store_true",
                   help="run the GPU check instead (its options: python gpucheck.py --help)")
    # fmt: on
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(a.device).type == "cuda"
    a.models = a.models or (CUDA_MODELS if cuda else CPU_MODELS)
    defaults = (1, 3, 10) if a.quick else (1, 15, 50) if cuda else (3, 3, 8)
    for key, value in zip(("rounds", "warmup", "steps"), defaults, strict=True):
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.steps < 2:
        p.error("--steps must be at least 2 (the median and quartiles need them)")
    return a


def run(argv: list[str]) -> None:
    """The bench: check the outputs, measure every model, write JSON and the table."""
    a = parse_args(argv)
    device = torch.device(a.device)
    machine = machine_info(device, a.threads, argv)
    machine.update(rounds=a.rounds, warmup=a.warmup, steps=a.steps)
    name = f"bench-{device_kind(machine['device'])}"
    out = files.output(
        a.out or ROOT / "results" / f"{name}.json", "--out", default_name=f"{name}.json"
    ).path
    table_file = (
        a.markdown and files.output(a.markdown, "--markdown", default_name=f"{name}.md").path
    )
    if machine["memory_note_cpu"]:
        print(f"note: {machine['memory_note_cpu']}", file=sys.stderr)
    records = []
    for model in a.models:  # written after each model: a stopped run keeps what it measured
        records += bench_model(model, a.batch or MODELS[model][2], a, machine["device"])
        result = {"machine": machine, "records": records, "peers": peer_ratios(records)}
        files.write_text(out, json.dumps(result, indent=2) + "\n")
    table = markdown(machine, records)
    print(table)
    if table_file:
        files.write_text(table_file, table)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if "--gpu-check" in argv:
            import gpucheck  # noqa: PLC0415 - gpucheck imports this module

            return gpucheck.main([x for x in argv if x != "--gpu-check"])
        run(argv)
    except (UsageError, files.OutputError) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import bench  # one copy of this module (its UsageError, Mode) for this file and gpucheck

    sys.exit(bench.main())
