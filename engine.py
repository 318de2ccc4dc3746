"""The training loop's parts, shared by train.py and bench.py: the step, evaluation,
metrics, stop signals, and the run's files (atomic checkpoints, CSV log)."""

import ctypes
import os
import random
import signal
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import densenet


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line for the user."""


def rng_state() -> dict:
    """Every random stream except the data generator (saved at each epoch's start)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            pos,
            has_gauss,
            cached,
        ),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write, mode: str = "wb") -> None:
    """Temp file in the same folder, write(f), fsync, rename: a kill at any instant
    leaves the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_save(obj: object, path: Path) -> None:
    """torch.save, atomically (_atomic_write)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by train.py, or a one-line CheckpointError saying what is wrong."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = densenet.load_file(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(ckpt, dict) or not {"model", "args", "epoch"} <= ckpt.keys():
        raise CheckpointError(
            f"{path} is not a train.py checkpoint (a foreign or raw state_dict?)"
        )
    return ckpt


class Stop:
    """SIGINT/SIGTERM: finish the current step, save, exit 128 + signal number."""

    def __init__(self) -> None:
        self.signum = 0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.request)

    def request(self, signum, frame):
        self.signum = signum

    def now(self, group) -> int:
        """The signal, agreed on by every rank so all stop at the same step."""
        if group is None:
            return self.signum
        flag = torch.tensor([self.signum])
        dist.all_reduce(flag, dist.ReduceOp.MAX, group=group)
        return int(flag)


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse (a no-op elsewhere).

    glibc serves blocks over 32 MiB (a wide layer's fp32 activations at batch 64) with
    mmap and unmaps them on free, so every step page-faults them in afresh: that cost
    fp32 memory_efficient CPU steps 24% (python attic/cpu_step_profile.py).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap, not from mmap
        mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: do not shrink the heap


def metrics(out: torch.Tensor, y: torch.Tensor, top5: bool) -> torch.Tensor:
    """[summed loss, top-1 errors, top-5 errors, count], ignoring label -100 (eval padding)."""
    out = out.float()
    valid = y != -100
    loss = F.cross_entropy(out, y, ignore_index=-100, reduction="sum")
    wrong1 = ((out.argmax(1) != y) & valid).sum()
    wrong5 = wrong1 * 0
    if top5:
        wrong5 = ((out.topk(5, 1).indices != y[:, None]).all(1) & valid).sum()
    return torch.stack([loss, wrong1.float(), wrong5.float(), valid.sum().float()])


def autocast(amp: str, device: torch.device):
    """Mixed precision: "bf16", "fp16" (with a GradScaler) or "off"."""
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum over ranks, so logs equal what one process would log."""
    if world > 1:
        dist.all_reduce(t)
    return t


def summarise(sums: torch.Tensor, prefix: str, top5: bool) -> dict:
    loss, wrong1, wrong5, n = sums.tolist()
    row = {f"{prefix}_loss": loss / n, f"{prefix}_err": 100 * wrong1 / n}
    if top5:
        row[f"{prefix}_top5"] = 100 * wrong5 / n
    return row


def train_step(model, opt, scaler, x: torch.Tensor, y: torch.Tensor, amp: str):
    """One SGD step; returns the detached logits (metrics stay on the device)."""
    with autocast(amp, x.device):
        out = model(x)
        loss = F.cross_entropy(out, y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return out.detach()


@torch.no_grad()
def evaluate(model, batches, amp: str, top5: bool, world: int = 1) -> torch.Tensor:
    """Summed metrics over an evaluation split (every rank's shard, reduced)."""
    model.eval()
    sums = None
    for x, y in batches.epoch():
        with autocast(amp, x.device):
            # ten crops: average the softmax over crops (paper Table 3)
            if x.dim() == 5:
                probs = model(x.flatten(0, 1)).float().softmax(1)
                out = probs.view(*x.shape[:2], -1).mean(1).clamp_min(1e-12).log()
            else:
                out = model(x)
        batch = metrics(out, y, top5)
        sums = batch if sums is None else sums + batch
    return reduce(sums, world)


def train_epoch(model, opt, scaler, batches, sums, *, amp: str, top5: bool, start: int = 0,
                stop: Stop | None = None, group=None, progress: bool = False):  # fmt: skip
    """Steps start.. of this epoch; returns (sums, steps done, signal number or 0).

    Metrics accumulate on the device; the host syncs only for the progress bar."""
    model.train()
    bar = tqdm(total=len(batches), initial=start, leave=False, disable=not progress)
    step, signum, t0 = start, 0, time.perf_counter()
    for x, y in batches.epoch(start):
        out = train_step(model, opt, scaler, x, y, amp)
        sums += metrics(out, y, top5)
        step += 1
        bar.update()
        if progress and step % 50 == 0:
            loss, wrong, _, n = sums.tolist()
            rate = (step - start) * len(x) / (time.perf_counter() - t0)
            bar.set_postfix(
                loss=f"{loss / n:.3f}",
                err=f"{100 * wrong / n:.2f}",
                img_s=f"{rate:.0f}",
            )
        signum = stop.now(group) if stop else 0
        if signum:
            break
    bar.close()
    return sums, step, signum


def trim_log(path: Path, epochs_done: int) -> None:
    """Drop log rows past the checkpoint (a kill between the log write and the save)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        keep = lines[:1] + [
            ln for ln in lines[1:] if int(ln.split(",")[0]) <= epochs_done
        ]
        if keep != lines:
            _atomic_write(path, lambda f: f.writelines(keep), mode="w")


def append_row(path: Path, row: dict) -> None:
    """One whole line per write, flushed: pandas can read the log at any moment."""
    header = "" if path.exists() else ",".join(row) + "\n"
    values = ",".join(
        f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()
    )
    with path.open("a") as f:
        f.write(header + values + "\n")
