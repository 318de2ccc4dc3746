"""densenet.py and diracnet.py copied alone into an empty folder, as a user copies them into a
project: each imports, trains, scripts and loads weights with torch and the standard library
only, in a process that cannot import anything else of this repository."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from test_densenet import torchvision_densenet121

from reference import assert_same_computation

ROOT = Path(__file__).resolve().parent.parent

# Run in the folder holding the copy alone: the copy must be the module imported, and no
# other module of this repository importable. argv: the torchvision weights, an input, out.
DENSENET = """
import importlib.util, sys
from pathlib import Path
import torch
import torch.nn.functional as F
import densenet
assert Path(densenet.__file__).parent == Path.cwd(), densenet.__file__
assert importlib.util.find_spec("sharedstats") is None, "the repository is importable"
weights, image, out = sys.argv[1:]
result = {}
torch.manual_seed(0)
x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
for memory_efficient in (False, True):
    torch.manual_seed(1)
    model = densenet.densenet_cifar(100, 12, memory_efficient=memory_efficient).double()
    result["params"] = sum(p.numel() for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    opt.step()
    after = {k: v.clone() for k, v in model.state_dict().items()}
    result[memory_efficient] = {"logits": logits.detach(), "before": before, "after": after}
scripted = torch.jit.script(model)
result["scripted"] = scripted(x).detach(), model(x).detach()
tv = densenet.densenet121()
densenet.load_torchvision_checkpoint(tv, weights)
with torch.no_grad():
    result["torchvision"] = tv.eval()(torch.load(image))
torch.save(result, out)
"""

DIRACNET = """
import importlib.util, sys
from pathlib import Path
import torch
import torch.nn.functional as F
import diracnet
assert Path(diracnet.__file__).parent == Path.cwd(), diracnet.__file__
assert importlib.util.find_spec("densenet") is None, "the repository is importable"
torch.manual_seed(0)
model = diracnet.diracnet_cifar(10, 1).double()
x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
before = [p.clone() for p in model.parameters()]
F.cross_entropy(model(x), y).backward()
opt.step()
model.eval()
with torch.no_grad():
    result = {"before": before, "after": list(model.parameters()),
              "model": model(x), "folded": diracnet.fold(model)(x)}
torch.save(result, sys.argv[1])
"""


def _run_alone(module: str, script: str, folder: Path, *args: Path) -> None:
    """Copy `module` alone into the empty `folder` and run `script` there, with no path
    of this repository on sys.path (PYTHONPATH unset)."""
    folder.mkdir()
    shutil.copy(ROOT / module, folder)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_stepped_the_same(plain: dict, efficient: dict) -> None:
    """Two float64 models of the same weights after one SGD step on one batch: the same
    logits and weights (memory_efficient recomputes, it computes the same)."""
    assert_same_computation(efficient["logits"], plain["logits"])
    moved = 0
    for name, want in plain["after"].items():
        if want.is_floating_point():
            assert_same_computation(efficient["after"][name], want)
            moved += not torch.equal(want, plain["before"][name])
    assert moved > 100  # the step changed the weights (BC-100-12 has 397 tensors)


def test_densenet_copied_alone_trains_scripts_and_loads_torchvision_weights(tmp_path):
    """DenseNet-BC-100-12 (3 input channels, 10 classes): one SGD step plain and
    memory-efficient, TorchScript, and torchvision's densenet121 weights from a file."""
    tv = torchvision_densenet121(2)
    weights, image, out = tmp_path / "tv.pth", tmp_path / "image.pt", tmp_path / "out.pt"
    torch.save(tv.state_dict(), weights)
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, image)
    _run_alone("densenet.py", DENSENET, tmp_path / "project", weights, image, out)
    result = torch.load(out, weights_only=False)
    assert result["params"] == 769_162
    _assert_stepped_the_same(result[False], result[True])
    scripted, eager = result["scripted"]
    assert_same_computation(scripted, eager)
    with torch.no_grad():  # the same ops on the same weights and input: the same bits
        torch.testing.assert_close(result["torchvision"], tv.eval()(x), rtol=0, atol=0)


def test_diracnet_copied_alone_trains_and_folds(tmp_path):
    """DiracNet-10-1: one SGD step, then the folded plain network computes the same."""
    out = tmp_path / "out.pt"
    _run_alone("diracnet.py", DIRACNET, tmp_path / "project", out)
    result = torch.load(out, weights_only=False)
    assert not any(torch.equal(a, b) for a, b in zip(result["before"], result["after"], strict=True))
    assert_same_computation(result["folded"], result["model"])
