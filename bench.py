#!/usr/bin/env python3
"""Training throughput and memory of DenseNet: naive fp32 against each fast path, and the
DenseNets users already have (torchvision's, timm's) beside ours in the same modes.

    python bench.py                        # DenseNet-BC-100-12 on CPU; four models on CUDA
    python bench.py --models densenet121   # with torchvision's (and timm's) densenet121
    python bench.py --quick --models tiny  # a small DenseNet-BC in seconds (tests run this)
    python bench.py --gpu-check            # the GPU check (benchmarks/gpucheck.py)

Each mode (row) runs in a fresh process, so no row inherits another's caches, compiled
code or memory high-water mark. img/s is the batch over the median step after warm-up.
"""

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks import gpucheck, measuring
from benchmarks.measuring import MODELS, PEER_OF, Mode, Row, mib, num, ratio
from training import files

ROOT = Path(__file__).resolve().parent
OURS = [name for name in MODELS if name not in PEER_OF]
CPU_MODELS = ["densenet-bc-100-12"]
CUDA_MODELS = [name for name in OURS if name != "tiny"]


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


def model_modes(name: str, device_type: str, cpu_compile: bool = False) -> list[Mode]:
    """modes(), plus naive with plain per-layer BN for our models when densenet.py has both."""
    out = modes(device_type, cpu_compile)
    if name in OURS and device_type == "cpu":
        out.insert(1, Mode("naive-shared-stats", shared_stats=True))
    return out


def efficient_mode(rows: list[Row]) -> Mode:
    """memory_efficient=True with the settings of the fastest measured row."""
    fastest = max(rows, key=lambda r: r.img_per_s).mode
    return replace(fastest, name="memory_efficient", memory_efficient=True)


def after_first_round(name: str, rows: list[Row]) -> list[Mode]:
    """Rows added once the first round's speed modes are measured: memory_efficient with
    the fastest one's settings and with naive's (the cost at equal precision), and the
    fastest eager one with shared batch statistics where they are measured."""
    speed = [r for r in rows if not r.mode.shared_stats]
    naive = replace(speed[0].mode, name="memory_efficient-naive", memory_efficient=True)
    out = [efficient_mode(speed[1:] or speed), naive]
    if any(r.mode.shared_stats for r in rows):
        eager = [r for r in speed[1:] if r.mode.compile is None] or speed
        fastest = max(eager, key=lambda r: r.img_per_s).mode
        out.append(replace(fastest, name=f"{fastest.name}-shared-stats", shared_stats=True))
    return out


def measure_into(m: str, mode: Mode, i: int, args: argparse.Namespace, batch: int,
                 plan: dict, times: dict, mems: dict) -> None:  # fmt: skip
    """Measure one row in a fresh process and keep its step times and peak memory. A
    failing row (a compile error, say) is dropped; a peer whose naive row fails is dropped
    whole; our own naive row failing stops the bench."""
    job = (m, batch, mode, args.device, args.warmup, args.steps, args.threads, args.size)
    try:
        step_times, mem, _ = measuring.call_fresh(measuring.measure, job)
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


def chosen(mode: Mode, args: argparse.Namespace) -> bool:
    """Whether --modes keeps this row (naive always: the speedups are against it)."""
    return args.modes is None or mode.name in args.modes or mode.name == "naive"


def bench_model(name: str, batch: int, args: argparse.Namespace, device_name: str) -> list:
    """Every mode of one model and of its peers (the same modes, interleaved), in args.rounds
    rounds: background load hits every row alike."""
    device_type = torch.device(args.device).type
    group = [name] + (measuring.peers(name) if args.peers else [])
    plan = {
        m: [x for x in model_modes(m, device_type, args.cpu_compile) if chosen(x, args)] for m in group
    }
    times, mems, extra = {}, {}, []

    def rows(m: str) -> list[Row]:
        return [measuring.summarise(mode, batch, times[m, mode], mems[m, mode]) for mode in plan[m]]

    for i in range(args.rounds):
        pending = list(plan[name])
        while pending:
            for mode, m in [(mode, m) for mode in pending for m in list(plan)]:
                if mode in plan.get(m, ()):
                    measure_into(m, mode, i, args, batch, plan, times, mems)
            pending = []
            if not extra:  # the first round's speed modes are done
                extra = pending = [x for x in after_first_round(name, rows(name)) if chosen(x, args)]
                for m in plan:
                    plan[m] += [e for e in extra if m == name or not e.shared_stats]
    records = []
    for m in plan:
        measured, flops = rows(m), measuring.flops_per_img(m, batch, args.size)
        for r in measured:
            peak = measuring.peak_flops(device_name, r.mode.amp, args.threads)
            records.append(measuring.record(m, batch, r, measured[0], flops, peak))
    return records


# ---------------------------------------------------------------------------- report


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
        elif r["settings"].endswith(", shared stats"):
            plain = by[r["model"], r["settings"].removesuffix(", shared stats")]
            lines.append(
                f"\n{r['model']}: shared BN statistics against plain per-layer BN "
                f"({plain['settings']}): {r['img_per_s'] / plain['img_per_s']:.2f}x img/s."
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
    lines += peer_table(measuring.peer_ratios(records)) + notes(records)
    if m.get("memory_note_cpu"):
        lines.append(f"\n{m['memory_note_cpu']}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- command line


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
    p.add_argument("--device", default="auto", help="auto (cuda where usable), cpu, cuda:N")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads (default: all cores; 1 on a machine others are using)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="also torch.compile on CPU (slow to compile on few cores)")
    p.add_argument("--out", type=Path,
                   help="JSON file or folder (default results/bench-<device>.json)")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table here")
    p.add_argument("--gpu-check", action="store_true",
                   help="run the GPU check instead (its options: bench.py --gpu-check --help)")
    # fmt: on
    args = p.parse_args(argv)
    args.device = str(measuring.select_device(args.device))
    cuda = args.device.startswith("cuda")
    args.models = args.models or (CUDA_MODELS if cuda else CPU_MODELS)
    defaults = (1, 3, 10) if args.quick else (1, 15, 50) if cuda else (3, 3, 8)
    for key, value in zip(("rounds", "warmup", "steps"), defaults, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the median and quartiles need them)")
    return args


def run(argv: list[str]) -> int:
    """The bench: check the outputs, measure every model, write JSON and the table."""
    args = parse_args(argv)
    device = torch.device(args.device)
    machine = measuring.machine_info(device, args.threads, argv)
    machine.update(rounds=args.rounds, warmup=args.warmup, steps=args.steps)
    name = f"bench-{measuring.device_kind(machine['device'])}"
    out = files.output(
        args.out or ROOT / "results" / f"{name}.json", "--out", default_name=f"{name}.json"
    ).path
    table_file = (
        args.markdown and files.output(args.markdown, "--markdown", default_name=f"{name}.md").path
    )
    if machine["memory_note_cpu"]:
        print(f"note: {machine['memory_note_cpu']}", file=sys.stderr)
    records = []
    for model in args.models:  # written after each model: a stopped run keeps what it measured
        records += bench_model(model, args.batch or MODELS[model][2], args, machine["device"])
        result = {"machine": machine, "records": records, "peers": measuring.peer_ratios(records)}
        files.write_text(out, json.dumps(result, indent=2) + "\n")
    table = markdown(machine, records)
    print(table)
    if table_file:
        files.write_text(table_file, table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The bench, or with --gpu-check the GPU check (benchmarks/gpucheck.py); a user's error
    is one line."""
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu-check" in argv:
        return measuring.command(gpucheck.run, [x for x in argv if x != "--gpu-check"])
    return measuring.command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
