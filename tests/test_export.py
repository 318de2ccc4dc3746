"""densenet.py where users take it: TorchScript, torch.export, ONNX (run by onnxruntime) and
torch.hub, each against the eager model's outputs: in float64 where it is the same
computation, against a float64 run where another engine computes in fp32."""

import inspect
import warnings
from pathlib import Path

import onnxruntime
import pytest
import torch

import densenet as D
from reference import assert_forward_within, assert_same_computation

ROOT = Path(__file__).resolve().parent.parent

# What this torch has, detected: each test of a missing feature is skipped, saying which.
needs_export = pytest.mark.skipif(
    not hasattr(torch, "export"), reason="this torch has no torch.export (torch 2.1 added it)"
)
needs_is_exporting = pytest.mark.skipif(
    not hasattr(getattr(torch, "compiler", None), "is_exporting"),
    reason="this torch has no torch.compiler.is_exporting (torch 2.7 added it): densenet.py "
    "cannot tell an export from eager mode, so it refuses nothing",
)
needs_onnx_dynamic_shapes = pytest.mark.skipif(
    "dynamic_shapes" not in inspect.signature(torch.onnx.export).parameters,
    reason="this torch.onnx.export takes no dynamic_shapes (dynamo=True with them: torch 2.5+)",
)


def _skip_unless_training_mode_exports() -> None:
    """Skip where torch.export cannot export a training-mode BatchNorm: torch 2.1's fails
    in its own ExportedProgram.module() (an assert on the buffers it updates)."""
    try:
        torch.export.export(torch.nn.BatchNorm1d(2), (torch.randn(3, 2),)).module()
    except AssertionError as e:
        pytest.skip(f"this torch.export cannot export a training-mode BatchNorm ({e!r})")


def _cifar(memory_efficient: bool = False) -> D.DenseNet:
    """DenseNet-BC-40-12 in float64: tracing and scripting must not change what it computes."""
    torch.manual_seed(0)
    return D.densenet_cifar(40, 12, memory_efficient=memory_efficient).double()


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, dtype=torch.float64)


def _output_and_input_grad(model: torch.nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_()
    out = model(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return out, grad


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_torchscript_equals_eager(memory_efficient):
    """Scripted, memory_efficient takes the plain path (TorchScript cannot checkpoint)."""
    model = _cifar(memory_efficient)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.script is deprecated"
        scripted = torch.jit.script(model)
    x = _x()
    for got, want in zip(
        _output_and_input_grad(scripted, x), _output_and_input_grad(model, x), strict=True
    ):
        assert_same_computation(got, want)
    scripted.eval(), model.eval()
    with torch.no_grad():
        assert_same_computation(scripted(x), model(x))


@needs_export
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_torch_export_eval_equals_eager(memory_efficient):
    model = _cifar(memory_efficient).eval()
    program = torch.export.export(model, (_x(),))
    x = _x()
    with torch.no_grad():
        assert_same_computation(program.module()(x), model(x))


@needs_export
def test_torch_export_train_mode_plain_equals_eager():
    _skip_unless_training_mode_exports()
    model, twin = _cifar(), _cifar()
    program = torch.export.export(model, (_x(),))
    x = _x()
    assert_same_computation(program.module()(x), twin(x))


@needs_is_exporting
def test_torch_export_train_mode_memory_efficient_refused_in_one_line():
    model = _cifar(memory_efficient=True)
    with pytest.raises(RuntimeError) as info:
        torch.export.export(model, (_x(),))
    message = str(info.value)
    assert "\n" not in message
    assert "memory_efficient=True in training mode" in message and "model.eval()" in message


ONNX_MODELS = {
    "cifar": (lambda: D.densenet_cifar(16, 4), 32),
    "imagenet": (lambda: D.DenseNet(8, (2, 2, 2, 2), stem="imagenet", num_classes=7), 64),
}


@needs_onnx_dynamic_shapes
@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_dynamic_batch_equals_eager(name, tmp_path):
    """Exported at batch 2, run by onnxruntime at batch 3."""
    build, size = ONNX_MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    path = tmp_path / "densenet.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model, (torch.randn(2, 3, size, size),), path, dynamo=True, dynamic_shapes=({0: batch},)
    )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, size, size)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    # onnxruntime's fp32 kernels sum in their own order: as far from the float64 output as
    # torch's fp32 is, 8x for the spread of two such roundings of one eval-mode forward
    assert_forward_within(torch.from_numpy(out), model, x, 8)


def _hub(name: str, **kwargs):
    return torch.hub.load(str(ROOT), name, source="local", **kwargs)


def test_hub_accepts_torchvision_arguments_without_weights():
    for kwargs in ({"pretrained": False}, {"weights": None}, {}):
        model = _hub("densenet121", **kwargs)
        assert sum(p.numel() for p in model.parameters()) == 7_978_856


@pytest.mark.parametrize(
    "kwargs", [{"pretrained": True}, {"weights": "IMAGENET1K_V1"}, {"weights": "missing.pth"}]
)
def test_hub_named_weights_refused_in_one_line(kwargs):
    with pytest.raises(ValueError) as info:
        _hub("densenet121", **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert "no named weights ship" in message and "load_torchvision_checkpoint" in message


def test_hub_weights_file_loads_it(tmp_path):
    torch.manual_seed(1)
    source = D.densenet_cifar(100, 12)
    torch.save(source.state_dict(), tmp_path / "bc100.pth")
    model = _hub("densenet_bc_100_12", weights=str(tmp_path / "bc100.pth")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the same weights, kernels and input: the same bits
        torch.testing.assert_close(model(x), source.eval()(x), rtol=0, atol=0)
