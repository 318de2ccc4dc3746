"""bench.py: a quick run writes the promised JSON; every fast path trains like the reference;
FLOP counts match independent formulas. Numerical checks only, no timings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bench
import engine

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"model", "batch", "mode", "img_per_s", "peak_mem_bytes", "speedup_vs_naive",
        "mem_vs_naive", "flops_per_img"}  # fmt: skip
CPU = torch.device("cpu")


def test_quick_run_writes_json_and_table(tmp_path: Path):
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    cmd = [sys.executable, "bench.py", "--quick", "--models", "tiny", "--device", "cpu",
           "--threads", "1", "--out", str(out), "--markdown", str(table)]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    machine, records = result["machine"], result["records"]
    assert {"device", "cpu", "cores", "torch", "date", "command", "peak_flops",
            "memory_measure"} <= machine.keys()  # fmt: skip
    assert machine["device"] == "cpu" and machine["command"].startswith(
        "python bench.py"
    )
    assert [r["mode"] for r in records] == [
        "naive", "+channels_last", "+amp", "memory_efficient", "memory_efficient-naive"
    ]  # fmt: skip
    for r in records:
        assert KEYS <= r.keys()
        assert r["model"] == "tiny" and r["batch"] == 16
        for key in KEYS - {"model", "batch", "mode"}:
            assert r[key] > 0, (r["mode"], key)
        assert 0 < r["frac_of_peak"] < 1
    assert records[0]["speedup_vs_naive"] == 1 and records[0]["mem_vs_naive"] == 1
    assert records[-2]["settings"].endswith("memory_efficient")
    assert records[-1]["settings"] == "NCHW, fp32, eager, memory_efficient"
    text = table.read_text()
    assert (
        text.startswith("`python bench.py --quick") and "| tiny | 16 | naive |" in text
    )
    assert text in done.stdout


def two_steps(mode: bench.Mode) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of two train.py steps on the tiny model from the seeded start, and how far each
    floating-point parameter and buffer moved."""
    net, opt, scaler, x, y = bench.prepare("tiny", 16, mode, CPU)
    start = {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    losses = []
    for _ in range(2):
        out = engine.train_step(net, opt, scaler, x, y, mode.amp)
        losses.append(F.cross_entropy(out.float(), y).item())
    return losses, {k: net.state_dict()[k] - v for k, v in start.items()}


REFERENCE = bench.Mode("naive")
CHANNELS_LAST = bench.Mode("+channels_last", channels_last=True)
BF16 = bench.Mode("+amp", channels_last=True, amp="bf16")
EFFICIENT = bench.Mode("memory_efficient", channels_last=True, memory_efficient=True)
EFFICIENT_BF16 = bench.Mode("memory_efficient", True, "bf16", memory_efficient=True)


# Tolerances: loss (relative) and, for fp32, each tensor's update (relative to its norm).
# NCHW and channels_last use different fp32 kernels; training-mode BN at initialisation
# amplifies their rounding (each is ~1e-3 of the update away from float64), hence 5e-2.
# memory_efficient recomputes with the very same kernels, so it matches bit for bit.
@pytest.mark.parametrize(
    ("fast", "reference", "loss_rtol", "update_rtol"),
    [
        (CHANNELS_LAST, REFERENCE, 1e-5, 5e-2),
        (BF16, REFERENCE, 2e-2, None),
        (EFFICIENT, CHANNELS_LAST, 1e-5, 1e-6),
        (EFFICIENT_BF16, REFERENCE, 2e-2, None),
    ],
    ids=["channels_last", "bf16", "memory_efficient", "memory_efficient-bf16"],
)
def test_fast_path_trains_like_reference(fast, reference, loss_rtol, update_rtol):
    torch.set_num_threads(1)  # the same kernels however busy the machine is
    fast_losses, fast_updates = two_steps(fast)
    ref_losses, ref_updates = two_steps(reference)
    assert fast_losses == pytest.approx(ref_losses, rel=loss_rtol)
    assert fast_losses[1] < fast_losses[0]  # the second step saw updated weights
    if update_rtol is not None:
        for name, ref in ref_updates.items():
            error = (fast_updates[name] - ref).norm()
            assert error <= update_rtol * ref.norm() + 1e-12, name


def test_conv_flops_match_the_formula():
    n, cin, cout, h, w, k = 2, 5, 7, 6, 9, 3
    conv = nn.Conv2d(cin, cout, k, padding=1, bias=False)
    x = torch.randn(n, cin, h, w)
    assert bench.count_flops(lambda: conv(x)) == 2 * k * k * cin * cout * h * w * n


def test_training_step_is_about_three_forwards():
    net, _, _, x, y = bench.prepare("tiny", 4, REFERENCE, CPU)
    forward = bench.count_flops(lambda: net(x))
    assert 2.5 * forward < bench.step_flops(net, x, y) < 3.5 * forward
    assert bench.flops_per_img("tiny", 4) == bench.step_flops(net, x, y) / 4


def test_gpu_rows_peaks_and_file_names():
    names = [m.name for m in bench.modes("cuda")]
    assert names == ["naive", "+channels_last", "+amp", "+amp-fp16", "+compile",
                     "+compile-cudagraphs"]  # fmt: skip
    assert [m.name for m in bench.modes("cpu", cpu_compile=True)][-1] == "+compile"
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bf16", 1) == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe", "off", 1) == 378e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB", "off", 1) == 156e12
    assert bench.peak_flops("Some Future GPU", "bf16", 1) is None
    assert bench.peak_flops("cpu", "bf16", 1) >= bench.peak_flops("cpu", "off", 1) > 0
    assert bench.device_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.device_kind("NVIDIA A100-SXM4-80GB") == "a100"
    assert bench.device_kind("cpu") == "cpu"


def test_memory_efficient_takes_the_fastest_settings():
    rows = [
        bench.Row(m, speed, 0.0, 1)
        for m, speed in zip(bench.modes("cuda"), [1, 2, 3, 4, 6, 5])
    ]
    chosen = bench.efficient_mode(rows)
    assert chosen == bench.Mode("memory_efficient", True, "bf16", "default", True)
