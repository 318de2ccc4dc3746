#!/usr/bin/env python3
"""Train DenseNet (or DiracNet) with the paper's recipe; stop at any moment and resume exactly.

./train.py                                   # DenseNet-BC-100-12 on CIFAR-10+, as in the paper
./train.py --dataset fashion-mnist --depth 40 --growth 12 --epochs 10
./train.py --resume                          # continue work/cifar10.densenet-bc-100-12
torchrun --nproc_per_node 4 train.py --dataset imagenet --data-dir /data/imagenet

The number to compare with the paper is the closing line's final test error (the paper
reports the error after the last epoch); best.pt is chosen on held-out training images only
(--val-split, or SVHN's validation set), never on the test set.
"""

import csv
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import densenet
import diracnet
from training import building, data, engine, files, paper, recipes, runstate
from training.engine import USER_ERRORS, Placement, on_rank0
from training.errors import UserError
from training.figures import Background
from training.settings import (
    FIXED_ON_RESUME,
    IDENTITY,
    INVOCATION,
    Settings,
    host,
    parse_args,
    resolve,
    run_folder,
    run_name,
)

# ----------------------------------------------------------------------------- run files


def start_or_resume(given: dict, save: Path) -> dict | None:
    """The checkpoint to continue from, or None; refuses to touch an existing run otherwise."""
    latest = save / "latest.pt"
    if "resume" not in given:
        if latest.exists() or (save / "log.csv").exists():
            raise UserError(f"{save} already holds a run: pass --resume to continue it, or --save another folder")
        return None
    ckpt = runstate.load_checkpoint(latest)
    old = ckpt["args"]
    differ = [k for k in IDENTITY if k in given and given[k] != old.get(k, recipes.COMMON.get(k))]
    if differ:
        what = ", ".join(f"--{k.replace('_', '-')} {given[k]} (checkpoint: {old.get(k)})" for k in differ)
        raise UserError(f"--resume: {latest} is a different run: {what}")
    return ckpt


def resumed_changes(given: dict, settings: Settings, ckpt: dict) -> list[dict]:
    """The flags typed with --resume that change the run, each from the checkpoint's epoch
    and step on; refuses, in one line, those a resumed run cannot honour."""
    old, epoch, step = ckpt["args"], ckpt["epoch"], ckpt["step"]
    typed = [k for k in given if k not in INVOCATION and vars(settings)[k] != old.get(k)]
    for k in typed:
        why = FIXED_ON_RESUME.get(k)
        if why is None and k == "batch_size" and step:
            why = f"the checkpoint is {step} batches into epoch {epoch + 1} (it can change at an epoch's start)"
        if why:
            raise UserError(f"--resume: --{k.replace('_', '-')} {given[k]} (checkpoint: {old.get(k)}) cannot change: {why}")
    at_least = epoch + (step > 0)
    if settings.epochs < at_least:
        done = f"{epoch} epochs" + " and part of the next" * (step > 0)
        raise UserError(f"--resume: --epochs {settings.epochs}: the checkpoint has done {done}; "
                        f"give at least {at_least}")  # fmt: skip
    now = vars(settings)
    return [{"epoch": epoch + 1, "step": step, "flag": k, "from": old.get(k), "to": now[k]} for k in typed]


def change_line(change: dict) -> str:
    """A change as the console says it, e.g. "--lr 0.1 -> 0.01 from epoch 7"."""
    when = f"epoch {change['epoch']}" + (f", step {change['step'] + 1}" if change["step"] else "")
    return f"--{change['flag'].replace('_', '-')} {change['from']} -> {change['to']} from {when}"


def schedule_line(ckpt: dict, state: runstate.RunState, drops: list[int]) -> str | None:
    """The lr in effect and the drops, where the settings differ from the checkpoint's."""
    was, now = ckpt["optimizer"]["param_groups"][0]["lr"], state.optimizer.param_groups[0]["lr"]
    old = ckpt["args"].get("lr_drops", drops)  # as that run ran them (args.json)
    said = [f"lr {was:g} -> {now:g} from epoch {state.epoch + 1}"] * (now != was)
    if old != drops:
        epochs = lambda ds: ", ".join(str(d + 1) for d in ds) or "none"
        said.append(f"the lr drops at the start of epochs {epochs(drops)} (were {epochs(old)})")
    return "; ".join(said) or None


class Reporter:
    """Rank 0's outputs: the console, args.json, log.csv, TensorBoard and the figures."""

    def __init__(self, save: Path, settings: Settings, place: Placement,
                 state: runstate.RunState) -> None:  # fmt: skip
        """Repair log.csv to the checkpoint's epochs (a warning line says what changed) and
        write args.json."""
        self.save, self.on = save, place.rank == 0
        self.tty = self.on and sys.stderr.isatty()
        self.args = vars(settings)
        self.writer = None
        if self.on:
            state.log, repaired = runstate.repair_log(save / "log.csv", state.epoch, state.log)
            if repaired:
                print(f"warning: {repaired}", file=sys.stderr)
            meta = {"torch": torch.__version__, "device": str(place.device),
                    "world_size": place.world, "host": host(), **paper.record(self.args)}  # fmt: skip
            files.write_text(save / "args.json", json.dumps({**self.args, **meta}, indent=2) + "\n")
            self.writer = tensorboard(save) if settings.tensorboard else None
        self.figures = Background(save, enabled=settings.plot and self.on)

    def say(self, line: str) -> None:
        if self.on:
            print(line, flush=True)

    def epoch(self, row: dict) -> None:
        """One epoch's row: log.csv, the console, TensorBoard, then the figures."""
        if self.on:
            runstate.append_row(self.save / "log.csv", row)
            self.say(" ".join(f"{k} {v:.4g}" for k, v in row.items()))
            if self.writer:
                for k, v in row.items():
                    self.writer.add_scalar(k, v, row["epoch"])
                self.writer.flush()
        self.figures.refresh()


def tensorboard(save: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs tensorboard: pip install tensorboard") from None
    return SummaryWriter(save / "tb")


def reported(save: Path, settings: dict) -> str:
    """The closing line: the final epoch's test error (the paper's number) and, with a
    validation split, the epoch best.pt holds and its test error; for a paper configuration
    the paper's figure beside the one it compares with (paper.lookup)."""
    with (save / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    last, found = rows[-1], paper.lookup(settings)
    at_final = f"; {found.text()}" if found and found.reported == "final" else ""
    at_best = f" ({found.text()})" if found and found.reported == "best_val" else ""
    line = f"final test error {float(last['test_err']):.2f}% (epoch {last['epoch']}{at_final})"
    if "test_top5" in last:
        top5 = f" (paper {found.test_top5:.2f}%)" if found and found.test_top5 is not None else ""
        line += f", top-5 {float(last['test_top5']):.2f}%{top5}"
    if "val_err" in last:
        best = min(rows, key=lambda r: float(r["val_err"]))
        line += (f"; best.pt: epoch {best['epoch']}, lowest validation error "
                 f"{float(best['val_err']):.2f}%, its test error {float(best['test_err']):.2f}%{at_best}")  # fmt: skip
    return line


# ----------------------------------------------------------------------------- the loop


def logs_top5(settings: Settings, num_classes: int) -> bool:
    """Top-5 errors for 100+ classes, and always for ImageNet (the paper's metric)."""
    return num_classes >= 100 or settings.dataset == "imagenet"


def fit(settings: Settings, state: runstate.RunState, model: nn.Module, train: data.BatchSource,
        evals: dict, out: Reporter, stop: engine.Stop, place: Placement, top5: bool) -> int:  # fmt: skip
    """The epoch loop; returns 0, or 128 + signal number after saving a stopped run."""
    save, world = Path(settings.save), place.world
    group = dist.new_group(backend="gloo") if world > 1 else None  # stop votes, on the CPU
    while state.epoch < settings.epochs:
        # Train: the rest of this epoch (all of it unless resumed mid-epoch).
        lr = state.epoch_lr()
        t0 = time.perf_counter()
        state.sums, state.step, signum = engine.train_epoch(
            model, state.optimizer, state.scaler, train, state.sums, amp=settings.amp, top5=top5,
            start=state.step, stop=stop, group=group, progress=out.tty,
            scheduler=state.scheduler if state.per_step else None,
        )  # fmt: skip
        state.seconds += time.perf_counter() - t0
        if not torch.isfinite(state.sums[0]):
            kept = save / "latest.pt"
            kept = f"{kept} holds the last good state" if kept.exists() else "nothing was saved"
            raise UserError(f"the training loss became non-finite in epoch {state.epoch + 1}; {kept} (try a lower --lr)")
        if signum:
            state.save([save / "latest.pt"], out.args)
            out.say(f"stopped by signal {signum} in epoch {state.epoch + 1} after step {state.step}; "
                    f"saved {save / 'latest.pt'}. Resume with the same command and --resume")  # fmt: skip
            return 128 + signum
        # Evaluate on every held-out split.
        row = {"epoch": state.epoch + 1, "lr": lr}
        row |= engine.summarise(engine.reduce(state.sums, world), "train", top5)
        for name, batches in evals.items():
            row |= engine.summarise(engine.evaluate(model, batches, settings.amp, top5, world), name, top5)
        row["seconds"] = state.seconds
        # Schedule the next epoch's lr (a per-step schedule stepped in train_epoch);
        # DiracNet's official trainer makes a new optimizer at each drop, which restarts momentum.
        if not state.per_step:
            state.scheduler.step()
        if settings.restart_momentum and state.optimizer.param_groups[0]["lr"] != lr:
            state.optimizer.state.clear()
        # Select on validation error only, never on test error.
        improved = "val_err" in row and row["val_err"] < state.best
        state.best = min(state.best, row.get("val_err", state.best))
        state.next_epoch(row)
        out.epoch(row)
        state.save([save / "latest.pt"] + [save / "best.pt"] * improved, out.args)
    out.figures.finish()
    return 0


# ----------------------------------------------------------------------------- commands


def configure(given: dict, place: Placement) -> tuple:
    """(settings, notes, checkpoint or None): the flags, the recipe, the device and a
    resumed run's settings, resolved once; settings.changes lists the flags changed on each
    --resume, with the epoch they took effect."""
    save = run_folder(given)
    ckpt = on_rank0(place, lambda: start_or_resume(given, save))
    settings, notes = resolve(given, recipes.probe(place.device), ckpt and ckpt["args"])
    changes = resumed_changes(given, settings, ckpt) if ckpt else []
    settings.changes = [*(ckpt["args"].get("changes", []) if ckpt else []), *changes]
    return settings, notes + [change_line(c) for c in changes], ckpt


def claim(save: Path, place: Placement) -> files.RunLock | None:
    """Rank 0 makes the run folder and locks it for this process, before anything in it is
    read or written; a folder in use is refused in one line naming the process using it."""
    lock = None

    def take() -> None:
        nonlocal lock
        lock = files.RunLock(save, "--save")

    on_rank0(place, take)
    if lock and not lock.exclusive:
        print("warning: no file locking here (fcntl): nothing stops a second process writing this run",
              file=sys.stderr)  # fmt: skip
    return lock


def build(settings: Settings, place: Placement, ckpt: dict | None, notes: list[str]) -> tuple:
    """(state, model, info, training batches, evaluation batches): the model is built and
    checked before any data is read. A CPU run too short to pay back compiling is not
    compiled (a note says so)."""
    torch.manual_seed(settings.seed + place.rank)  # dropout differs per rank; data draws are shared
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    small = data.DATASETS.get(settings.dataset)  # ImageNet counts its classes in the data
    built = building.model_and_optimizer(settings, small, place.device) if small else None
    data.check_folder(Path(settings.data_dir))
    info, train_batches, evals = building.build_data(settings, place)
    net, opt = built or building.model_and_optimizer(settings, info, place.device)
    sched = building.build_scheduler(settings, opt, len(train_batches))
    scaler = torch.amp.GradScaler(place.device.type, enabled=settings.amp == "fp16")
    per_step = len(train_batches) if settings.schedule in recipes.PER_STEP else 0
    state = runstate.RunState(net, opt, sched, scaler, train_batches.generator, place.rank,
                              place.world, per_step=per_step)  # fmt: skip
    settings.lr_drops = [] if per_step else sorted(sched.milestones.elements())  # as it runs
    if ckpt is not None:
        state.load_state_dict(ckpt)
        notes += filter(None, [schedule_line(ckpt, state, settings.lr_drops)])
    steps_left = len(train_batches) * (settings.epochs - state.epoch) - state.step
    if settings.compile and not recipes.compile_pays(settings, place.device.type, steps_left):
        settings.compile = False
        notes.append(f"compile off: {steps_left} training steps left are too few to pay back "
                     f"compiling on the CPU (--compile compiles anyway)")  # fmt: skip
    return state, building.wrap(settings, place, state, train_batches), info, train_batches, evals


def train(given: dict, place: Placement) -> int:
    """claim the run folder → configure → build → restore → fit → finish; a refusal before
    the run starts leaves the folder as it was."""
    for flag in ("export", "pretrained"):
        if flag in given:
            raise UserError(f"--{flag} goes with --evaluate")
    lock = claim(run_folder(given), place)
    try:
        return run_in_folder(given, place, lock)
    finally:
        if lock:
            lock.release()


def run_in_folder(given: dict, place: Placement, lock: files.RunLock | None) -> int:
    """The run in a claimed folder; from the first write on, the folder is this run's."""
    settings, notes, ckpt = configure(given, place)
    with engine.process_settings(place.device, settings.deterministic) as stop:
        state, model, info, train_batches, evals = build(settings, place, ckpt, notes)
        if lock:
            lock.keep()
        out = Reporter(Path(settings.save), settings, place, state)
        for note in notes:
            out.say(f"note: {note}")
        params = sum(p.numel() for p in state.model.parameters())
        compiled = settings.compile_mode if settings.compile else "off"
        out.say(f"{settings.save}: {run_name(vars(settings))} on {settings.dataset}, "
                f"{params:,} parameters, {place.device} x{place.world}, amp {settings.amp}, "
                f"channels_last {'on' if settings.channels_last else 'off'}, compile {compiled}, "
                f"epoch {state.epoch + 1} of {settings.epochs}")  # fmt: skip
        top5 = logs_top5(settings, info.num_classes)
        code = fit(settings, state, model, train_batches, evals, out, stop, place, top5)
    if code == 0 and place.rank == 0:  # the log is on rank 0's machine
        out.say(reported(Path(settings.save), vars(settings)))
    return code


def evaluate(given: dict, place: Placement) -> int:
    """--evaluate: loss and error of a checkpoint (or torchvision weights) on each held-out
    split; --export also writes the folded DiracNet (its path made ready before any work)."""
    if not given["evaluate"] and "pretrained" not in given:
        raise UserError("--evaluate needs a CHECKPOINT, or --pretrained FILE")
    ckpt = None
    if "pretrained" in given:
        if given.get("dataset") != "imagenet":
            raise UserError("--pretrained takes torchvision ImageNet weights: add --dataset imagenet")
        settings, _ = resolve(given, recipes.probe(place.device))
    else:  # a locked run may be read: its checkpoints are replaced atomically
        ckpt = runstate.load_checkpoint(given["evaluate"])
        # the run's model, and its data: the same held-out images, batches that fit
        kept = (*IDENTITY, "val_split", "seed", "train_subset", "batch_size")
        old = {k: v for k, v in ckpt["args"].items() if k in kept}
        settings, _ = resolve(given, recipes.probe(place.device), old)
    if "export" not in given:
        return evaluate_net(settings, place, ckpt)
    if settings.model != "diracnet":
        raise UserError("--export folds a DiracNet; this network is a DenseNet")
    target = on_rank0(place, lambda: files.output(given["export"], "--export"))
    try:
        return evaluate_net(settings, place, ckpt, target.path)
    except BaseException:
        if place.rank == 0:
            target.undo()
        raise


def evaluate_net(settings: Settings, place: Placement, ckpt: dict | None,
                 export_to: Path | None = None) -> int:  # fmt: skip
    """Build the network, load the checkpoint (or --pretrained), print each split's row;
    then write the folded DiracNet to export_to."""
    info, _, evals = building.build_data(settings, place)
    net = building.build_model(settings, info, place.device)
    try:
        if ckpt is None:
            densenet.load_torchvision_state_dict(net, runstate.load_file(settings.pretrained))
        else:
            net.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:
        source = settings.pretrained if ckpt is None else settings.evaluate
        raise UserError(f"{source}: {str(e).splitlines()[0]}") from None
    top5 = logs_top5(settings, info.num_classes)
    for name, batches in evals.items():
        row = engine.summarise(engine.evaluate(net, batches, settings.amp, top5, place.world), name, top5)
        if place.rank == 0:
            print(" ".join(f"{k} {v:.4f}" for k, v in row.items()))
    if export_to and place.rank == 0:
        export(settings, net, info, export_to)
    return 0


def export(settings: Settings, net: nn.Module, info: data.DatasetInfo, path: Path) -> None:
    """Write the folded DiracNet and print how to rebuild it."""
    folded = diracnet.fold(net.float().cpu().eval())
    version = "" if settings.dirac_version == 2 else ", version=1"
    if settings.dataset == "imagenet":
        builder = f"{settings.arch}(num_classes={info.num_classes}{version})"
    else:
        builder = (f"diracnet_cifar({settings.depth}, {settings.width:g}, {info.num_classes}, "
                   f"{info.in_channels}{version})")  # fmt: skip
    rebuild = f"net = diracnet.fold(diracnet.{builder}); net.load_state_dict(torch.load(path)['state_dict'])"
    runstate.atomic_save({"state_dict": folded.state_dict(), "rebuild": rebuild}, path)
    print(f"wrote the folded network to {path}; rebuild with: {rebuild}")


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user error is one line on stderr (exit 2; 1 for data)."""
    try:
        given = parse_args(argv, __doc__)
        place = engine.setup_distributed(given.get("device", "auto"))
        code = evaluate(given, place) if "evaluate" in given else train(given, place)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1 if isinstance(e, data.DataError) else 2
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
