#!/usr/bin/env python3
"""The GPU check: one command that turns a lent GPU into results within a time budget.

    python bench.py --gpu-check --budget 450                 # on the GPU (README "On a GPU")
    python bench.py --gpu-check --parts modes --budget 450   # a second run: what was skipped
    python bench.py --gpu-check --device cpu --tiny --budget 120   # its code path, on CPU (CI)

Parts, in order: DenseNet-BC-100-12's training modes; DenseNet-BC-190-40 memory_efficient;
DenseNet-121 at 224 beside torchvision's and timm's; the share of an epoch spent outside the
model step; a Fashion-MNIST training run with train.py; SIGTERM during that run and --resume.
Each part is written into results/gpu-check-<gpu>.json (atomically) the moment it finishes,
merged by part name with what the file holds; a part, or a row, that no longer fits the
budget is skipped with a line saying so.
"""

import argparse
import datetime
import gzip
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import bench
import data
import datafiles
import engine
import files
import recipes
from bench import Mode

PARTS = ("modes", "memory", "peers", "overhead", "train", "resume")
ROOT = Path(__file__).resolve().parent
SIGTERM_EXIT = 128 + signal.SIGTERM  # what train.py returns after saving on SIGTERM
# Guessed seconds (start, build, warm-up and timed steps) of one measured row before one
# has been seen, and of train.py's start (data, model, compiling): (eager, compiled).
ROW_GUESS = {"cuda": (15, 60), "cpu": (20, 240)}
TRAIN_START_GUESS = {"cuda": (20, 60), "cpu": (20, 240)}


@dataclass(frozen=True)
class Sizes:
    """What the check measures: the paper's models, or tiny ones for its CPU test."""

    cifar: str  # DenseNet-BC-100-12
    wide: str  # DenseNet-BC-190-40
    batch: int
    imagenet_size: int
    imagenet_batch: int
    warmup: int
    steps: int
    overhead_steps: int
    train_flags: tuple[str, ...]  # train.py's model flags (none: the paper's BC-100-12)
    train_batch: int
    train_s: float  # the training run's wall time (its first start included)
    max_epochs: int  # the recipe's 40 Fashion-MNIST epochs


FULL = Sizes("densenet-bc-100-12", "densenet-bc-190-40", 64, 224, 64, 10, 30, 60, (), 64, 180, 40)
TINY_FLAGS = ("--depth", "10", "--growth", "4")
# DenseNet-121 at 64x64: its last block still sees 2x2 maps (BN needs two values a channel)
TINY = Sizes("tiny", "tiny", 8, 64, 2, 1, 3, 4, TINY_FLAGS, 16, 30, 3)


def default_mode(device: torch.device) -> Mode:
    """The mode train.py picks by default on this device (recipes.device_defaults)."""
    d = recipes.device_defaults(recipes.probe(device))
    compile_mode = d.get("compile_mode") or "default"
    return Mode("default", d["channels_last"], d["amp"], compile_mode if d["compile"] else None)


def check_modes(cuda: bool, default: Mode) -> list[Mode]:
    """Part 1's rows: naive fp32, train.py's default, then bf16 and fp16 (CUDA), each eager
    and compiled in both modes (CUDA), and the default with plain per-layer BN."""
    out = [Mode("naive"), default]
    for amp in ("bf16", "fp16") if cuda else ("bf16",):
        for compile_mode in (None, "default", "reduce-overhead") if cuda else (None,):
            mode = Mode(f"{amp}-{compile_mode or 'eager'}", True, amp, compile_mode)
            if replace(mode, name="default") != default:
                out.append(mode)
    if bench.has_shared_stats():
        out.append(replace(default, name="default-plain-bn", shared_stats=False))
    return out


# ---------------------------------------------------------------------- budget and file


class Check:
    """The budget, the time each kind of row has taken, and the results file."""

    def __init__(self, a: argparse.Namespace, out: Path, machine: dict) -> None:
        self.a, self.out, self.machine = a, out, machine
        self.device = torch.device(a.device)
        self.sizes = TINY if a.tiny else FULL
        self.end = time.monotonic() + a.budget
        self.seen: dict[tuple[str, bool], float] = {}  # (part, compiled) -> seconds a row
        self.skipped: list[str] = []
        self.later: list[str] = []  # the chosen parts after the running one
        self.results = {"parts": {}}
        if out.exists():
            try:
                self.results = json.loads(out.read_text())
                self.results.setdefault("parts", {})
            except (OSError, ValueError) as e:
                print(f"note: {out} is unreadable ({e}); writing a new file", file=sys.stderr)

    def left(self) -> float:
        return self.end - time.monotonic()

    def row_cost(self, part: str, mode: Mode) -> float:
        compiled = mode.compile is not None
        guess = ROW_GUESS[self.device.type][compiled]
        return self.seen.get((part, compiled), self.seen.get(("", compiled), guess))

    def reserve(self) -> float:
        """Seconds kept for the parts after the running one: the training run's planned
        wall time, the resume's start, and the first row (two for the peers) of the others."""
        default = default_mode(self.device)
        eager = self.row_cost("", replace(default, compile=None))
        first = {"memory": eager, "peers": 2 * eager, "overhead": self.row_cost("modes", default),
                 "train": self.sizes.train_s,
                 "resume": TRAIN_START_GUESS[self.device.type][default.compile is not None]}  # fmt: skip
        return sum(first[p] for p in self.later)

    def fits(self, what: str, need: float) -> bool:
        """Whether `need` seconds fit, keeping reserve() for the parts after; if not, say so."""
        left = self.left() - self.reserve()
        if need <= left:
            return True
        self.skipped.append(what)
        print(f"skipped: {what} needs ~{need:.0f}s, {max(left, 0):.0f}s left", file=sys.stderr)
        return False

    def measured(self, part: str) -> set[tuple[str, str]]:
        """(model, mode) of the rows the file holds for a part."""
        return {
            (r["model"], r["mode"]) for r in self.results["parts"].get(part, {}).get("records", [])
        }

    def save(self, part: str, payload: dict) -> None:
        """Merge one finished part into the results file, atomically: its rows replace the
        rows of the same model and mode, and the file's other rows stay."""
        self.results["machine"] = self.machine
        if "records" in payload:
            new = {(r["model"], r["mode"]) for r in payload["records"]}
            old = self.results["parts"].get(part, {}).get("records", [])
            kept = [r for r in old if (r["model"], r["mode"]) not in new]
            payload = {**payload, "records": payload["records"] + kept}
            if "peers" in payload:
                payload["peers"] = bench.peer_ratios(payload["records"])
        self.results["parts"][part] = {**payload, "measured": self.machine["date"],
                                       "command": self.machine["command"]}  # fmt: skip
        files.write_text(self.out, json.dumps(self.results, indent=2) + "\n")
        print(f"{part}: saved in {self.out}", file=sys.stderr)


def measure_rows(check: Check, part: str, jobs: list) -> list[dict]:
    """bench.measure for each (model, mode, batch, size) in a fresh process, as long as
    each fits: the first, then those the file lacks; one bench.record each (speedup
    against the first row)."""
    s, a, out, first = check.sizes, check.a, [], None
    have = check.measured(part)
    later = sorted(jobs[1:], key=lambda j: (j[0], j[1].name) in have)
    for model, mode, batch, size in jobs[:1] + later:
        need = check.row_cost(part, mode)
        if not check.fits(f"{part} {model} {mode.name}", need):
            continue
        start = time.monotonic()
        args = (model, batch, mode, a.device, s.warmup, s.steps, a.threads, size)
        timeout = min(check.left() - check.reserve(), max(2 * need, need + 90))
        try:
            times, mem, peak = bench.call_fresh(bench.measure, args, timeout=timeout)
        except RuntimeError as e:
            print(f"{part} {model} {mode.name} failed: {e}", file=sys.stderr)
            continue
        finally:  # a row stopped at its time makes the next rows of its kind look as long
            for key in (part, ""):
                check.seen[key, mode.compile is not None] = time.monotonic() - start
        row = bench.summarise(mode, batch, times, mem)
        first = first or row
        flops = bench.flops_per_img(model, batch, size)
        pk = bench.peak_flops(check.machine["device"], mode.amp, a.threads)
        out.append({**bench.record(model, batch, row, first, flops, pk), "abs_peak_bytes": peak})
        print(f"{part} {model} {mode.name}: {row.img_per_s:.1f} img/s, {bench.mib(mem)} MiB",
              file=sys.stderr)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- parts


def part_modes(check: Check) -> dict | None:
    """1. DenseNet-BC-100-12 at batch 64: training img/s in each precision and compile mode."""
    s = check.sizes
    modes = check_modes(check.device.type == "cuda", default_mode(check.device))
    jobs = [(s.cifar, m, s.batch, None) for m in modes]
    rows = measure_rows(check, "modes", jobs)
    return {"model": s.cifar, "default_mode": default_mode(check.device).settings,
            "records": rows} if rows else None  # fmt: skip


def part_memory(check: Check) -> dict | None:
    """2. DenseNet-BC-190-40 at batch 64, memory_efficient (then plain, for the ratio): peak
    memory and img/s, in train.py's default precision, eager."""
    s, base = check.sizes, replace(default_mode(check.device), compile=None)
    efficient = replace(base, name="memory_efficient", memory_efficient=True)
    jobs = [(s.wide, m, s.batch, None) for m in (efficient, replace(base, name="plain"))]
    rows = measure_rows(check, "memory", jobs)
    note = "abs_peak_bytes: torch.cuda.max_memory_allocated (CPU: peak RSS) of the process"
    return {"model": s.wide, "records": rows, "note": note} if rows else None


def part_peers(check: Check) -> dict | None:
    """3. DenseNet-121 at 224, batch 64: ours beside torchvision's (memory_efficient off and
    on) and timm's, in one mode: train.py's default precision, eager."""
    s, base = check.sizes, replace(default_mode(check.device), name="eager", compile=None)
    efficient = replace(base, name="memory_efficient", memory_efficient=True)
    models = ["densenet121", *bench.peers("densenet121")]
    jobs = [(m, mode, s.imagenet_batch, s.imagenet_size) for mode in (base, efficient)
            for m in models]  # fmt: skip
    rows = measure_rows(check, "peers", jobs)
    note = "eager: compiling each model does not fit one command (bench.py compiles them)"
    if "timm-densenet121" not in models:
        note += "; timm is not installed here"
    return {"records": rows, "peers": bench.peer_ratios(rows), "note": note} if rows else None


def epoch_overhead(name: str, batch: int, mode: Mode, device: str, steps: int, threads: int):
    """Seconds of `steps` bare training steps on one batch, and of an engine.train_epoch of
    as many batches from data.Batches (uint8 images on the device, cropped, flipped and
    normalised there, metrics summed): the best of four alternated rounds of each."""
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    device = torch.device(device)
    model, opt, scaler, x, y = bench.prepare(name, batch, mode, device)
    net = torch.compile(model, mode=mode.compile) if mode.compile else model
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (steps * batch, *x.shape[1:]), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (steps * batch,), generator=g)
    split = data.Split(images, labels).to(device)
    batches = data.Batches(split, batch, train=True, augment=True, crop_pad=4, flip=True,
                           mean=[0.5] * 3, std=[0.25] * 3, channels_last=mode.channels_last)  # fmt: skip
    sums = torch.zeros(4, device=device)
    timings = {"bare": [], "epoch": []}
    for i in range(5):  # round 0 warms up (compiles, tunes) both; then alternate
        for kind in ("bare", "epoch"):
            bench.sync(device)
            start = time.perf_counter()
            if kind == "bare":
                for _ in range(steps):
                    engine.train_step(net, opt, scaler, x, y, mode.amp)
            else:
                sums, _, _ = engine.train_epoch(net, opt, scaler, batches, sums, amp=mode.amp,
                                                top5=False)  # fmt: skip
            bench.sync(device)
            if i:
                timings[kind].append(time.perf_counter() - start)
    bare, epoch = min(timings["bare"]), min(timings["epoch"])
    return {"steps": steps, "bare_s": bare, "epoch_s": epoch, "share_outside": 1 - bare / epoch}


def part_overhead(check: Check) -> dict | None:
    """4. The share of an epoch spent outside the model step, in train.py's default mode."""
    s, a, mode = check.sizes, check.a, default_mode(check.device)
    if not check.fits("overhead", check.row_cost("modes", mode)):
        return None
    args = (s.cifar, s.batch, mode, a.device, s.overhead_steps, a.threads)
    try:
        result = bench.call_fresh(epoch_overhead, args, timeout=check.left() - check.reserve())
    except RuntimeError as e:
        print(f"overhead failed: {e}", file=sys.stderr)
        return None
    return {"model": s.cifar, "settings": mode.settings, **result}


# --------------------------------------------------------------------- the training run


def fashion_mnist_images(data_dir: str) -> tuple[int, int] | None:
    """(training, test) images of the Fashion-MNIST train.py will read without a network:
    decompressed in data_dir, or .gz files in FASHION_MNIST_DIR (Debian's folder by
    default); None where a file is missing."""
    raw = Path(data_dir) / "FashionMNIST" / "raw"
    system = Path(os.environ.get("FASHION_MNIST_DIR", datafiles.FASHION_MNIST_DIR))
    counts = []
    for name in datafiles.FASHION_MNIST_RAW_MD5:
        if (raw / name).is_file():
            head = (raw / name).read_bytes()[:8]
        elif (system / f"{name}.gz").is_file():
            with gzip.open(system / f"{name}.gz") as f:
                head = f.read(8)
        else:
            return None
        if "images" in name:  # an IDX header: magic number, then the count (big-endian)
            counts.append(int.from_bytes(head[4:8], "big"))
    return counts[0], counts[1]


def number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def read_log(path: Path) -> list[dict]:
    """train.py's log.csv as rows (numbers where they are), read while it may be written:
    a line not yet whole is left out."""
    lines = path.read_text().splitlines() if path.exists() else []
    head = lines[0].split(",") if lines else []
    rows = [ln.split(",") for ln in lines[1:]]
    return [dict(zip(head, map(number, r), strict=True)) for r in rows if len(r) == len(head)]


def run_train(cmd: list[str], folder: Path, deadline: float, stop_after: int | None) -> dict:
    """Run train.py until it ends or the deadline (then SIGTERM: it saves and exits); with
    stop_after, SIGTERM once the log holds that many epochs. Exit code, seconds, signal."""
    folder.mkdir(parents=True, exist_ok=True)
    start, sent = time.monotonic(), None
    with (folder / "output.txt").open("a") as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None:
            time.sleep(0.05)
            due = stop_after is not None and len(read_log(folder / "log.csv")) >= stop_after
            if sent is None and (due or time.monotonic() > deadline):
                sent = "requested" if due else "deadline"
                proc.send_signal(signal.SIGTERM)
    return {"exit": proc.returncode, "seconds": time.monotonic() - start, "sigterm": sent}


def plan_epochs(check: Check, images: tuple[int, int], resume: bool) -> tuple[int, float]:
    """Epochs that fit the run's planned wall time (less where the budget is shorter), from
    part 1's img/s in the default mode (or a guess); and the guessed seconds of a start."""
    s, mode = check.sizes, default_mode(check.device)
    startup = TRAIN_START_GUESS[check.device.type][mode.compile is not None]
    measured = check.results["parts"].get("modes", {}).get("records", [])
    speed = next((r["img_per_s"] for r in measured if r["mode"] == "default"), 1000)
    # 28x28 images are 0.77 of the 32x32 ones part 1 measured; evaluation is ~3x faster
    epoch_s = 0.77 * (images[0] + images[1] / 3) / speed + 1
    wall = min(s.train_s + resume * startup, check.left() - 5)
    return max(1, min(s.max_epochs, int((wall - startup * (1 + resume)) / epoch_s))), startup


def part_train(check: Check, resume: bool) -> None:
    """5 and 6. train.py on Fashion-MNIST with the paper's recipe, sized to the budget:
    final-epoch test error and wall time; with `resume`, SIGTERM halfway, then --resume."""
    a, s = check.a, check.sizes
    images = fashion_mnist_images(a.data_dir)
    if images is None:
        check.skipped.append("train")
        print("skipped: train: no Fashion-MNIST (set FASHION_MNIST_DIR, README)", file=sys.stderr)
        return
    epochs, startup = plan_epochs(check, images, resume)
    resume = resume and epochs > 1
    if not check.fits("train", startup * (1 + resume) + 10):
        return
    folder = a.save / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "fashion-mnist",
           "--data-dir", a.data_dir, "--save", str(folder), "--epochs", str(epochs),
           "--batch-size", str(s.train_batch), "--device", a.device, "--no-plot",
           *s.train_flags]  # fmt: skip
    first = run_train(cmd, folder, check.end - 5, max(1, epochs // 2) if resume else None)
    runs = [first]
    if first["sigterm"] == "requested" and first["exit"] == SIGTERM_EXIT:
        check.save("resume", {"stop": first, "note": "stopped; the resumed run has not ended"})
        runs.append(run_train([*cmd, "--resume"], folder, check.end - 5, None))
    rows = read_log(folder / "log.csv")
    done = [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1)) and runs[-1]["exit"] == 0
    check.save("train", {
        "train_command": shlex.join(["python", "train.py", *cmd[2:]]), "epochs": epochs,
        "finished": done, "test_err": rows[-1]["test_err"] if rows else None,
        "wall_s": sum(r["seconds"] for r in runs), "train_s": sum(r["seconds"] for r in rows),
        "runs": runs, "rows": rows,
        "target": "the recipe's 40 epochs: at least 95.6% test accuracy (issue 15); this run "
                  "is shorter, the recipe's schedule compressed into its epochs",
    })  # fmt: skip
    if len(runs) == 2:
        saved = first["exit"] == SIGTERM_EXIT and (folder / "latest.pt").exists()
        said = [ln for ln in (folder / "output.txt").read_text().splitlines() if "signal" in ln]
        check.save("resume", {"stop": first, "resumed": runs[1], "stopped_and_saved": saved,
                              "stop_message": said[:1], "continued_to_the_end": done})  # fmt: skip
    elif resume:
        check.skipped.append("resume")
        print("skipped: resume: the run ended before its SIGTERM took effect", file=sys.stderr)


# ----------------------------------------------------------------------------- report


def table(results: dict) -> str:
    """One markdown table of every part in the file."""
    lines = ["| part | row | settings | img/s | train mem (MiB) | result |",
             "|---|---|---|---:|---:|---|"]  # fmt: skip
    parts = results.get("parts", {})
    for part in PARTS:
        p = parts.get(part)
        if p is None:
            lines.append(f"| {part} | | | | | not measured |")
            continue
        for r in p.get("records", []):
            result = f"{r['speedup_vs_naive']:.2f}x naive" if part == "modes" else (
                f"process peak {bench.mib(r.get('abs_peak_bytes'))} MiB")  # fmt: skip
            lines.append(f"| {part} | {r['model']} {r['mode']} | {r['settings']} "
                         f"| {r['img_per_s']:.1f} | {bench.mib(r['peak_mem_bytes'])} | {result} |")  # fmt: skip
        for r in p.get("peers", []):
            lines.append(f"| {part} | ours / {r['peer']} | {r['settings']} | | "
                         f"| {r['speed_ratio']:.2f}x img/s, {bench.num(r['mem_ratio'])}x memory |")  # fmt: skip
        if part == "overhead":
            lines.append(f"| {part} | {p['model']} | {p['settings']} | | "
                         f"| {100 * p['share_outside']:.1f}% of the epoch outside the step |")  # fmt: skip
        if part == "train":
            err = "–" if p["test_err"] is None else f"{p['test_err']:.2f}%"
            lines.append(f"| {part} | {p['epochs']} epochs | | | | final test error {err}, "
                         f"{p['wall_s']:.0f}s wall, finished {p['finished']} |")  # fmt: skip
        if part == "resume" and "resumed" in p:
            lines.append(f"| {part} | SIGTERM, --resume | | | | exit {p['stop']['exit']} "
                         f"then {p['resumed']['exit']}; continued to the end "
                         f"{p['continued_to_the_end']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py --gpu-check", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    # fmt: off
    p.add_argument("--budget", type=float, default=450,
                   help="seconds for the whole check (default 450: one 8-minute command)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), metavar="PART",
                   help=f"which parts, of {' '.join(PARTS)} (default all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models and sizes: the whole path in minutes on CPU (the tests)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads")
    p.add_argument("--out", type=Path,
                   help="results file or folder (default results/gpu-check-<device>.json)")
    p.add_argument("--data-dir", default="data",
                   help="train.py's --data-dir; Fashion-MNIST's .gz files may instead be in "
                        "FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--save", type=Path, default=ROOT / "work" / "gpu-check",
                   help="folder for the training runs (default work/gpu-check)")
    # fmt: on
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.budget <= 0:
        raise bench.UsageError(f"--budget {a.budget:g}: give the seconds the check may take")
    return a


def main(argv: list[str]) -> int:
    """Run the chosen parts in order within the budget, then print the table."""
    a = parse_args(argv)
    device = torch.device(a.device)
    machine = bench.machine_info(device, a.threads, ["--gpu-check", *argv])
    name = f"gpu-check-{bench.device_kind(machine['device'])}.json"
    out = files.output(a.out or ROOT / "results" / name, "--out", default_name=name).path
    check = Check(a, out, machine)
    steps = {"modes": part_modes, "memory": part_memory, "peers": part_peers,
             "overhead": part_overhead}  # fmt: skip
    chosen = [p for p in PARTS if p in a.parts]
    for i, part in enumerate(chosen):
        check.later = [] if part == "train" else chosen[i + 1 :]  # train covers resume
        if part in steps:
            payload = steps[part](check)
            if payload:
                check.save(part, payload)
        elif part == "train" or "train" not in chosen:  # one run serves both train and resume
            part_train(check, resume="resume" in chosen)
    print(table(check.results))
    print(f"results: {out}; skipped: {', '.join(check.skipped) or 'nothing'}")
    again = [p for p in PARTS if any(x.split()[0] == p for x in check.skipped)]
    if again:
        print(f"to measure what was skipped: python bench.py --gpu-check --parts {' '.join(again)}")
    return 0


if __name__ == "__main__":
    sys.exit(bench.main(["--gpu-check", *sys.argv[1:]]))
