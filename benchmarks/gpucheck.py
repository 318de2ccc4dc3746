"""The GPU check (bench.py --gpu-check): one command that turns a GPU into results within a
time budget.

    python bench.py --gpu-check --budget 450                 # on the GPU (README "On a GPU")
    python bench.py --gpu-check --parts modes --budget 450   # a second run: what was skipped
    python bench.py --gpu-check --device cpu --tiny --budget 120   # its code path, on CPU (CI)

Parts, in order: DenseNet-BC-100-12's training modes; DenseNet-BC-190-40 memory_efficient;
DenseNet-121 at 224 beside torchvision's and timm's; the share of an epoch spent outside the
model step; a Fashion-MNIST training run with train.py; SIGTERM during that run and --resume.
Each part is written into results/gpu-check-<gpu>.json (atomically) the moment it finishes,
merged by part name with what the file holds. The budget is planned first: time is kept
for each part's first rows (or its run) in PRIORITY order, a part it cannot hold is skipped
at once, and the time left over is shared evenly by the parts that can use more.
A part, or a row, that no longer fits is skipped with a line saying so. Without a usable
GPU the check refuses in one line, unless --device cpu asks for it on the CPU.
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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks import measuring
from benchmarks.measuring import Mode
from training import data, datafiles, engine, files, recipes
from training.errors import UserError

PARTS = ("modes", "memory", "peers", "overhead", "train", "resume")
# Whose time is kept first when the budget cannot hold every part: the first rows of the
# three parts of rows, then the training run, the overhead, and stopping and resuming.
PRIORITY = ("modes", "memory", "peers", "train", "overhead", "resume")
ROWS = ("modes", "memory", "peers")  # always tried: each row says when it does not fit
GROWS = (*ROWS, "train")  # the parts that use more time when there is more (rows, epochs)
ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, results/, work/
SIGTERM_EXIT = 128 + signal.SIGTERM  # what train.py returns after saving on SIGTERM
# Guessed seconds, (eager, compiled), until one has been seen. CUDA: the first GPU check
# (results/gpu-check-h200.log; NVIDIA H200, torch 2.11, 2026-12-04): fresh processes reached
# their first training step in 20-26 s (the memory and peers rows that failed there), so an
# eager row of warm-up and timed steps takes ~30 s; compiling BC-100-12 ran past 74 s (the
# overhead part, stopped there), and train.py took ~165 s besides its first epoch (start,
# compiling for training and evaluation, one evaluation, saving), mostly compiling, so a
# compiled row takes ~150 s; that first epoch took 64.5 s. CPU: the tiny models of the CPU
# test (compiled: a few minutes on 2 cores).
ROW_GUESS = {"cuda": (30, 150), "cpu": (20, 240)}  # one measured row, in its own process
TRAIN_START_GUESS = {"cuda": (30, 165), "cpu": (20, 240)}  # train.py besides its epochs
# train.py's Fashion-MNIST epoch at the least: the H200's first epoch was far slower than
# bench steps at part 1's img/s would say, so that estimate alone is not trusted.
EPOCH_GUESS = {"cuda": 65.0, "cpu": 0.0}


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
    max_epochs: int  # the recipe's 40 Fashion-MNIST epochs


FULL = Sizes("densenet-bc-100-12", "densenet-bc-190-40", 64, 224, 64, 10, 30, 60, (), 64, 40)
TINY_FLAGS = ("--depth", "10", "--growth", "4")
# DenseNet-121 at 64x64: its last block still sees 2x2 maps (BN needs two values a channel)
TINY = Sizes("tiny", "tiny", 8, 64, 2, 1, 3, 4, TINY_FLAGS, 16, 3)


def default_mode(device: torch.device) -> Mode:
    """The mode train.py picks by default on this device (recipes.device_defaults) for a
    run as short as the check's: on a CPU, too short to pay back compiling."""
    d = recipes.device_defaults(recipes.probe(device))
    compiles = d["compile"] and device.type != "cpu"
    compile_mode = recipes.COMMON["compile_mode"]  # train.py's --compile-mode
    return Mode("default", d["channels_last"], d["amp"], compile_mode if compiles else None)


def check_modes(cuda: bool, default: Mode) -> list[Mode]:
    """Part 1's rows: naive fp32, train.py's default, then bf16 and fp16 (CUDA), each eager
    and compiled in both modes (CUDA)."""
    out = [Mode("naive"), default]
    for amp in ("bf16", "fp16") if cuda else ("bf16",):
        for compile_mode in (None, "default", "reduce-overhead") if cuda else (None,):
            mode = Mode(f"{amp}-{compile_mode or 'eager'}", True, amp, compile_mode)
            if replace(mode, name="default") != default:
                out.append(mode)
    return out


# ---------------------------------------------------------------------- budget and file


class Check:
    """The budget and its plan, the time each kind of row has taken, and the results file."""

    def __init__(self, args: argparse.Namespace, out: Path, machine: dict) -> None:
        self.args, self.out, self.machine = args, out, machine
        self.device = torch.device(args.device)
        self.sizes = TINY if args.tiny else FULL
        self.end = time.monotonic() + args.budget
        self.part_end = self.end  # when the running part's time is up
        self.need: dict[str, float] = {}  # planned parts not yet run: seconds kept for each
        self.seen: dict[tuple[str, bool], float] = {}  # (part, compiled) -> seconds a row
        self.skipped: list[str] = []
        self.images = fashion_mnist_images(args.data_dir)
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

    def first_need(self, part: str) -> float:
        """Seconds a part needs at the least: its first row (two for the peers: a ratio),
        the overhead's one measurement in the default mode, or a run's start and one epoch."""
        default = default_mode(self.device)
        eager = self.row_cost("", replace(default, compile=None))
        if part in ("train", "resume"):
            return sum(train_costs(self))
        return {"modes": eager, "memory": eager, "peers": 2 * eager,
                "overhead": self.row_cost("modes", default)}[part]  # fmt: skip

    def plan(self, parts: list[str], seconds: float) -> None:
        """Keep time for each part's first_need (updated from the rows seen), in PRIORITY
        order while `seconds` hold it; a part they cannot hold is skipped now, saying so.
        The parts of rows are always kept: their rows say for themselves what does not fit."""
        self.need, kept = {}, 0.0
        for part in sorted(parts, key=PRIORITY.index):
            if part in ("train", "resume") and self.images is None:
                self.skipped.append(part)
                print(f"skipped: {part}: no Fashion-MNIST (set FASHION_MNIST_DIR, README)",
                      file=sys.stderr)  # fmt: skip
                continue
            need = self.first_need(part)
            if part in ROWS or kept + need <= seconds:
                self.need[part], kept = need, kept + need
            else:
                self.skip(part, need, seconds - kept)

    def kept_after(self, part: str) -> float:
        """Seconds kept for the planned parts after this one."""
        return sum(n for p, n in self.need.items() if PARTS.index(p) > PARTS.index(part))

    def start(self, part: str) -> bool:
        """Begin a part, planning again the time left for it and the parts after it (an
        earlier part may have run long); False if it no longer fits. A part of rows or the
        training run may use its need and an even share of the time no planned part needs;
        no part uses the time kept for the parts after it."""
        self.plan(list(self.need), self.left())
        if part not in self.need:
            return False
        rest = [p for p in self.need if PARTS.index(p) >= PARTS.index(part)]
        spare = max(self.left() - sum(self.need[p] for p in rest), 0)
        share = spare / len([p for p in rest if p in GROWS]) if part in GROWS else 0
        now = time.monotonic()
        self.part_end = min(now + self.need[part] + share, self.end - self.kept_after(part))
        return True

    def fits(self, what: str, need: float) -> bool:
        """Whether `need` seconds fit in the running part's time, to the second (a part's
        first row is given just its need); if not, say so."""
        left = self.part_end - time.monotonic()
        if need < left + 1:
            return True
        self.skip(what, need, left)
        return False

    def skip(self, what: str, need: float, left: float) -> None:
        self.skipped.append(what)
        print(f"skipped: {what} needs ~{need:.0f}s, {max(left, 0):.0f}s left", file=sys.stderr)

    def timeout(self, part: str, need: float) -> float:
        """Seconds a measurement guessed at `need` may run: twice that (90 s more at the
        least), never into the time kept for the parts after this one."""
        return min(self.end - self.kept_after(part) - time.monotonic(), max(2 * need, need + 90))

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
                payload["peers"] = measuring.peer_ratios(payload["records"])
        self.results["parts"][part] = {**payload, "measured": self.machine["date"],
                                       "command": self.machine["command"]}  # fmt: skip
        files.write_text(self.out, json.dumps(self.results, indent=2) + "\n")
        print(f"{part}: saved in {self.out}", file=sys.stderr)


def measure_rows(check: Check, part: str, jobs: list) -> list[dict]:
    """measuring.measure for each (model, mode, batch, size) in a fresh process, as long as
    each fits: the first, then those the file lacks; one measuring.record each (speedup
    against the first row)."""
    s, args, out, first = check.sizes, check.args, [], None
    have = check.measured(part)
    later = sorted(jobs[1:], key=lambda j: (j[0], j[1].name) in have)
    for model, mode, batch, size in jobs[:1] + later:
        need = check.row_cost(part, mode)
        if not check.fits(f"{part} {model} {mode.name}", need):
            continue
        start = time.monotonic()
        job = (model, batch, mode, args.device, s.warmup, s.steps, args.threads, size)
        try:
            times, mem, peak = measuring.call_fresh(
                measuring.measure, job, timeout=check.timeout(part, need)
            )
        except RuntimeError as e:
            print(f"{part} {model} {mode.name} failed: {e}", file=sys.stderr)
            continue
        finally:  # a row stopped at its time makes the next rows of its kind look as long
            for key in (part, ""):
                check.seen[key, mode.compile is not None] = time.monotonic() - start
        row = measuring.summarise(mode, batch, times, mem)
        first = first or row
        flops = measuring.flops_per_img(model, batch, size)
        pk = measuring.peak_flops(check.machine["device"], mode.amp, args.threads)
        record = measuring.record(model, batch, row, first, flops, pk)
        out.append({**record, "abs_peak_bytes": peak})
        print(f"{part} {model} {mode.name}: {row.img_per_s:.1f} img/s, {measuring.mib(mem)} MiB",
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
    models = ["densenet121", *measuring.peers("densenet121")]
    jobs = [(m, mode, s.imagenet_batch, s.imagenet_size) for mode in (base, efficient)
            for m in models]  # fmt: skip
    rows = measure_rows(check, "peers", jobs)
    note = "eager: compiling each model does not fit one command (bench.py compiles them)"
    if "timm-densenet121" not in models:
        note += "; timm is not installed here"
    return {"records": rows, "peers": measuring.peer_ratios(rows), "note": note} if rows else None


def epoch_overhead(name: str, batch: int, mode: Mode, device: str, steps: int, threads: int):
    """Seconds of `steps` bare training steps on one batch, and of an engine.train_epoch of
    as many batches from data.Batches (uint8 images on the device, cropped, flipped and
    normalised there, metrics summed): the best of four alternated rounds of each, under
    train.py's process-wide settings (engine.process_settings)."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    with engine.process_settings(device):
        model, opt, scaler, x, y = measuring.prepare(name, batch, mode, device)
        net = torch.compile(model, mode=mode.compile) if mode.compile else model
        g = torch.Generator().manual_seed(0)
        shape = (steps * batch, *x.shape[1:])
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (steps * batch,), generator=g)
        split = data.Split(images, labels).to(device)
        batches = data.Batches(split, batch, train=True, augment=True, crop_pad=4, flip=True,
                               mean=[0.5] * 3, std=[0.25] * 3, channels_last=mode.channels_last)  # fmt: skip
        sums = torch.zeros(4, device=device)
        bare, whole = best_of_rounds(
            device,
            lambda: [engine.train_step(net, opt, scaler, x, y, mode.amp) for _ in range(steps)],
            lambda: engine.train_epoch(net, opt, scaler, batches, sums, amp=mode.amp, top5=False),
        )
    return {"steps": steps, "bare_s": bare, "epoch_s": whole, "share_outside": 1 - bare / whole}


def best_of_rounds(device: torch.device, *runs: Callable[[], object]) -> list[float]:
    """The least seconds of each run over four rounds, runs alternated, after one round
    that warms them up (compiles, tunes)."""
    timings = [[] for _ in runs]
    for i in range(5):
        for run, times in zip(runs, timings, strict=True):
            measuring.sync(device)
            start = time.perf_counter()
            run()
            measuring.sync(device)
            if i:
                times.append(time.perf_counter() - start)
    return [min(t) for t in timings]


def part_overhead(check: Check) -> dict | None:
    """4. The share of an epoch spent outside the model step, in train.py's default mode."""
    s, args, mode = check.sizes, check.args, default_mode(check.device)
    need = check.row_cost("modes", mode)
    if not check.fits("overhead", need):
        return None
    job = (s.cifar, s.batch, mode, args.device, s.overhead_steps, args.threads)
    try:
        result = measuring.call_fresh(epoch_overhead, job, timeout=check.timeout("overhead", need))
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


def run_train(cmd: list[str], folder: Path, deadline: float,
              stop: Callable[[list[dict], float], bool] | None = None) -> dict:  # fmt: skip
    """Run train.py until it ends or the deadline (then SIGTERM: it saves and exits), or
    until stop(the log's rows, seconds so far) says so. Exit code, seconds, signal."""
    folder.mkdir(parents=True, exist_ok=True)
    start, sent = time.monotonic(), None
    with (folder / "output.txt").open("a") as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None:
            time.sleep(0.05)
            seconds = time.monotonic() - start
            due = sent is None and stop is not None and stop(read_log(folder / "log.csv"), seconds)
            if sent is None and (due or time.monotonic() > deadline):
                sent = "requested" if due else "deadline"
                proc.send_signal(signal.SIGTERM)
    return {"exit": proc.returncode, "seconds": time.monotonic() - start, "sigterm": sent}


def train_costs(check: Check) -> tuple[float, float]:
    """Guessed seconds of train.py's start (besides its epochs) and of one epoch: from
    part 1's img/s in train.py's default mode (else 1000), never below EPOCH_GUESS."""
    mode, kind = default_mode(check.device), check.device.type
    measured = check.results["parts"].get("modes", {}).get("records", [])
    speed = next((r["img_per_s"] for r in measured if r["mode"] == "default"), 1000)
    train_images, test_images = check.images
    # 28x28 images are 0.77 of the 32x32 ones part 1 measured; evaluation is ~3x faster
    epoch_s = 0.77 * (train_images + test_images / 3) / speed + 1
    return TRAIN_START_GUESS[kind][mode.compile is not None], max(epoch_s, EPOCH_GUESS[kind])


def train_epochs(check: Check) -> tuple[int, bool]:
    """(epochs, whether to stop and resume): as many epochs as the time left holds, with
    a second start where the resume was planned and still fits; (0, False): none fits."""
    start_s, epoch_s = train_costs(check)
    # the last part (the resume runs inside it): all the time left, less the 5 s by which
    # the SIGTERM at the deadline comes early
    check.part_end = check.end - 5
    wall = check.part_end - time.monotonic()
    resume = check.need.pop("resume", None) is not None
    if resume and 2 * (start_s + epoch_s) > wall:
        check.skip("resume", start_s + epoch_s, wall - start_s - epoch_s)
        resume = False
    if not check.fits("train", start_s + epoch_s):
        return 0, False
    epochs = int((wall - start_s * (1 + resume)) / epoch_s)
    return max(1 + resume, min(check.sizes.max_epochs, epochs)), resume


def part_train(check: Check) -> None:
    """5 and 6. train.py on Fashion-MNIST with the paper's recipe, sized to the budget:
    final-epoch test error and wall time; with the resume part, SIGTERM halfway (where the
    second start still fits, as long as the first one took), then --resume."""
    args, s = check.args, check.sizes
    epochs, resume = train_epochs(check)
    if not epochs:
        return
    folder = args.save / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "fashion-mnist",
           "--data-dir", args.data_dir, "--save", str(folder), "--epochs", str(epochs),
           "--batch-size", str(s.train_batch), "--device", args.device, "--no-plot",
           *s.train_flags]  # fmt: skip
    go = None  # whether the resumed run fits: decided once, when the stop is due

    def stop(rows: list[dict], seconds: float) -> bool:
        nonlocal go
        if resume and go is None and len(rows) >= epochs // 2:
            took = sum(r["seconds"] for r in rows)  # the logged epochs' training seconds
            go = check.fits("resume", seconds - took + (epochs - len(rows)) * took / len(rows))
        return bool(go)

    first = run_train(cmd, folder, check.end - 5, stop)
    runs = [first]
    if first["sigterm"] == "requested" and first["exit"] == SIGTERM_EXIT:
        check.save("resume", {"stop": first, "note": "stopped; the resumed run has not ended"})
        runs.append(run_train([*cmd, "--resume"], folder, check.end - 5))
    rows = read_log(folder / "log.csv")
    done = [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1)) and runs[-1]["exit"] == 0
    check.save("train", {
        "train_command": shlex.join(["python", "train.py", *cmd[2:]]), "epochs": epochs,
        "finished": done, "test_err": rows[-1]["test_err"] if rows else None,
        "wall_s": sum(r["seconds"] for r in runs), "train_s": sum(r["seconds"] for r in rows),
        "runs": runs, "rows": rows,
        "target": "for comparison, the recipe's 40 epochs on all 60,000 images: 5.19% test error "
                  "(results/fashion-mnist/densenet-bc-100-12); the public benchmark's DenseNet-BC "
                  "768K: 4.64% after 100 cosine epochs (zalandoresearch/fashion-mnist#10); this "
                  "run is shorter, the recipe's schedule compressed into its epochs",
    })  # fmt: skip
    if len(runs) == 2:
        saved = first["exit"] == SIGTERM_EXIT and (folder / "latest.pt").exists()
        said = [ln for ln in (folder / "output.txt").read_text().splitlines() if "signal" in ln]
        check.save("resume", {"stop": first, "resumed": runs[1], "stopped_and_saved": saved,
                              "stop_message": said[:1], "continued_to_the_end": done})  # fmt: skip
    elif resume and go is not False:
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
                f"process peak {measuring.mib(r.get('abs_peak_bytes'))} MiB")  # fmt: skip
            lines.append(f"| {part} | {r['model']} {r['mode']} | {r['settings']} "
                         f"| {r['img_per_s']:.1f} | {measuring.mib(r['peak_mem_bytes'])} | {result} |")  # fmt: skip
        for r in p.get("peers", []):
            lines.append(f"| {part} | ours / {r['peer']} | {r['settings']} | | "
                         f"| {r['speed_ratio']:.2f}x img/s, {measuring.num(r['mem_ratio'])}x memory |")  # fmt: skip
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
                   help=f"which parts, of {' '.join(PARTS)} (default all; resume includes train)")
    p.add_argument("--device", default="auto",
                   help="auto (the GPU; refused without one), cuda:N, or cpu to run it on the CPU")
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
    args = p.parse_args(argv)
    device = measuring.select_device(args.device)
    if args.device == "auto" and device.type != "cuda":
        why = engine.cuda_unusable_reason() or f"torch {torch.__version__} is built without CUDA"
        raise UserError(f"--gpu-check: no usable GPU here ({why}); --device cpu runs it on the CPU")
    if args.budget <= 0:
        raise UserError(f"--budget {args.budget:g}: give the seconds the check may take")
    args.device = str(device)
    args.parts = [p for p in PARTS if p in args.parts or (p == "train" and "resume" in args.parts)]
    return args


def run(argv: list[str]) -> int:
    """bench.py --gpu-check: plan the budget, run the planned parts in order, then print the
    table."""
    args = parse_args(argv)
    device = torch.device(args.device)
    machine = measuring.machine_info(device, args.threads, ["--gpu-check", *argv])
    name = f"gpu-check-{measuring.device_kind(machine['device'])}.json"
    out = files.output(args.out or ROOT / "results" / name, "--out", default_name=name).path
    check = Check(args, out, machine)
    check.plan(args.parts, args.budget)
    steps = {"modes": part_modes, "memory": part_memory, "peers": part_peers,
             "overhead": part_overhead}  # fmt: skip
    for part in PARTS:
        if part not in check.need or not check.start(part):  # resume: inside the training part
            continue
        if part == "train":
            part_train(check)
        else:
            payload = steps[part](check)
            if payload:
                check.save(part, payload)
        check.need.pop(part)
    print(table(check.results))
    print(f"results: {out}; skipped: {', '.join(check.skipped) or 'nothing'}")
    again = [p for p in PARTS if any(x.split()[0] == p for x in check.skipped)]
    if again:
        print(f"to measure what was skipped: python bench.py --gpu-check --parts {' '.join(again)}")
    return 0

