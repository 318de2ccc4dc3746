"""What a run keeps: RunState (everything a checkpoint holds, with state_dict() and
load_state_dict()), the checkpoint file format, every random stream and the CSV log.
Files are replaced atomically (files.atomic_write): a kill at any instant leaves each old
or new, never half-written."""

import math
import pickle
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from training import files

# Version 2 added "format" and the MPS random state; version 1 (no "format" key, written
# before 2026-12) holds the same fields otherwise, so both are read. The log's rows ("log")
# came later in version 2 (2026-12); a checkpoint without them resumes too.
FORMAT = 2
READS = (1, 2)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line for the user."""


# ----------------------------------------------------------------------- random streams


def rng_state() -> dict:
    """Every random stream of this process except the data generator's."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# ----------------------------------------------------------------------------- files


def atomic_save(obj: object, path: Path) -> None:
    """torch.save, atomically (files.atomic_write)."""
    files.atomic_write(path, lambda f: torch.save(obj, f))


# What torch.load(weights_only=True) names when a file asks to import or call a global.
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_OS_MODULES = {"posix": "os", "nt": "os"}  # os.system pickles as posix.system or nt.system


def _refused_global(e: Exception) -> str | None:
    """The global a weights-only load refused (e.g. "os.system"), else None (a file that is
    not a pickle at all fails the same way, with "Unsupported operand", and is corrupt)."""
    if not isinstance(e, pickle.UnpicklingError) or "Weights only load failed" not in str(e):
        return None
    match = _GLOBAL.search(str(e))
    if not match:
        return None
    module, _, name = match.group(1).rpartition(".")
    return f"{_OS_MODULES.get(module, module or 'builtins')}.{name}"


def load_file(path: str | Path) -> object:
    """torch.load(weights_only=True) on the CPU; an unreadable file is a one-line ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for bad files
        refused = _refused_global(e)
        if refused is not None:
            raise ValueError(
                f"cannot read {path}: refused because it asks to import or call something "
                f"that is not plain data ({refused})"
            ) from None
        # torch's weights-only message puts the unpickler's own words after its advice
        text = str(e).split("WeightsUnpickler error:")[-1]
        reason = (text.strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"cannot read {path}: truncated or corrupt ({reason})") from None


def load_checkpoint(path: str | Path) -> dict:
    """A train.py checkpoint, or a one-line CheckpointError saying what is wrong."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = load_file(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(ckpt, dict) or not {"model", "args", "epoch"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a train.py checkpoint (a foreign or raw state_dict?)")
    version = ckpt.get("format", 1)
    if version not in READS:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}; this train.py reads formats "
            f"{', '.join(map(str, READS))} (was it written by a newer version?)"
        )
    return ckpt


def log_line(row: dict) -> str:
    """A log.csv line of one epoch's row."""
    return ",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()) + "\n"


def append_row(path: Path, row: dict) -> None:
    """One whole line per write, flushed: pandas can read the log at any moment."""
    header = "" if path.exists() and path.stat().st_size else ",".join(row) + "\n"
    with path.open("a") as f:
        f.write(header + log_line(row))


def _parse_row(line: str, header: list[str]) -> dict | None:
    """A log line's row, or None unless it has the header's fields, all numbers."""
    fields = line.rstrip("\n").split(",")
    try:
        row = {k: float(v) for k, v in zip(header, fields, strict=True)}
        row["epoch"] = int(fields[0])
    except ValueError:
        return None
    return row


def read_log(data: bytes) -> tuple[dict[int, dict], list[str]]:
    """The rows of log.csv's bytes that parse, by epoch, and what each other line is: a cut
    last line, bytes that are not UTF-8, a line that does not parse, a repeated epoch."""
    *lines, tail = data.split(b"\n")
    dropped = ["a cut last line"] * bool(tail)
    try:
        header = lines[0].decode().split(",") if lines else []
    except UnicodeDecodeError:
        header = []
    if header[:1] != ["epoch"]:
        return {}, dropped + [f"{len(lines)} lines under an unreadable header"] * bool(lines)
    rows: dict[int, dict] = {}
    for raw in lines[1:]:
        try:
            row = _parse_row(raw.decode(), header)
        except UnicodeDecodeError:
            dropped.append("a line that is not UTF-8")
            continue
        if row is None or row["epoch"] < 1:
            dropped.append(f"an unreadable line ({raw.decode()[:40]!r})")
        elif row["epoch"] in rows:
            dropped.append(f"a second row of epoch {row['epoch']}")
        else:
            rows[row["epoch"]] = row
    return rows, dropped


def repair_log(path: Path, epochs_done: int, kept: list[dict]) -> tuple[list[dict], str | None]:
    """Rewrite log.csv, atomically, to one row for each of epochs 1..epochs_done and nothing
    else: the checkpoint's rows (`kept`, when it holds them all; older checkpoints keep
    none), else the file's rows that parse. Returns the rows the log now holds, and a line
    saying what was dropped or restored (None when the file was right)."""
    old = path.read_bytes() if path.exists() else b""
    found, dropped = read_log(old)
    past = [e for e in found if e > epochs_done]
    if past:
        dropped.append(f"the rows of epochs {_listed(past)} (past the checkpoint)")
    whole = list(range(1, epochs_done + 1))
    if [row.get("epoch") if isinstance(row, dict) else None for row in kept] != whole:
        kept = [found[e] for e in whole if e in found]
    lines = [log_line(row) for row in kept]
    new = "".join([",".join(kept[0]) + "\n", *lines]).encode() if kept else b""
    if new == old:
        return kept, None
    files.atomic_write(path, lambda f: f.write(new))
    restored = [row["epoch"] for row, line in zip(kept, lines, strict=True)
                if row["epoch"] not in found or log_line(found[row["epoch"]]) != line]  # fmt: skip
    missing = sorted(set(whole) - {row["epoch"] for row in kept})
    said = [f"dropped {', '.join(dropped)}"] * bool(dropped)
    said += [f"restored epochs {_listed(restored)} from the checkpoint"] * bool(restored)
    said += [f"epochs {_listed(missing)} have no row (the checkpoint keeps none)"] * bool(missing)
    what = "; ".join(said) or "its header rewritten"
    return kept, f"{path} repaired to the checkpoint's {epochs_done} epochs: {what}"


def _listed(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs))


# ----------------------------------------------------------------------------- state


@dataclass
class RunState:
    """Everything that a resumed run needs to continue bit for bit: the only owner of
    the model's weights, the optimizer, the schedule, the counters and the random streams.

    Under torchrun state_dict() is collective: every rank's RNG and metric sums are kept.
    """

    model: nn.Module  # unwrapped (no DDP, no torch.compile)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data_generator: torch.Generator  # draws each training epoch's order and augmentation
    rank: int = 0
    world: int = 1
    epoch: int = 0  # epochs done
    step: int = 0  # steps done in the current epoch
    best: float = math.inf  # lowest validation error so far (inf without validation)
    seconds: float = 0.0  # training time of the current epoch
    sums: torch.Tensor = field(default=None)  # this epoch's metric sums (engine.metrics)
    data_rng: torch.Tensor = field(default=None)  # data_generator's state at epoch start
    log: list[dict] = field(default_factory=list)  # log.csv's rows of the epochs done
    per_step: int = 0  # training steps an epoch where the scheduler steps every step, else 0

    def __post_init__(self) -> None:
        self.sums = self.zero_sums()
        self.data_rng = self.data_generator.get_state()

    def zero_sums(self) -> torch.Tensor:
        return torch.zeros(4, device=next(self.model.parameters()).device)

    def next_epoch(self, row: dict) -> None:
        """The current epoch is done with this log row: counters and sums start again."""
        self.log.append(row)
        self.epoch, self.step, self.seconds = self.epoch + 1, 0, 0.0
        self.sums = self.zero_sums()
        self.data_rng = self.data_generator.get_state()

    def epoch_lr(self) -> float:
        """The lr of the current epoch's first step (log.csv's lr column), also when resumed
        in the middle of a per-step schedule's epoch."""
        if not self.per_step:
            return self.optimizer.param_groups[0]["lr"]
        first = self.epoch * self.per_step
        return self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](first)

    def state_dict(self) -> dict:
        """The checkpoint's contents (collective under torchrun)."""
        ranks = [{"rng": rng_state(), "sums": self.sums.cpu()}] * self.world
        if self.world > 1:
            dist.all_gather_object(ranks, ranks[0])
        return {
            "format": FORMAT, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
            "best": self.best, "seconds": self.seconds, "ranks": ranks, "data_rng": self.data_rng,
            "log": self.log,
        }  # fmt: skip

    def load_state_dict(self, ckpt: dict) -> None:
        """Continue from a checkpoint; with another world size, rank 0 takes the metric
        totals and every rank the first rank's random streams. The optimizer keeps the
        hyperparameters and the scheduler the schedule it was built with (this run's
        settings), replayed to the checkpoint's epoch; the checkpoint gives their state."""
        self.model.load_state_dict(ckpt["model"])
        self._load_optimizer(ckpt["optimizer"]["state"], ckpt["optimizer"]["param_groups"])
        with warnings.catch_warnings():  # stepped without optimizer steps, on purpose
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            steps = ckpt["epoch"] * self.per_step + ckpt["step"] if self.per_step else ckpt["epoch"]
            for _ in range(steps):
                self.scheduler.step()  # the lr exactly as a run never stopped computes it
        if ckpt["scaler"]:  # empty from a run without fp16: this one starts its scaler afresh
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.best, self.seconds = ckpt["best"], ckpt["seconds"]
        self.log = list(ckpt.get("log", []))  # older checkpoints keep none
        ranks = ckpt["ranks"]
        same_world = len(ranks) == self.world
        set_rng_state(ranks[self.rank if same_world else 0]["rng"])
        device = self.sums.device
        if same_world:
            self.sums = ranks[self.rank]["sums"].to(device)
        else:
            self.sums = sum(r["sums"] for r in ranks).to(device) * (self.rank == 0)
        self.data_rng = ckpt["data_rng"]
        self.data_generator.set_state(self.data_rng)

    def _load_optimizer(self, state: dict, saved_groups: list[dict]) -> None:
        """The checkpoint's per-parameter state (momentum buffers) under this optimizer's
        own param groups and hyperparameters."""
        groups = self.optimizer.state_dict()["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
            raise CheckpointError("the checkpoint's optimizer does not fit this model's parameters")
        # saved_groups number the parameters in the same order as this optimizer's groups
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def save(self, paths: list[Path], args: dict) -> None:
        """Write the checkpoint to each path (rank 0 writes; every rank must call this)."""
        state = {**self.state_dict(), "args": args}
        if self.rank == 0:
            for path in paths:
                try:
                    atomic_save(state, path)
                except OSError as e:  # the folder removed or the disk full mid-run
                    raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
