"""The fast paths and process settings a train.py run takes: compiling (and its eager
fallback), the device, glibc's malloc, determinism and shared statistics, each recorded in
args.json."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_train import ROOT, TINY, assert_same_run, mnist_run, run, subprocess_train

import densenet
import sharedstats
import synthetic
from training import building, data, engine, recipes
from training.errors import UserError
from training.settings import resolve

FREE_A_BLOCK = """
import os, sys, torch
from training import engine
if sys.argv[1] == "keep":
    engine.keep_freed_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = torch.ones(2**26)  # 256 MiB, touched
before = rss()
del x
print(before - rss())
"""


@pytest.mark.parametrize("mode", ["default", "keep"])
def test_keep_freed_memory_keeps_large_blocks_for_reuse(mode):
    """By default glibc unmaps a freed 256 MiB block (its pages fault in again on reuse);
    after keep_freed_memory() it stays in the heap."""
    done = subprocess.run(
        [sys.executable, "-c", FREE_A_BLOCK, mode], cwd=ROOT, capture_output=True,
        text=True, timeout=300, check=True,
    )  # fmt: skip
    released = int(done.stdout)
    if mode == "keep":
        assert released < 2**20
    else:
        assert released > 200 * 2**20


def test_the_run_records_its_fast_paths(tmp_path, capsys):
    argv, save = mnist_run(tmp_path)
    code, out, _ = run([*argv, "--epochs", 1], capsys)
    caps = recipes.probe(torch.device("cpu"))
    amp = recipes.device_defaults(caps)["amp"]
    args = json.loads((save / "args.json").read_text())
    assert code == 0 and args["amp"] == amp and args["channels_last"] is True
    assert f"amp {amp}, channels_last on, compile off" in out


def test_devices():
    assert engine.select_device("auto", 1, 0) == torch.device("cpu")  # no GPU, no MPS here
    assert engine.select_device("cpu", 2, 1) == torch.device("cpu")
    for flag, message in [("foo", "expected auto, cpu"), ("cuda", "no usable CUDA"),
                          ("mps", "MPS is not available"), ("meta", "runs on cpu, cuda or mps")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            engine.select_device(flag, 1, 0)
    with pytest.raises(UserError, match="torchrun needs cuda or cpu"):
        engine.select_device("mps", 2, 0)


def test_a_cuda_build_without_a_gpu_says_why():
    # Host-dependent by design: the one-line reason exists only on a CUDA build of torch
    # without a usable GPU (as CI's); elsewhere the first assertion is the whole test.
    reason = engine.cuda_unusable_reason()
    assert (reason is None) == (torch.version.cuda is None or torch.cuda.is_available())
    if reason is not None:
        assert "\n" not in reason and reason


def test_a_failing_compiler_falls_back_to_eager_losing_nothing(tmp_path):
    """A C++ compiler that does not exist makes torch.compile fail on its first graph: the
    run warns once and then trains exactly as an eager run does."""
    argv, _ = mnist_run(tmp_path)
    argv = [*argv, "--epochs", "1", "--drop-rate", "0.1"]
    eager = subprocess_train([*argv, "--save", str(tmp_path / "eager")])
    assert eager.wait(timeout=300) == 0
    env = {
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
    }
    broken = subprocess_train([*argv, "--save", str(tmp_path / "broken"), "--compile"], env)
    _, err = broken.communicate(timeout=600)
    assert broken.returncode == 0, err
    assert err.count("warning: torch.compile failed, training eagerly") == 1, err
    assert_same_run(tmp_path / "eager", tmp_path / "broken")


def test_deterministic_flag_reaches_the_process_and_is_restored(tmp_path, capsys):
    argv, save = mnist_run(tmp_path)
    assert run([*argv, "--epochs", 1, "--deterministic"], capsys)[0] == 0
    assert json.loads((save / "args.json").read_text())["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    with engine.process_settings(torch.device("cpu"), deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic


WITHOUT_MALLOPT = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import train  # torch and torchvision load their libraries with ctypes first
def no_libc(*args, **kwargs):  # as on Windows, where CDLL(None) raises TypeError
    raise TypeError("expected str, bytes or os.PathLike object, not NoneType")
ctypes.CDLL = no_libc
sys.exit(train.main(sys.argv[2:]))
"""


def test_training_runs_where_glibc_mallopt_is_missing(tmp_path):
    argv, save = mnist_run(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_MALLOPT, str(ROOT), *argv, "--epochs", "1"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(save / "log.csv")) == 1
    assert engine.keep_freed_memory(False) == sys.platform.startswith("linux")


def test_shared_stats_flag_converts_the_model_and_is_recorded(tmp_path, capsys):
    """--shared-stats builds the converted model (its numbers are test_sharedstats.py's),
    --no-shared-stats the plain one, and args.json says which ran."""
    argv, _ = mnist_run(tmp_path)
    for flag in ("--shared-stats", "--no-shared-stats"):
        save = tmp_path / flag
        assert run([*argv, "--epochs", 1, flag, "--save", save], capsys)[0] == 0
        args = json.loads((save / "args.json").read_text())
        assert args["shared_stats"] == (flag == "--shared-stats") and not args["compile"]
        settings, _ = resolve(
            {"shared_stats": args["shared_stats"]}, recipes.Capabilities("cpu", False, True)
        )
        net = building.build_model(settings, data.DATASETS["mnist"], torch.device("cpu"))
        blocks = [m for m in net.modules() if isinstance(m, densenet._DenseBlock)]
        assert blocks and all(
            isinstance(b, sharedstats.SharedStatsBlock) == args["shared_stats"]
            for b in blocks
        )


def tiny_training(seed: int = 0):
    """A DenseNet with dropout, SGD with momentum and augmented batches: every piece of
    state that timing steps could disturb."""
    torch.manual_seed(seed)
    net = densenet.densenet_cifar(10, 4, drop_rate=0.2, num_classes=10, in_channels=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    split = data.Split(torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8, generator=g),
                             torch.randint(0, 10, (96,), generator=g))  # fmt: skip
    batches = data.Batches(split, 32, train=True, augment=True, crop_pad=2, flip=True)
    return net, opt, torch.amp.GradScaler("cpu", enabled=False), batches


def test_timing_steps_leaves_the_run_bit_for_bit_as_it_was():
    """Two runs from one seed, one with a step in, then timed steps (more than an epoch's
    batches, so the epoch's draws repeat), then both go on: the same weights, momentum,
    random streams and batches, bit for bit."""
    runs, rng = [tiny_training(), tiny_training()], []
    for i, (net, opt, scaler, batches) in enumerate(runs):
        torch.manual_seed(1)  # each run's dropout draws from the same stream
        x, y = next(iter(batches.epoch()))
        engine.train_step(net, opt, scaler, x, y, "off")  # momentum buffers exist
        if i == 1:
            times = engine.step_times({"a": net, "b": net}, net, opt, scaler, batches, "off", 4)
            assert [len(t) for t in times.values()] == [4, 4] and all(
                t > 0 for ts in times.values() for t in ts
            )
        sums = torch.zeros(4)
        engine.train_epoch(net, opt, scaler, batches, sums, amp="off", top5=False)
        rng.append(torch.get_rng_state())
    (a, opt_a, *_, ba), (b, opt_b, *_, bb) = runs
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"])
    assert torch.equal(*rng)
    assert torch.equal(ba.generator.get_state(), bb.generator.get_state())


def test_the_cpu_times_compiling_records_the_choice_and_never_recompiles(tmp_path):
    """One cold compile of a tiny model serves two checks; Inductor's cache carries its
    kernels from the first run to the others.
    1. A real decision: over CPU_COMPILE_MIN_STEPS steps, compiling not typed, the run
       compiles, times 5 steps each way, says what it chose in one line and records the
       figures; its first epoch is bit for bit that of a run given the chosen mode.
    2. A run given --compile recompiles nothing after epoch 1: the last training batch is
       dropped and evaluation pads its last batch, so the only compilations are epoch 1's
       train and eval graphs; TORCH_LOGS reports any other."""
    # 100 training images and 40 test images: partial last batches on both sides (batch 32)
    synthetic.make_mnist(tmp_path / "data", "mnist", n_train=100, n_test=40)
    argv = ["--dataset", "mnist", "--data-dir", str(tmp_path / "data"), *TINY]
    epochs = str(-(-recipes.CPU_COMPILE_MIN_STEPS // 3))  # 3 steps an epoch
    cache = tmp_path / "inductor"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache)}

    def first_epoch(save: Path, *extra: str) -> str:
        proc = subprocess_train([*argv, "--save", str(save), "--epochs", epochs, *extra], env)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch 1 lr"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + signal.SIGTERM, err
        return "".join(lines)

    save = tmp_path / "run"
    out = first_epoch(save)
    # Inductor built kernels: the trial compiled for real
    assert any(cache.rglob("*.so")), sorted(p.name for p in cache.rglob("*"))
    args = json.loads((save / "args.json").read_text())
    choice = args["compile_measured"]
    assert args["compile"] is choice["compile"] is (choice["speedup"] >= recipes.COMPILE_MARGIN)
    assert choice["speedup"] == pytest.approx(choice["eager_step_s"] / choice["compiled_step_s"])
    # timing_s spans the timed steps: at least 3 of each 5 are as long as their median
    assert choice["timing_s"] >= 3 * (choice["eager_step_s"] + choice["compiled_step_s"])
    assert recipes.compile_line(choice) + "\n" in out and "compiled the model in" in out
    assert f"compile {'default' if choice['compile'] else 'off'}, epoch 1 of {epochs}" in out
    ref = tmp_path / "ref"
    first_epoch(ref, "--compile" if choice["compile"] else "--no-compile")
    logs = [pd.read_csv(d / "log.csv").drop(columns="seconds").head(1) for d in (save, ref)]
    pd.testing.assert_frame_equal(*logs, check_exact=True)

    cmd = [sys.executable, str(ROOT / "train.py"), *argv, "--save", str(tmp_path / "compiled"),
           "--epochs", "3", "--compile"]  # fmt: skip
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **env, "TORCH_LOGS": "recompiles"}, timeout=600,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout
    # It compiled: no eager fallback (which never recompiles)
    assert "torch.compile failed" not in done.stdout and "compiled the model in" in done.stdout
    after_first_epoch = done.stdout.split("epoch 1 lr", 1)[1]
    assert "epoch 3 lr" in after_first_epoch and "Recompiling" not in after_first_epoch
