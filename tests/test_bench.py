"""bench.py: a quick run writes the promised JSON; every fast path trains like the reference;
FLOP counts match independent formulas. Numerical checks only, no timings."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bench
import reference
import synthetic
from benchmarks import gpucheck, measuring
from training import building

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"model", "batch", "mode", "img_per_s", "peak_mem_bytes", "speedup_vs_naive",
        "mem_vs_naive", "flops_per_img"}  # fmt: skip
CPU = torch.device("cpu")


def run_bench(args: list, env: dict | None = None, timeout: int = 900):
    """bench.py in a subprocess on one CPU thread, as a user runs it."""
    cmd = [sys.executable, "bench.py", "--device", "cpu", "--threads", "1", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def test_quick_run_writes_json_and_table(tmp_path: Path):
    table = tmp_path / "bench.md"
    # --out a folder: the usual file name inside it
    done = run_bench(["--quick", "--models", "tiny", "--out", tmp_path, "--markdown", table])
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "bench-cpu.json").read_text())
    machine, records = result["machine"], result["records"]
    assert {"device", "cpu", "cores", "torch", "date", "command", "peak_flops",
            "memory_measure"} <= machine.keys()  # fmt: skip
    assert machine["device"] == "cpu" and machine["command"].startswith("python bench.py")
    names = [r["mode"] for r in records]
    speed = ["naive", "naive-shared-stats", "+channels_last", "+amp"]
    extra = ["memory_efficient", "memory_efficient-naive"]
    assert names[: len(speed) + 2] == speed + extra and len(names) == len(speed) + 3
    for r in records:
        assert r.keys() >= KEYS
        assert r["model"] == "tiny" and r["batch"] == 16
        for key in KEYS - {"model", "batch", "mode"}:
            assert r[key] > 0, (r["mode"], key)
        assert 0 < r["frac_of_peak"] < 1
    assert records[0]["speedup_vs_naive"] == 1 and records[0]["mem_vs_naive"] == 1
    efficient = records[len(speed)]["settings"]
    assert efficient.endswith(", memory_efficient")
    assert records[len(speed) + 1]["settings"] == "NCHW, fp32, eager, memory_efficient"
    text = table.read_text()
    assert text.startswith("`python bench.py --device cpu") and "| tiny | 16 | naive |" in text
    assert text in done.stdout
    # the fastest eager mode again with shared batch statistics, and its ratio in the table
    assert records[1]["settings"] == "NCHW, fp32, eager, shared stats"
    shared = records[-1]["settings"]
    assert shared == efficient.replace("memory_efficient", "shared stats")
    fastest = next(r["mode"] for r in records if r["settings"] == shared[: -len(", shared stats")])
    assert records[-1]["mode"] == f"{fastest}-shared-stats"
    assert "shared BN statistics against plain per-layer BN (NCHW, fp32, eager)" in text


def test_peers_beside_ours_and_no_resource_module(tmp_path: Path):
    """torchvision's densenet121 in the same modes as ours, with our ratio to it; on a
    platform without the resource module (Windows, simulated) it still measures, memory
    marked unmeasured in one line."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['resource'] = None\n")
    out = tmp_path / "bench.json"
    args = ["--quick", "--warmup", "1", "--steps", "2", "--models", "densenet121", "--size",
            "64", "--batch", "2", "--modes", "naive", "memory_efficient", "--out", out]  # fmt: skip
    done = run_bench(args, env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    assert f"note: {measuring.NO_CPU_MEMORY}" in done.stderr.splitlines()
    result = json.loads(out.read_text())
    rows = {(r["model"], r["mode"]): r for r in result["records"]}
    peers = measuring.peers("densenet121")
    assert set(rows) == {(m, mode) for m in ["densenet121", *peers]
                         for mode in ("naive", "memory_efficient")}  # fmt: skip
    assert all(r["img_per_s"] > 0 and r["peak_mem_bytes"] is None for r in rows.values())
    ratios = {(r["peer"], r["mode"]): r for r in result["peers"]}
    assert set(ratios) == {(p, mode) for p in peers for mode in ("naive", "memory_efficient")}
    for (peer, mode), r in ratios.items():
        ours, theirs = rows["densenet121", mode], rows[peer, mode]
        assert r["speed_ratio"] == ours["img_per_s"] / theirs["img_per_s"]
        assert r["mem_ratio"] is None
    assert result["machine"]["memory_measure"] == measuring.NO_CPU_MEMORY
    assert "| densenet121 | torchvision-densenet121 | naive | NCHW, fp32, eager |" in done.stdout


@pytest.mark.parametrize("flag", ["--out", "--markdown"])
@pytest.mark.parametrize("where", ["inside a file", "unwritable"])
def test_output_that_cannot_be_written_fails_before_measuring(tmp_path, capsys, flag, where):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    path = blocker / "bench.json" if where == "inside a file" else Path("/proc/bench.json")
    code = bench.main(["--models", "tiny", "--device", "cpu", flag, str(path)])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"bench.py: error: {flag} {path}: cannot write there")
    # refused before measuring: no row's "img/s" line on stderr, no table on stdout
    assert "img/s" not in err and out == ""
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and blocker.read_text() == "x"


REFERENCE = measuring.Mode("naive")
CHANNELS_LAST = measuring.Mode("+channels_last", channels_last=True)
BF16 = measuring.Mode("+amp", channels_last=True, amp="bf16")
EFFICIENT = measuring.Mode("memory_efficient", channels_last=True, memory_efficient=True)
EFFICIENT_BF16 = measuring.Mode("memory_efficient", True, "bf16", memory_efficient=True)
# Not a bench row: bf16 autocast alone, the plain path that the bf16 rows are held to.
PLAIN_BF16 = measuring.Mode("bf16", amp="bf16")
FAST = {"channels_last": CHANNELS_LAST, "bf16": BF16, "memory_efficient": EFFICIENT,
        "memory_efficient-bf16": EFFICIENT_BF16, "plain-bf16": PLAIN_BF16}  # fmt: skip


def fast_paths() -> reference.Comparison:
    """Two train.py steps of the tiny model (measuring.prepare's seeded start and batch, at
    16x16 pixels) in float64, in plain fp32 and in each mode of FAST."""
    _, _, _, x, y = measuring.prepare("tiny", 16, REFERENCE, CPU, size=16)
    recipe = measuring.train_settings(CPU)
    paths = {
        name: reference.Path({"memory_efficient": mode.memory_efficient}, mode.channels_last, mode.amp)
        for name, mode in FAST.items()
    }
    optimizer = lambda model: building.build_optimizer(recipe, model)  # noqa: E731
    return reference.compare(measuring.MODELS["tiny"][0], x, y, 2, paths, optimizer)


@pytest.fixture(scope="module")
def trained() -> reference.Comparison:
    return fast_paths()


# Each path's distance to the float64 run of the same start, batch and steps, as a multiple
# of a plainer path's distance measured alongside on the same host, kernels and threads
# (tests/reference.py says why that holds on any host). The factors:
# - channels_last is plain fp32 through torch's channels_last kernels, whose BatchNorm sums
#   a channel's N*H*W = 2^12 values sequentially where NCHW's sums pairwise: up to
#   sqrt(2^12) = 2^6 times NCHW's rounding (so measured for one BN of this size), the
#   forward's bound; where such a sum cancels (a batch mean near zero, a bias gradient
#   that a later BN removes) NCHW's error sits at its floor, hence 2^10 for the rest.
#   2^2.1 and 2^4.0 seen with AVX-512, AVX2 and scalar kernels, 1 and 2 threads.
# - memory_efficient recomputes what channels_last computes, with its kernels: as close
#   as channels_last is, 4x for two roundings of one computation (2^0.4 seen); so too
#   memory_efficient in bf16 against the bf16 row.
# - bf16 autocast rounds each conv and linear operand to 8 significant bits, so a bf16
#   path is held to plain bf16 (NCHW): they round the same operands, and differ where
#   fp32's differences flip a rounding: 8x (2^1.6 seen) in logits and updates. Not in the
#   loss: a scalar whose bf16 error is a random sum, as likely near zero as not.
# - plain bf16 against plain fp32: at most the quantity's own size (2^23 times fp32's
#   floor, 2^20.6 seen): bf16's rounding moves the body's updates by 20-40 % at
#   initialisation, so a wrong update shows in the head's and in the next loss, below.
BOUNDS = {
    "channels_last": [("fp32", 2**6, (0,), ("loss", "logits")), ("fp32", 2**10, None, reference.KINDS)],
    "memory_efficient": [("channels_last", 4, None, reference.KINDS)],
    "plain-bf16": [("fp32", 2**23, None, reference.KINDS)],
    "bf16": [("plain-bf16", 8, None, ("logits", "update"))],
    "memory_efficient-bf16": [("bf16", 4, None, ("logits", "update")), ("plain-bf16", 8, None, ("logits", "update"))],
}  # fmt: skip


@pytest.mark.parametrize("name", BOUNDS)
def test_fast_path_trains_like_reference(trained, name):
    for baseline, factor, steps, kinds in BOUNDS[name]:
        trained.assert_within(name, factor, baseline, steps, kinds)
    # The second step's loss: the first update went where the float64 one went, and as
    # far. Rounding errors point every way and move it by little (bf16: 1.3 % of the
    # float64 run's decrease at most seen), an update 25 % short by about 25 %.
    losses = trained.reference.losses
    assert losses[1] < losses[0]
    assert trained.paths[name].quantities["step 1 loss"] < 0.05 * (losses[0] - losses[1])


def test_conv_flops_match_the_formula():
    n, cin, cout, h, w, k = 2, 5, 7, 6, 9, 3
    conv = nn.Conv2d(cin, cout, k, padding=1, bias=False)
    x = torch.randn(n, cin, h, w)
    assert measuring.count_flops(lambda: conv(x)) == 2 * k * k * cin * cout * h * w * n


def test_training_step_is_about_three_forwards():
    net, _, _, x, y = measuring.prepare("tiny", 4, REFERENCE, CPU)
    forward = measuring.count_flops(lambda: net(x))
    assert 2.5 * forward < measuring.step_flops(net, x, y) < 3.5 * forward
    assert measuring.flops_per_img("tiny", 4) == measuring.step_flops(net, x, y) / 4


def test_gpu_rows_peaks_and_file_names():
    names = [m.name for m in bench.modes("cuda")]
    assert names == ["naive", "+channels_last", "+amp", "+amp-fp16", "+compile",
                     "+compile-cudagraphs"]  # fmt: skip
    assert [m.name for m in bench.modes("cpu", cpu_compile=True)][-1] == "+compile"
    assert measuring.peak_flops("NVIDIA H100 80GB HBM3", "bf16", 1) == 989e12
    assert measuring.peak_flops("NVIDIA H100 PCIe", "off", 1) == 378e12
    assert measuring.peak_flops("NVIDIA A100-SXM4-80GB", "off", 1) == 156e12
    assert measuring.peak_flops("Some Future GPU", "bf16", 1) is None
    assert measuring.peak_flops("cpu", "bf16", 1) >= measuring.peak_flops("cpu", "off", 1) > 0
    assert measuring.device_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert measuring.device_kind("NVIDIA A100-SXM4-80GB") == "a100"
    assert measuring.device_kind("cpu") == "cpu"


def test_memory_efficient_takes_the_fastest_settings():
    rows = [
        measuring.Row(m, speed, 0.0, 1)
        for m, speed in zip(bench.modes("cuda"), [1, 2, 3, 4, 6, 5], strict=True)
    ]
    chosen = bench.efficient_mode(rows)
    assert chosen == measuring.Mode("memory_efficient", True, "bf16", "default", True)


# ------------------------------------------------------------------------ the GPU check


def test_gpu_check_rows_cover_each_precision_and_compile_mode():
    default = measuring.Mode("default", True, "bf16", "default")
    names = [m.name for m in gpucheck.check_modes(True, default)]
    assert names == ["naive", "default", "bf16-eager", "bf16-reduce-overhead", "fp16-eager",
                     "fp16-default", "fp16-reduce-overhead"]  # fmt: skip
    cpu = gpucheck.check_modes(False, measuring.Mode("default", True, "off"))
    assert [m.settings for m in cpu][:3] == [
        "NCHW, fp32, eager", "channels_last, fp32, eager", "channels_last, bf16, eager"
    ]  # fmt: skip


@pytest.mark.parametrize("args", [["--out", "/proc/check.json"], ["--budget", "0"]])
def test_gpu_check_bad_command_line_is_one_line(capsys, args):
    assert bench.main(["--gpu-check", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bench.py: error: {args[0]} ") and err.count("\n") == 1


def test_bench_device_is_cpu_or_cuda(capsys):
    assert bench.main(["--device", "mps", "--models", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err == "bench.py: error: --device mps: bench.py runs on cpu or cuda\n"


def test_gpu_check_without_a_gpu_refuses_unless_given_the_cpu(tmp_path: Path):
    """No usable GPU (hidden, so on every host): one line naming torch's reason, exit status
    2, nothing written (not the default results file either); --device cpu runs it (below)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    ask = "from training import engine; print(engine.cuda_unusable_reason() or 'built without CUDA')"
    reason = subprocess.run([sys.executable, "-c", ask], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    default_file = ROOT / "results" / "gpu-check-cpu.json"
    assert not default_file.exists()
    cmd = [sys.executable, "bench.py", "--gpu-check", "--tiny", "--budget", "60", "--save", str(tmp_path / "work")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1
    assert done.stderr.startswith("bench.py: error: --gpu-check: no usable GPU here (")
    assert reason in done.stderr and "--device cpu" in done.stderr
    assert not default_file.exists() and list(tmp_path.iterdir()) == []


def test_gpu_check_plan_keeps_first_rows_then_the_training_run(tmp_path: Path, capsys):
    """The budget is planned in gpucheck.PRIORITY order: the first rows of modes, memory and
    peers always, then the training run, the overhead and the resume while they fit; what
    does not fit is skipped at once, each with a line."""
    synthetic.make_mnist(tmp_path, "fashion-mnist", n_train=64, n_test=16)
    args = gpucheck.parse_args(["--device", "cpu", "--tiny", "--data-dir", str(tmp_path)])
    check = gpucheck.Check(args, tmp_path / "check.json", {})
    need = {part: check.first_need(part) for part in gpucheck.PARTS}
    rows = need["modes"] + need["memory"] + need["peers"]
    check.plan(list(gpucheck.PARTS), rows + need["train"])
    assert list(check.need) == ["modes", "memory", "peers", "train"]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" needs ~")[0] for line in err] == ["skipped: overhead", "skipped: resume"]
    check.plan(list(gpucheck.PARTS), rows + need["train"] - 1)  # the run no longer fits
    fits = rows + need["overhead"] <= rows + need["train"] - 1
    assert list(check.need) == ["modes", "memory", "peers", *["overhead"] * fits]
    check.plan(["train", "peers"], 1)  # nothing fits: the rows are still tried, one by one
    assert list(check.need) == ["peers"] and check.skipped[-1] == "train"


def gpu_check(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """The tiny GPU check on CPU, its results in tmp_path/check.json."""
    flags = ["--gpu-check", "--tiny", "--out", tmp_path / "check.json", "--data-dir",
             tmp_path / "data", "--save", tmp_path / "work", *args]  # fmt: skip
    return run_bench(flags, env={"FASHION_MNIST_DIR": str(tmp_path / "no-system-copy")})


def test_gpu_check_end_to_end_on_cpu(tmp_path: Path):
    """Every part on tiny models; a second run replaces only what it re-measures; a budget
    too short for a part skips it, saying so, and keeps the file's parts."""
    # Epochs of about half a second, so the SIGTERM sent once epoch 1 is logged lands in epoch 2
    synthetic.make_mnist(tmp_path / "data", "fashion-mnist", n_train=512, n_test=32)
    done = gpu_check(tmp_path, "--budget", 900)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "check.json").read_text())
    parts = result["parts"]
    assert set(parts) == set(gpucheck.PARTS)
    modes = {r["mode"]: r for r in parts["modes"]["records"]}
    assert {"naive", "default"} <= modes.keys()
    # the bf16 eager row, unless it is the default itself (a CPU with native bf16)
    settings = [r["settings"] for r in modes.values()]
    assert settings.count("channels_last, bf16, eager") == 1
    assert modes["naive"]["speedup_vs_naive"] == 1 and modes["default"]["img_per_s"] > 0
    assert [r["mode"] for r in parts["memory"]["records"]] == ["memory_efficient", "plain"]
    assert all(r["abs_peak_bytes"] > r["peak_mem_bytes"] > 0 for r in parts["memory"]["records"])
    peers = {r["peer"]: r for r in parts["peers"]["peers"] if r["mode"] == "eager"}
    assert "torchvision-densenet121" in peers
    assert all(r["speed_ratio"] > 0 and r["mem_ratio"] > 0 for r in peers.values())
    overhead = parts["overhead"]
    assert overhead["bare_s"] > 0 and overhead["epoch_s"] > 0 and overhead["share_outside"] < 1
    train = parts["train"]
    log = train["rows"]
    assert train["finished"] and [r["epoch"] for r in log] == list(range(1, train["epochs"] + 1))
    assert train["test_err"] == log[-1]["test_err"] and 0 <= train["test_err"] <= 100
    assert train["wall_s"] > train["train_s"] > 0
    resume = parts["resume"]
    assert resume["stop"]["exit"] == 128 + signal.SIGTERM and resume["resumed"]["exit"] == 0
    assert resume["stopped_and_saved"] and resume["continued_to_the_end"]
    assert resume["stop_message"][0].startswith("stopped by signal 15 in epoch")
    for part in gpucheck.PARTS:
        assert f"| {part} |" in done.stdout
    assert "skipped: nothing" in done.stdout
    assert "leaked semaphore" not in done.stderr  # measuring children leave nothing behind

    again = gpu_check(tmp_path, "--parts", "memory", "--budget", 900)
    assert again.returncode == 0, again.stderr
    second = json.loads((tmp_path / "check.json").read_text())["parts"]
    assert {k: v for k, v in second.items() if k != "memory"} == {
        k: v for k, v in parts.items() if k != "memory"
    }
    assert second["memory"]["records"] != parts["memory"]["records"]  # re-measured

    before = (tmp_path / "check.json").read_bytes()
    short = gpu_check(tmp_path, "--parts", "modes", "train", "--budget", 5)
    assert short.returncode == 0, short.stderr
    assert "skipped: modes tiny naive needs ~" in short.stderr
    assert "to measure what was skipped: python bench.py --gpu-check --parts modes" in short.stdout
    assert (tmp_path / "check.json").read_bytes() == before


def test_gpu_check_cut_short_keeps_finished_parts(tmp_path: Path):
    """Killed mid-run (the device machine's hard limit): the parts already finished are in
    the file, whole."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, "bench.py", "--gpu-check", "--tiny", "--device", "cpu", "--threads",
           "1", "--parts", "modes", "memory", "--out", str(out), "--budget", "900"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:  # killed as soon as part 1 says it is saved: part 2's rows take under a second now
        for line in proc.stderr:
            if line.startswith("modes: saved in"):
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    parts = json.loads(out.read_text())["parts"]
    assert list(parts) == ["modes"] and parts["modes"]["records"][0]["mode"] == "naive"
