"""The training loop's parts, shared by train.py and the measuring code: the device a run
uses and its place among torchrun's processes, the process-wide settings of a run, the step,
evaluation, metrics, stop signals and compiling with an eager fallback."""

import copy
import ctypes
import itertools
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training import data, files, runstate
from training.errors import UserError

# One process writes the progress bar: a thread lock, not tqdm's default multiprocessing
# semaphore, which a measuring child process (measuring.call_fresh) leaves behind at exit.
tqdm.set_lock(threading.RLock())

# glibc's mallopt parameters, and the defaults that process_settings restores.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
GLIBC_TRIM_THRESHOLD, GLIBC_MMAP_MAX = 128 * 1024, 65536
# Under torchrun the ranks agree on a stop every this many steps (and at each epoch's
# end): a blocking vote every step would stall every step on the slowest rank.
STOP_VOTE_EVERY = 25
# cuBLAS needs this before its first call to pick deterministic kernels.
CUBLAS_DETERMINISTIC = ":4096:8"
# The failures a user can cause: one line each, never a traceback.
USER_ERRORS = (UserError, data.DataError, runstate.CheckpointError, files.OutputError)


def _mallopt():
    """glibc's mallopt, or None (Windows, macOS, musl): there the setting is skipped."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):
        return None


def keep_freed_memory(keep: bool = True) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (keep=False: its defaults back).

    glibc serves blocks over 32 MiB (a wide layer's fp32 activations at batch 64) with
    mmap and unmaps them on free, so every step page-faults them in afresh: that cost
    fp32 memory_efficient CPU steps 24% (python attic/cpu_step_profile.py). Returns
    whether the setting could be made.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mallopt(M_MMAP_MAX, 0 if keep else GLIBC_MMAP_MAX)  # serve large blocks from the heap
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1 if keep else GLIBC_TRIM_THRESHOLD)  # never shrink it
    return True


# ----------------------------------------------------------------------------- devices


def cuda_unusable_reason() -> str | None:
    """Why a CUDA build of torch cannot use a GPU here, as torch says it; None when it can
    or when this torch has no CUDA."""
    if torch.version.cuda is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # is_available() warns about old drivers
        if torch.cuda.is_available():
            return None
        try:
            torch.cuda.init()
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError or AssertionError
            return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return "torch.cuda.is_available() is False"


def either(names: list[str]) -> str:
    """"a, b or c"."""
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def select_device(flag: str, world: int = 1, local_rank: int = 0, program: str = "train.py",
                  runs_on: tuple[str, ...] = ("cuda", "mps", "cpu")) -> torch.device:  # fmt: skip
    """The device --device names; auto: the first usable of runs_on (CUDA, then MPS, then
    the CPU). Under torchrun each process takes cuda:LOCAL_RANK. Bad flags: UserError."""
    if flag == "auto":
        if "cuda" in runs_on and torch.cuda.is_available():
            return torch.device("cuda", local_rank if world > 1 else 0)
        mps = "mps" in runs_on and torch.backends.mps.is_available()
        return torch.device("mps" if mps and world == 1 else "cpu")
    kinds = sorted(runs_on)
    try:
        device = torch.device(flag)
    except RuntimeError:
        names = sorted([*runs_on, *["cuda:N"] * ("cuda" in runs_on)])
        raise UserError(f"--device {flag}: expected {either(['auto', *names])}") from None
    if device.type not in runs_on:
        raise UserError(f"--device {flag}: {program} runs on {either(kinds)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {flag}: no usable CUDA device ({cuda_unusable_reason()})")
        if world > 1 and device.index is not None:
            raise UserError(f"--device {flag}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda")
        index = local_rank if world > 1 else device.index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {flag}: this machine has {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", index)
    if device.type == "mps" and (world > 1 or not torch.backends.mps.is_available()):
        why = "torchrun needs cuda or cpu" if world > 1 else "MPS is not available here"
        raise UserError(f"--device {flag}: {why}")
    return device


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its rank among world processes, and its device."""

    rank: int
    world: int
    device: torch.device


def setup_distributed(flag: str) -> Placement:
    """One process per GPU under torchrun (NCCL), or per CPU process (gloo)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(flag, world, int(os.environ.get("LOCAL_RANK", "0")))
    reason = flag == "auto" and device.type == "cpu" and rank == 0 and cuda_unusable_reason()
    if reason:
        print(f"warning: this torch is built for CUDA {torch.version.cuda} but can use no GPU "
              f"({reason}); training on the CPU", file=sys.stderr)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Placement(rank, world, device)


def on_rank0(place: Placement, decide: Callable[[], object]) -> object:
    """decide() on rank 0, its result (or its user error) sent to every rank, so no rank hangs."""
    if place.world == 1:
        return decide()
    box = [None]
    if place.rank == 0:
        try:
            box = [decide()]
        except USER_ERRORS as e:
            box = [type(e)(str(e))]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], USER_ERRORS):
        raise box[0]
    return box[0]


# ----------------------------------------------------------------------------- settings


class Stop:
    """SIGINT/SIGTERM: finish the current step, save, exit 128 + signal number."""

    def __init__(self) -> None:
        self.signum = 0

    def request(self, signum: int, frame: object) -> None:
        self.signum = signum

    def now(self, group: dist.ProcessGroup | None, step: int, last: bool) -> int:
        """The signal, agreed on by every rank so all stop at the same step; the ranks vote
        every STOP_VOTE_EVERY steps and at the epoch's last step."""
        if group is None:
            return self.signum
        if step % STOP_VOTE_EVERY and not last:
            return 0
        flag = torch.tensor([self.signum])
        dist.all_reduce(flag, dist.ReduceOp.MAX, group=group)
        return int(flag)


@contextmanager
def process_settings(device: torch.device, deterministic: bool = False) -> Iterator[Stop]:
    """Set the process-wide state a run needs and restore it afterwards: SIGINT/SIGTERM
    request a Stop; denormals flush to zero; on the CPU glibc keeps freed memory; cuDNN
    autotunes unless deterministic, which also asks for deterministic kernels."""
    stop, signals = Stop(), (signal.SIGINT, signal.SIGTERM)
    handlers = {s: signal.signal(s, stop.request) for s in signals}
    # Denormal floats (tiny weights and gradients late in training, common with bf16) send
    # CPU kernels down a path ~50x slower; flushing them to zero costs no accuracy.
    torch.set_flush_denormal(True)
    kept = device.type == "cpu" and keep_freed_memory()
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    algorithms = torch.are_deterministic_algorithms_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
        torch.use_deterministic_algorithms(True)
    try:
        yield stop
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_flush_denormal(False)
        if kept:
            keep_freed_memory(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        torch.use_deterministic_algorithms(algorithms)
        if deterministic and cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# ----------------------------------------------------------------------------- metrics


def metrics(out: torch.Tensor, y: torch.Tensor, top5: bool) -> torch.Tensor:
    """[summed loss, top-1 errors, top-5 errors, count], ignoring evaluation padding."""
    out = out.float()
    valid = y != data.IGNORE_LABEL
    loss = F.cross_entropy(out, y, ignore_index=data.IGNORE_LABEL, reduction="sum")
    wrong1 = ((out.argmax(1) != y) & valid).sum()
    wrong5 = wrong1 * 0
    if top5:
        wrong5 = ((out.topk(5, 1).indices != y[:, None]).all(1) & valid).sum()
    return torch.stack([loss, wrong1.float(), wrong5.float(), valid.sum().float()])


def reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum over ranks, so logs equal what one process would log."""
    if world > 1:
        dist.all_reduce(t)
    return t


def summarise(sums: torch.Tensor, prefix: str, top5: bool) -> dict:
    """Mean loss and error rates (%) from summed metrics: one host sync."""
    loss, wrong1, wrong5, n = sums.tolist()
    row = {f"{prefix}_loss": loss / n, f"{prefix}_err": 100 * wrong1 / n}
    if top5:
        row[f"{prefix}_top5"] = 100 * wrong5 / n
    return row


# ----------------------------------------------------------------------------- steps


def autocast(amp: str, device: torch.device):
    """Mixed precision: "bf16", "fp16" (with a GradScaler) or "off"."""
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def train_step(model, opt, scaler, x: torch.Tensor, y: torch.Tensor, amp: str) -> torch.Tensor:
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
def evaluate(model, batches: data.BatchSource, amp: str, top5: bool, world: int = 1) -> torch.Tensor:
    """Summed metrics over an evaluation split (every rank's shard, reduced)."""
    model.eval()
    sums = None
    for x, y in batches.epoch():
        with autocast(amp, x.device):
            out = model(x.flatten(0, 1) if x.dim() == 5 else x)
        if x.dim() == 5:
            # Ten crops: fb.resnet.torch (the authors' code) sums the logits over the crops
            # (train.lua computeScore); their mean ranks the classes the same way and keeps
            # the loss on the single-crop scale.
            out = out.float().view(*x.shape[:2], -1).mean(1)
        batch = metrics(out, y, top5)
        sums = batch if sums is None else sums + batch
    return reduce(sums, world)


def train_epoch(model, opt, scaler, batches: data.BatchSource, sums: torch.Tensor, *,
                amp: str, top5: bool, start: int = 0, stop: Stop | None = None,
                group: dist.ProcessGroup | None = None, progress: bool = False,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None):  # fmt: skip
    """Steps start.. of this epoch; returns (sums, steps done, signal number or 0). A
    scheduler given is stepped after every step (a per-step lr schedule).

    Metrics accumulate on the device; the host syncs only for the progress bar."""
    model.train()
    bar = tqdm(total=len(batches), initial=start, leave=False, disable=not progress)
    step, signum, t0 = start, 0, time.perf_counter()
    for x, y in batches.epoch(start):
        out = train_step(model, opt, scaler, x, y, amp)
        if scheduler is not None:
            scheduler.step()
        sums += metrics(out, y, top5)
        step += 1
        bar.update()
        if progress and step % 50 == 0:
            loss, wrong, _, n = sums.tolist()
            rate = (step - start) * len(x) / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss / n:.3f}", err=f"{100 * wrong / n:.2f}", img_s=f"{rate:.0f}")
        signum = stop.now(group, step, last=step == len(batches)) if stop else 0
        if signum:
            break
    bar.close()
    return sums, step, signum


# ----------------------------------------------------------------------------- compile


@contextmanager
def leaves_no_trace(net: nn.Module, train: data.BatchSource, opt=None) -> Iterator[None]:
    """Whatever runs inside leaves the run as it was: net's weights and buffers, its
    gradients, the optimizer's state, every random stream and the data generator."""
    saved, rng = copy.deepcopy(net.state_dict()), runstate.rng_state()
    drawn = train.generator.get_state()
    opt_saved = copy.deepcopy(opt.state_dict()) if opt is not None else None
    try:
        yield
    finally:
        net.load_state_dict(saved)
        net.zero_grad(set_to_none=True)
        if opt is not None:
            opt.load_state_dict(opt_saved)
        runstate.set_rng_state(rng)
        train.generator.set_state(drawn)


def compile_or_eager(model: nn.Module, net: nn.Module, mode: str, train: data.BatchSource,
                     amp: str, world: int = 1) -> tuple[nn.Module, str | None]:  # fmt: skip
    """torch.compile(model), tried on one training and one evaluation batch before the
    run; if compiling fails (no Triton, an unsupported GPU, a Dynamo error) the eager
    model and the reason, in one line. The trial leaves no trace (leaves_no_trace)."""
    compiled = torch.compile(model, mode=mode)
    failure = None
    with leaves_no_trace(net, train):
        x, y = next(iter(train.epoch()))
        try:
            with model.no_sync() if world > 1 else nullcontext():
                compiled.train()
                with autocast(amp, x.device):
                    F.cross_entropy(compiled(x), y).backward()
                compiled.eval()
                with torch.no_grad(), autocast(amp, x.device):
                    compiled(x)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            failure = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    if world > 1:  # every rank runs the same way
        flag = torch.tensor([failure is not None], dtype=torch.int32)
        dist.all_reduce(flag, group=dist.new_group(backend="gloo"))
        failure = failure or ("failed on another rank" if flag.item() else None)
    return (model, failure) if failure else (compiled, None)


def step_times(models: dict[str, nn.Module], net: nn.Module, opt, scaler,
               train: data.BatchSource, amp: str, steps: int,
               warmup: int = 1) -> dict[str, list[float]]:  # fmt: skip
    """Seconds of `steps` whole training steps (train_step) of each model, after `warmup`
    untimed ones, on the run's first batches: rounds interleave the models, each round
    one batch for all. net is the module the models share; the run is left as it was
    (leaves_no_trace), so it goes on bit for bit as if nothing had been timed."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with leaves_no_trace(net, train, opt):
        batches = itertools.cycle(itertools.islice(train.epoch(), warmup + steps))
        for i in range(warmup + steps):
            x, y = next(batches)
            for name, model in models.items():
                model.train()
                t0 = time.perf_counter()
                train_step(model, opt, scaler, x, y, amp)
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return times
