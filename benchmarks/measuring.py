"""What bench.py and its GPU check (gpucheck.py) both measure with: the models and the row
settings (Mode), a training step timed in a fresh process under train.py's optimizer and
process-wide settings, FLOPs and peak FLOP/s, the machine, the device flag, the output
files, and the one-line errors of both commands."""

import argparse
import datetime
import importlib.util
import multiprocessing as mp
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import densenet
import sharedstats
from training import engine, files, recipes
from training.building import build_optimizer
from training.errors import UserError
from training.settings import resolve

try:
    import resource
except ImportError:  # Windows has no resource module: CPU memory is then not measured
    resource = None


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


@dataclass(frozen=True)
class Mode:
    """One row's settings; the fast paths are cumulative, as train.py combines them.
    shared_stats: our model through sharedstats.convert_shared_stats (eager CPU rows)."""

    name: str
    channels_last: bool = False
    amp: str = "off"
    compile: str | None = None  # torch.compile mode, or None for eager
    memory_efficient: bool = False
    shared_stats: bool = False

    @property
    def settings(self) -> str:
        parts = [
            "channels_last" if self.channels_last else "NCHW",
            "fp32" if self.amp == "off" else self.amp,
            f"compile({self.compile})" if self.compile else "eager",
        ]
        parts += ["memory_efficient"] * self.memory_efficient
        return ", ".join(parts + ["shared stats"] * self.shared_stats)


class Row(NamedTuple):
    """One measured mode: img/s at the median step, interquartile range of step times
    over their median, and training memory in bytes (MEMORY_MEASURE; None: unmeasured)."""

    mode: Mode
    img_per_s: float
    spread: float
    mem: int | None


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
    model = factory(memory_efficient=mode.memory_efficient).to(device)
    if mode.shared_stats:
        model = sharedstats.convert_shared_stats(model)
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(train_settings(device), model)
    scaler = torch.amp.GradScaler(device.type, enabled=mode.amp == "fp16")
    return model, opt, scaler, x, y


def train_settings(device: torch.device) -> argparse.Namespace:
    """What `./train.py` resolves for DenseNet-BC on CIFAR-10 on this device (the paper's
    recipe, training/recipes.py), so every row steps train.py's optimizer with its settings."""
    given = {"model": "densenet", "dataset": "cifar10"}
    return resolve(given, recipes.probe(device))[0]


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
    process's memory high-water mark (memory_mark) at the end, under train.py's
    process-wide settings (engine.process_settings), every mode alike."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    with engine.process_settings(device):
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
    """fn(*args) in a new Python process, killed after timeout seconds. Raises RuntimeError
    with one line if it fails, dies or runs out of time. The process is forked from a server
    that has only imported this module (no tensor work yet, so allocator, caches and thread
    pool start fresh): 0.2 s a row where a spawned one re-imported torch in 3 s."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
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


def mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f}"


def num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


# ---------------------------------------------------------------- the commands' edges


def select_device(flag: str) -> torch.device:
    """--device of bench.py and the GPU check: auto is CUDA where usable, else the CPU."""
    return engine.select_device(flag, program="bench.py", runs_on=("cuda", "cpu"))


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


def command(run: Callable[[list[str]], int], argv: list[str]) -> int:
    """run(argv), with a user's error (a bad flag or path) as one line and exit status 2."""
    try:
        return run(argv)
    except (UserError, files.OutputError) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
